"""Next tokens from float32 logits: greedy rows by argmax, the others by temperature,
top-k and top-p, each row with its own seeded generator when its request set a seed."""

from __future__ import annotations

import torch

from kvpilot.worker.scheduler import SamplingParams


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
               params: list[SamplingParams]) -> list[int]:
        tokens = logits.argmax(dim=-1)
        rows = [r for r, p in enumerate(params) if not p.greedy]
        if rows:
            out = tokens.clone()
            for r in rows:
                p = params[r]
                row = logits[r] / p.temperature
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
                out[r] = torch.multinomial(probs, 1, generator=self._generator_for(seq_ids[r], p))[0]
            tokens = out
        return tokens.tolist()
