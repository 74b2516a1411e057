"""Shared by the worker tests: a tiny checkpoint, engines over it, a plain
full-recompute Llama to check the engine against, and the worker as a process started
as the operator starts it."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpilot.worker.config import WorkerSettings, spec_from_checkpoint
from kvpilot.worker.factory import create_engine
from kvpilot.worker.model import LlamaConfig, hf_state_dict, load_config, load_weights, rope_frequencies


def tiny_settings(model_dir, *, max_model_len=256, concurrent=4, device="cpu", dtype="fp32",
                  kv_dtype="fp32", **kw) -> WorkerSettings:
    cfg = load_config(model_dir)
    spec = spec_from_checkpoint(cfg, params_dtype="fp32" if dtype == "fp32" else dtype,
                                kv_dtype=kv_dtype if kv_dtype != "fp32" else "fp32",
                                max_model_len=max_model_len, concurrent=concurrent)
    return WorkerSettings(model_dir=str(model_dir), name="tiny", spec=spec, device=device,
                          dtype=dtype, kv_dtype=kv_dtype, **kw)


def tiny_engine(model_dir, **kw):
    return create_engine(tiny_settings(model_dir, **kw))


class FullRecompute:
    """The same Llama, written plainly: every call recomputes the whole sequence with
    dense causal attention, no cache, no fusion, float32 or the given dtype."""

    def __init__(self, model_dir, dtype=torch.float32, device="cpu"):
        self.cfg: LlamaConfig = load_config(model_dir)
        w = load_weights(model_dir, self.cfg, device, dtype)
        self.sd = hf_state_dict(self.cfg, w)
        self.dtype, self.device = dtype, device
        self.inv_freq = rope_frequencies(self.cfg).to(device)

    def _norm(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)).to(x.dtype) * w

    def _rope(self, x, n):
        angles = torch.outer(torch.arange(n, device=self.device).float(), self.inv_freq)
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits of the next token after ``tokens``."""
        c, sd = self.cfg, self.sd
        n = len(tokens)
        x = sd["model.embed_tokens.weight"][torch.tensor(tokens, device=self.device)]
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            h = self._norm(x, sd[p + "input_layernorm.weight"])
            q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(n, c.num_heads, c.head_dim)
            k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(n, c.num_kv_heads, c.head_dim)
            v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(n, c.num_kv_heads, c.head_dim)
            q, k = self._rope(q, n), self._rope(k, n)
            g = c.num_heads // c.num_kv_heads
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(c.head_dim)
            causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", probs, v.float()).to(x.dtype).reshape(n, -1)
            x = x + o @ sd[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, sd[p + "post_attention_layernorm.weight"])
            act = F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
            x = x + act @ sd[p + "mlp.down_proj.weight"].T
        x = self._norm(x, sd["model.norm.weight"])
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        return (x[-1] @ head.T).float()


def assert_greedy_matches(tokens: list[int], prompt: list[int], next_logits, tol: float) -> None:
    """Each generated token is the reference's argmax after the same prefix, or within
    ``tol`` of it (a near tie that rounding may break either way)."""
    seq = list(prompt)
    for i, tok in enumerate(tokens):
        logits = next_logits(seq)
        best = int(logits.argmax())
        gap = float(logits[best] - logits[tok])
        assert tok == best or gap <= tol, (
            f"token {i}: engine {tok}, reference {best} (logit gap {gap:.4g} > {tol})")
        seq.append(tok)


# What the GPU tests run: greedy, a fixed length, and the logit gap allowed between a bf16
# engine and the fp32 reference (logits about +-10).
GPU_GREEDY_TOKENS = 24
BF16_TOL = 0.25


def gpu_prompts(lengths):
    """Prompts of these lengths, the same tokens in every run."""
    return [[(11 * i + 5 * n) % 256 for i in range(n)] for n in lengths]


# ---- the worker as the operator starts it ------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_parent(pid_dir: Path) -> int | None:
    """The parent pid of ``/proc/PID`` (None once it is gone)."""
    try:
        return int((pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    procs = list(Path("/proc").glob("[0-9]*"))
    below, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [int(p.name) for p in procs if proc_parent(p) == parent]
        below += children
        todo += children
    return below


class WorkerProcess:
    """``python -m kvpilot.worker --device cpu`` on a tiny checkpoint, with the operator's
    environment: the Model spec (``spec_update`` may change its JSON), the HBM budget of
    a replica at ``tp``, the termination-log path; ``args`` go on its command line."""

    def __init__(self, tmp_path: Path, *args: str, tp: int = 1, spec_update=None):
        from kvpilot.api import contract
        from kvpilot.api.memory import replica_budget
        from kvpilot.worker.tiny import write_tiny_checkpoint
        from tests.conftest import ROOT

        self.model_dir = write_tiny_checkpoint(tmp_path / "m", seed=1)
        spec = spec_from_checkpoint(load_config(self.model_dir), params_dtype="fp32",
                                    kv_dtype="bf16", max_model_len=512, concurrent=2)
        raw = spec.model_dump(by_alias=True, mode="json")
        if spec_update:
            spec_update(raw)
        self.budget = replica_budget(spec, tp)
        self.termination = tmp_path / "termination-log"
        self.log = tmp_path / "worker.log"
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}",
               contract.ENV_MODEL_SPEC: json.dumps(raw), contract.ENV_MODEL_NAME: "tiny-llama",
               contract.ENV_HBM_PER_GPU: str(self.budget.per_gpu),
               contract.ENV_TENSOR_PARALLEL: str(tp),
               contract.ENV_TERMINATION_LOG: str(self.termination)}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpilot.worker", "--model", str(self.model_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *args],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=120.0) -> None:
        import httpx

        from kvpilot.api import contract

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + contract.PATH_READY, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker not ready:\n" + self.log.read_text()
            time.sleep(0.2)

    def running(self, module: str) -> list[int]:
        """The pids of the processes below the worker running ``python -m module``."""
        found = []
        for pid in descendants(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if module.encode() in cmdline:
                found.append(pid)
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
