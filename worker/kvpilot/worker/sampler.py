"""Next tokens from float32 logits: greedy rows by argmax, the others by temperature,
top-k and top-p, each row with its own seeded generator when its request set a seed.

A row that cannot be sampled fails alone (vLLM aborts the one request whose sampling
fails): logits that are NaN, +inf or all -inf, or that overflow once divided by the
temperature, never reach ``torch.multinomial``, which raises on them on the CPU and
trips a device-side assert on CUDA (after which no kernel of the process runs). A
temperature below ``MIN_TEMPERATURE`` samples at ``MIN_TEMPERATURE``, as vLLM does: a
positive temperature of 1e-40 is a request for near-greedy sampling, not for infinities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpilot.worker.scheduler import SamplingParams

MIN_TEMPERATURE = 1e-2
NOT_FINITE = "the logits of this sequence are not finite (NaN or infinite)"


@dataclass
class Sampled:
    """One token per row. ``failed`` maps each row that could not be sampled to why; its
    token is -1. The other rows' tokens are good."""

    tokens: list[int]
    failed: dict[int, str]


class Sampler:
    def __init__(self, device, seed: int = 0):
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._seeded: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self._seeded.pop(seq_id, None)

    def _generator_for(self, seq_id: int, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._generator
        if seq_id not in self._seeded:
            self._seeded[seq_id] = torch.Generator(device=self.device).manual_seed(params.seed)
        return self._seeded[seq_id]

    def sample(self, logits: torch.Tensor, seq_ids: list[int],
               params: list[SamplingParams]) -> Sampled:
        tokens = logits.argmax(dim=-1)
        # amax propagates NaN: a row is good when its largest logit is finite.
        good = torch.isfinite(logits.amax(dim=-1))
        failed: dict[int, str] = {}
        rows = [r for r, p in enumerate(params) if not p.greedy]
        if rows:
            temps = torch.tensor([max(params[r].temperature, MIN_TEMPERATURE) for r in rows],
                                 dtype=logits.dtype, device=logits.device)
            scaled = logits[rows] / temps[:, None]
            good[rows] &= torch.isfinite(scaled.amax(dim=-1))
            sampleable = good.tolist()  # one sync for the batch, before any multinomial
            tokens = tokens.clone()
            for i, r in enumerate(rows):
                if not sampleable[r]:
                    continue
                p = params[r]
                row = scaled[i]
                try:
                    if p.top_k > 0:
                        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                        row = row.masked_fill(row < kth, float("-inf"))
                    if p.top_p < 1.0:
                        sorted_logits, order = row.sort(descending=True)
                        probs = sorted_logits.softmax(-1)
                        # Drop tokens once the mass before them reaches top_p (the first stays).
                        drop = probs.cumsum(-1) - probs >= p.top_p
                        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
                    probs = row.softmax(-1)
                    gen = self._generator_for(seq_ids[r], p)
                    tokens[r] = torch.multinomial(probs, 1, generator=gen)[0]
                except RuntimeError as err:  # a row's trouble stays with its row
                    failed[r] = f"sampling failed: {err}"
                    good[r] = False
        values = torch.where(good, tokens, -1).tolist()
        for r, token in enumerate(values):
            if token < 0:
                failed.setdefault(r, NOT_FINITE)
        return Sampled(values, failed)
