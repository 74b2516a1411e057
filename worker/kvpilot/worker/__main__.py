"""``python -m kvpilot.worker --model DIR [--spec MODEL.yaml] --host H --port P --device cpu|cuda``

The Model comes from ``--spec`` (a Model YAML file), else from the environment the
operator sets (``kvpilot.api.contract``: the spec as JSON, the name, the HBM budget per
GPU, the TP degree), else it is described from the checkpoint (``--max-model-len`` x
``--concurrent-sequences``).

Two processes: this one is the HTTP server (it parses, tokenizes, detokenizes and
streams; it never imports torch) and starts the engine core
(``python -m kvpilot.worker.core``, the only process that touches a GPU), which reads
the same command line and environment. The server answers ``/health`` at once and
``/ready`` once the core has loaded the model.

Given a Model, the core first checks the checkpoint against it (config.json and the
safetensors headers, :func:`kvpilot.api.checkpoint.checkpoint_mismatches`): the operator
placed the replica with the Model's numbers, so a checkpoint that disagrees would not fit
what was reserved for it. A checkpoint that disagrees or cannot be opened, and a model
that fails to load, end the worker with status 1 and a reason in the termination
message file (``WeightsMismatch``, ``WeightsUnavailable``, ``LoadFailed``): the core
writes it to a file of the server's, which passes it on.

At a TP degree above 1 (``KVPILOT_TENSOR_PARALLEL``, else the spec's fixed degree) the
core is rank 0 and starts one process per further GPU (``kvpilot.worker.parallel``).
A rank that dies or hangs ends the worker at once with status 1 and ``RankFailed``
(``LoadFailed`` while loading) and the rank's reason: a replica missing a rank cannot
serve, and the operator replaces it. So does a core that exits (``RankFailed``: it is
rank 0), after every request in flight has ended with an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

from kvpilot.api import contract

if TYPE_CHECKING:  # imported where used: the server's process never imports torch
    from kvpilot.api.model import ModelSpec
    from kvpilot.worker.config import WorkerSettings

log = logging.getLogger("kvpilot.worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvpilot.worker",
                                 description="Serve a Llama checkpoint with a paged KV cache.")
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--spec", help="Model YAML file (else the operator's environment)")
    ap.add_argument("--name", help="model name to serve under (default: the Model's name, "
                    "else the directory's)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=contract.WORKER_PORT)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when a GPU is visible")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="weights and activations (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--kv-cache-dtype", choices=("bf16", "fp16", "fp8", "fp32"), default=None,
                    help="default: the Model's kvCacheDtype on cuda; fp32 on cpu unless fp8")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch")
    ap.add_argument("--max-waiting", type=int, default=256,
                    help="waiting requests beyond which new ones get 429")
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="standalone: size the KV pool from this share of the GPU's memory")
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="without a Model spec: the longest sequence served")
    ap.add_argument("--concurrent-sequences", type=int, default=8,
                    help="without a Model spec: sequences of max-model-len the pool holds")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--debug-checks", action="store_true",
                    help="check every block table and slot on the host before the kernels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-special-tokens-in-chat", action="store_true",
                    help="let special-token text in chat messages become special tokens "
                         "(refused by default: a user could forge turn boundaries)")
    ap.add_argument("--tp-timeout", type=float, default=120.0,
                    help="seconds after which a collective or step of a tensor-parallel "
                    "replica counts as hung and the worker exits")
    ap.add_argument("--log-level", default="info")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace, env) -> "WorkerSettings":
    import torch

    from kvpilot.api.files import load_models
    from kvpilot.worker.config import (
        WorkerSettings,
        env_hbm_per_gpu,
        spec_from_checkpoint,
        spec_from_env,
        tensor_parallel,
    )
    from kvpilot.worker.model import load_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    name = args.name
    if args.spec:
        model = load_models(args.spec)[0]
        spec, name = model.spec, name or model.metadata.name
    else:
        spec, env_name = spec_from_env(env)
        name = name or env_name
    kv_dtype = args.kv_cache_dtype
    if spec is None:
        kv = kv_dtype or ("bf16" if device == "cuda" else "fp32")
        spec = spec_from_checkpoint(load_config(args.model), params_dtype=dtype, kv_dtype=kv,
                                    max_model_len=args.max_model_len,
                                    concurrent=args.concurrent_sequences)
    if kv_dtype is None:
        kv_dtype = spec.kv_cache_dtype
        if device == "cpu" and kv_dtype != "fp8":
            kv_dtype = "fp32"  # the CPU path computes in fp32
        elif device == "cuda" and kv_dtype in ("bf16", "fp16") and kv_dtype != dtype:
            kv_dtype = dtype
    return WorkerSettings(
        model_dir=args.model, name=name or os.path.basename(os.path.normpath(args.model)),
        spec=spec, device=device, dtype=dtype, kv_dtype=kv_dtype, page_size=args.page_size,
        tp=tensor_parallel(spec, env), hbm_per_gpu=env_hbm_per_gpu(env),
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting, max_batched_tokens=args.max_batched_tokens,
        prefix_caching=not args.no_prefix_caching, cuda_graphs=not args.enforce_eager,
        debug_checks=args.debug_checks, seed=args.seed, tp_timeout_s=args.tp_timeout)


def check_checkpoint(model_dir: str, spec: "ModelSpec", name: str) -> tuple[str, str] | None:
    """None when the checkpoint at ``model_dir`` agrees with the Model, else the reason
    and message to stop with."""
    from kvpilot.api.checkpoint import (
        CheckpointUnreadable, checkpoint_mismatches, read_config, weights_from_directory,
    )

    try:
        config = read_config(model_dir)
        weights = weights_from_directory(model_dir)
    except CheckpointUnreadable as err:
        return contract.REASON_WEIGHTS_UNAVAILABLE, f"the checkpoint at {model_dir}: {err}"
    try:
        mismatches = checkpoint_mismatches(spec, config, weights["bytes"], weights["dtype"])
    except ValueError as err:  # a config.json the check cannot read as an architecture
        return contract.REASON_LOAD_FAILED, f"the checkpoint at {model_dir}: {err}"
    if mismatches:
        return (contract.REASON_WEIGHTS_MISMATCH,
                f"the checkpoint at {model_dir} disagrees with Model {name}: "
                + "; ".join(mismatches))
    return None


def served_name(args: argparse.Namespace, env) -> str:
    """The name the worker serves under, as ``settings_from`` names it, without loading
    anything: ``--name``, else the Model's (``--spec`` or the environment), else the
    checkpoint directory's."""
    if args.name:
        return args.name
    if args.spec:
        from kvpilot.api.files import load_models

        return load_models(args.spec)[0].metadata.name
    return env.get(contract.ENV_MODEL_NAME) or os.path.basename(os.path.normpath(args.model))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from kvpilot.worker.client import EngineClient, EngineFailed
    from kvpilot.worker.ipc import CoreStart
    from kvpilot.worker.server import ServerSettings, WorkerState, create_app, uvicorn_config
    from kvpilot.worker.termination import write_termination

    state = WorkerState(name=served_name(args, os.environ))
    app = create_app(state, ServerSettings(
        special_tokens_in_chat=args.allow_special_tokens_in_chat))
    server = uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port,
                                           log_level=args.log_level))
    failed: list[str] = []

    def engine_failed(reason: str, message: str) -> None:
        # The core wrote its reason to a file of ours; the pod's termination message is
        # this process's to write. Requests in flight have had their error already.
        if state.engine is None:
            state.load_error = message
        failed.append(reason)
        write_termination(reason, message)
        server.should_exit = True

    # The engine core reads the same command line and environment (``settings_from``).
    client = EngineClient(CoreStart(argv=argv), model_dir=args.model,
                          max_waiting=args.max_waiting, on_dead=engine_failed)

    def load() -> None:
        try:
            client.start()
            client.wait_ready()
        except EngineFailed:
            return  # engine_failed has seen to it
        except Exception as err:  # noqa: BLE001 - the core could not even start
            log.exception("the engine core failed to start")
            engine_failed(contract.REASON_LOAD_FAILED, f"{type(err).__name__}: {err}")
            return
        state.engine = client
        log.info("serving %s on %s:%d (engine core pid %d, %s)", state.name, args.host,
                 args.port, client.facts.pid, client.facts.device)

    threading.Thread(target=load, name="kvpilot-load", daemon=True).start()
    try:
        server.run()
    finally:
        client.close()  # the core closes the other ranks of a tensor-parallel replica
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
