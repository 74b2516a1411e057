"""The engine on a GPU: bf16 weights, the Triton paged decode kernel, CUDA-graph decode
steps, FP8 KV; greedy output checked token for token against the float32 full-recompute
Llama (a token may differ from the reference's argmax only where the reference's own
logits nearly tie, since bf16 rounds differently)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from kvpilot.worker.block_manager import TableError  # noqa: E402
from kvpilot.worker.runner import graph_buckets  # noqa: E402
from kvpilot.worker.scheduler import FinishReason, SamplingParams, Sequence  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.worker_helpers import (  # noqa: E402
    BF16_TOL, GPU_GREEDY_TOKENS, FullRecompute, assert_greedy_matches, gpu_prompts as prompts,
    tiny_engine,
)

GREEDY = SamplingParams(max_tokens=GPU_GREEDY_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # head_dim 16: the smallest the decode kernel takes; 4 query heads per KV head.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11, hidden=128,
                                 heads=8, kv_heads=2)


@pytest.fixture(scope="module")
def reference(ckpt):
    return FullRecompute(ckpt, device="cuda")



def gpu_engine(ckpt, **kw):
    return tiny_engine(ckpt, device="cuda", dtype="bf16", kv_dtype=kw.pop("kv_dtype", "bf16"),
                       max_num_seqs=16, **kw)


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(16) == [1, 2, 4, 8, 16]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]


def test_cuda_graph_decode_matches_the_reference(ckpt, reference):
    engine = gpu_engine(ckpt)
    assert sorted(engine.runner._graphs) == [1, 2, 4, 8, 16]
    seqs = engine.generate(prompts((1, 15, 16, 17, 40, 100)), GREEDY)  # a batch of 6: bucket 8
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert_greedy_matches(s.output, s.prompt, reference.logits, BF16_TOL)


def test_graphs_and_eager_agree(ckpt):
    ps = prompts((3, 33, 70))
    graphed = [s.output for s in gpu_engine(ckpt).generate(ps, GREEDY)]
    eager = [s.output for s in gpu_engine(ckpt, cuda_graphs=False).generate(ps, GREEDY)]
    assert graphed == eager


def test_prefix_hits_and_preemption_on_gpu(ckpt, reference):
    engine = gpu_engine(ckpt, max_model_len=64, concurrent=2)  # 8 pages
    seqs = engine.generate(prompts((30, 30, 30, 30)), GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.bm.hit_tokens > 0  # recomputes found their pages again
    for s in seqs:
        assert_greedy_matches(s.output, s.prompt, reference.logits, BF16_TOL)


def test_fp8_kv_decodes_through_the_kernel(ckpt, reference):
    engine = gpu_engine(ckpt, kv_dtype="fp8")
    assert engine.runner.layers[0].key.dtype == torch.float8_e4m3fn
    seqs = engine.generate(prompts((17, 64)), GREEDY)
    for s in seqs:
        assert_greedy_matches(s.output[:1], s.prompt, reference.logits, BF16_TOL)
        assert s.num_output == GREEDY.max_tokens


def test_debug_checks_guard_the_kernels(ckpt, reference):
    engine = gpu_engine(ckpt, debug_checks=True)
    for s in engine.generate(prompts((5, 20)), GREEDY):
        assert_greedy_matches(s.output, s.prompt, reference.logits, BF16_TOL)
    seq = Sequence(prompts((20,))[0], GREEDY)
    engine.add(seq)
    engine.step()
    engine.scheduler.bm._tables[seq.seq_id].pages[1] = engine.scheduler.bm.num_pages
    with pytest.raises(TableError):
        engine.runner.decode([seq])
