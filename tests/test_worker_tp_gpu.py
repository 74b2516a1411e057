"""Tensor parallelism on GPUs: NCCL, bf16, the Triton paged kernel on each rank's KV
heads, decode steps replayed from CUDA graphs with the all-reduces inside. Greedy output
is checked against the float32 full-recompute Llama as in ``test_worker_gpu`` (bf16 rounds
differently, and the all-reduces sum in another order than one GPU's GEMM does). Needs
as many visible GPUs as ranks; one case runs two ranks on one GPU over gloo (eager)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from kvpilot.worker.parallel import ENV_BACKEND  # noqa: E402
from kvpilot.worker.scheduler import FinishReason, SamplingParams  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.worker_helpers import (  # noqa: E402
    BF16_TOL, GPU_GREEDY_TOKENS, FullRecompute, assert_greedy_matches, gpu_prompts as prompts,
    tiny_engine,
)

GREEDY = SamplingParams(max_tokens=GPU_GREEDY_TOKENS, temperature=0.0, ignore_eos=True)


def gpus(n):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(count < n, reason=f"needs {n} GPUs, {count} visible")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # head_dim 16, 8 query heads over 2 KV heads: TP 2 splits them, TP 4 replicates.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11, hidden=128,
                                 heads=8, kv_heads=2)


@pytest.fixture(scope="module")
def reference(ckpt):
    return FullRecompute(ckpt, device="cuda")



def gpu_engine(ckpt, tp, **kw):
    return tiny_engine(ckpt, device="cuda", dtype="bf16", kv_dtype=kw.pop("kv_dtype", "bf16"),
                       max_num_seqs=16, tp=tp, **kw)


def generate(ckpt, tp, ps, **kw):
    engine = gpu_engine(ckpt, tp, **kw)
    try:
        return engine, engine.generate(ps, GREEDY)
    finally:
        engine.runner.close()


@pytest.mark.parametrize("tp", [pytest.param(2, marks=gpus(2)), pytest.param(4, marks=gpus(4))])
def test_tp_graph_decode_matches_the_reference(ckpt, reference, tp):
    engine, seqs = generate(ckpt, tp, prompts((1, 15, 16, 17, 40, 100)))
    assert sorted(engine.runner._graphs) == [1, 2, 4, 8, 16]
    assert engine.runner.model.part.num_kv_heads == 1
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert_greedy_matches(s.output, s.prompt, reference.logits, BF16_TOL)


@gpus(2)
def test_tp_graphs_and_eager_agree(ckpt):
    ps = prompts((3, 33, 70))
    graphed = [s.output for s in generate(ckpt, 2, ps)[1]]
    eager = [s.output for s in generate(ckpt, 2, ps, cuda_graphs=False)[1]]
    assert graphed == eager


@gpus(2)
def test_tp_prefix_hits_preemption_and_fp8(ckpt, reference):
    engine, seqs = generate(ckpt, 2, prompts((30, 30, 30, 30)), max_model_len=64, concurrent=2)
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.bm.hit_tokens > 0
    for s in seqs:
        assert_greedy_matches(s.output, s.prompt, reference.logits, BF16_TOL)
    _, seqs = generate(ckpt, 2, prompts((17, 64)), kv_dtype="fp8")
    for s in seqs:
        assert_greedy_matches(s.output[:1], s.prompt, reference.logits, BF16_TOL)


@gpus(2)
def test_tp_collectives_probe_times_a_step(ckpt):
    engine = gpu_engine(ckpt, 2)
    try:
        assert 0 < engine.runner.probe_collectives(8, iters=10) < 0.1
    finally:
        engine.runner.close()


def test_tp2_over_gloo_on_one_gpu_matches_the_reference(ckpt, reference, monkeypatch):
    # The sharded model on the GPU path (Triton kernels on one KV head per rank,
    # vocab-parallel embedding and LM head) where one GPU is all there is.
    monkeypatch.setenv(ENV_BACKEND, "gloo")
    engine, seqs = generate(ckpt, 2, prompts((1, 17, 40)))
    assert engine.runner._graphs == {}
    for s in seqs:
        assert_greedy_matches(s.output, s.prompt, reference.logits, BF16_TOL)
