"""The engine's Llama against a plain full-recompute implementation and against
transformers' LlamaForCausalLM, greedy, token for token, on a tiny random checkpoint
built on the fly (CPU, float32)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from kvpilot.worker.block_manager import TableError  # noqa: E402
from kvpilot.worker.model import load_config, rope_frequencies  # noqa: E402
from kvpilot.worker.scheduler import FinishReason, SamplingParams  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.worker_helpers import FullRecompute, assert_greedy_matches, tiny_engine  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# Lengths around page boundaries (16), and one past two pages.
PROMPT_LENGTHS = (1, 15, 16, 17, 40)
TOL = 1e-4  # float32: engine and reference differ by rounding only


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def reference(ckpt):
    return FullRecompute(ckpt)


def prompts(n_list=PROMPT_LENGTHS, vocab=256):
    return [[(7 * i + 3 * n) % vocab for i in range(n)] for n in n_list]


def check(seqs, ref):
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH and s.num_output == GREEDY.max_tokens
        assert_greedy_matches(s.output, s.prompt, ref.logits, TOL)


def test_batched_paged_engine_matches_full_recompute(ckpt, reference):
    engine = tiny_engine(ckpt)
    check(engine.generate(prompts(), GREEDY), reference)


def test_prefix_cache_hits_give_the_same_tokens(ckpt, reference):
    engine = tiny_engine(ckpt)
    base = prompts((40,))[0]
    engine.generate([base], GREEDY)
    longer = base + [5, 6, 7]
    seqs = engine.generate([longer, base[:33]], GREEDY)
    bm = engine.scheduler.bm
    assert bm.hit_tokens == 32 + 32  # two whole pages of `base` found for each
    check(seqs, reference)


def test_preemption_by_recompute_gives_the_same_tokens(ckpt, reference):
    # 4 sequences of 30 + 12 tokens need 3 pages each; the pool has 8 (128 tokens).
    engine = tiny_engine(ckpt, max_model_len=64, concurrent=2)
    assert engine.scheduler.bm.num_pages == 8
    seqs = engine.generate(prompts((30, 30, 30, 30)), GREEDY)
    assert engine.scheduler.num_preemptions > 0
    check(seqs, reference)


def test_debug_checks_pass_on_real_batches_and_catch_a_bad_table(ckpt, reference):
    engine = tiny_engine(ckpt, debug_checks=True)
    check(engine.generate(prompts((17, 3)), GREEDY), reference)
    from kvpilot.worker.scheduler import Sequence

    seq = Sequence(prompts((20,))[0], GREEDY)
    engine.add(seq)
    engine.step()  # prefill
    bm = engine.scheduler.bm.primary
    bm._tables[seq.seq_id].pages[0] = bm.num_pages + 3  # what a bug would hand the kernel
    with pytest.raises(TableError, match="out of range"):
        engine.runner.decode([seq])
    bm._tables[seq.seq_id].pages[0] = 0
    engine.runner._h[4][0][0, 1] = 7  # a host row that is not the block manager's
    with pytest.raises(TableError, match="not the block manager's"):
        engine.runner.decode([seq])


def test_a_failing_batch_finishes_its_sequences_with_an_error(ckpt):
    engine = tiny_engine(ckpt)
    from kvpilot.worker.scheduler import Sequence

    seq = Sequence([1, 2, 3], GREEDY)
    engine.add(seq)
    engine.runner.prefill = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    (out,) = engine.step()
    assert out.finish_reason is FinishReason.ERROR and "boom" in out.error
    assert engine.scheduler.bm.num_used == 0 and not engine.has_work()


def test_stop_strings_end_the_text_before_them(ckpt, reference):
    engine = tiny_engine(ckpt)
    free = engine.generate([prompts((9,))[0]], GREEDY, detokenize=True)[0]
    text = engine.tokenizer.decode(free.output)
    assert len(text) >= 4
    stop = text[2:4]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))
    from kvpilot.worker.scheduler import Sequence

    seq = Sequence(list(free.prompt), params)
    engine.add(seq)
    pieces = []
    while True:
        outs = engine.step()
        pieces += [o.text for o in outs]
        if outs and outs[-1].finished:
            break
    assert outs[-1].finish_reason is FinishReason.STOP
    assert "".join(pieces) == text[:text.index(stop)]


def test_fp8_kv_cache_runs_and_its_first_token_is_exact(ckpt, reference):
    engine = tiny_engine(ckpt, kv_dtype="fp8")
    assert engine.runner.layers[0].key.dtype == torch.float8_e4m3fn
    seqs = engine.generate(prompts((17, 5)), GREEDY)
    for s in seqs:
        # The prompt's own K/V are used unquantized in prefill: the first token is exact.
        assert_greedy_matches(s.output[:1], s.prompt, reference.logits, TOL)
        assert s.num_output == GREEDY.max_tokens


def test_llama3_rope_frequencies_match_transformers(ckpt):
    modeling = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import AutoConfig

    cfg = load_config(ckpt)
    hf = AutoConfig.from_pretrained(ckpt)
    inv, _ = modeling.ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg), inv.float(), rtol=0, atol=0)


def test_matches_transformers_llama(ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    engine = tiny_engine(ckpt)
    seqs = engine.generate(prompts((16, 23)), GREEDY)

    def hf_logits(tokens):
        with torch.inference_mode():
            return hf(torch.tensor([tokens])).logits[0, -1].float()

    for s in seqs:
        assert_greedy_matches(s.output, s.prompt, hf_logits, TOL)
