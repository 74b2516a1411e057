"""Request traces: the JSONL format, the Azure LLM inference CSV, and generators.

A trace is one request per line, in arrival order::

    {"t": 0.25, "model": "llama-3-8b", "prompt": 1873, "output": 211}

``t``: arrival in seconds from the start of the trace; ``model``: the Model's
``metadata.name``; ``prompt`` and ``output``: tokens of the prompt and tokens the request
generates (a simulated request always runs to ``output``: the trace says how long the
answer was). Blank lines and lines starting with ``#`` are skipped; unknown keys are
ignored, so a trace may carry its own annotations.

Azure's public LLM inference traces (``AzureLLMInferenceTrace_{code,conv}.csv``) are CSV
with the columns ``TIMESTAMP,ContextTokens,GeneratedTokens``; :func:`read_azure_csv`
reads them and gives every row a model (one, or drawn by weight with a seed), since the
traces name none.

The generators build the shapes a fleet meets: a diurnal ramp, bursts (a model's rate
multiplied for a few minutes), and a long-context tail (a small share of prompts near
the model's context). Arrivals are a non-homogeneous Poisson process drawn by thinning,
prompt lengths lognormal, all from one ``random.Random(seed)``: the same arguments give
the same trace.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Request:
    t: float  # arrival, seconds from the start of the trace
    model: str
    prompt: int  # prompt tokens
    output: int  # tokens generated

    def to_json(self) -> str:
        return json.dumps({"t": round(self.t, 6), "model": self.model, "prompt": self.prompt,
                           "output": self.output})


def _request(obj: object, where: str) -> Request:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a request is a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("t", "model", "prompt", "output") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    t, model, prompt, output = obj["t"], obj["model"], obj["prompt"], obj["output"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: t must be a number of seconds >= 0, got {t!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: model must be a non-empty string, got {model!r}")
    for key, value, least in (("prompt", prompt, 1), ("output", output, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{where}: {key} must be an integer >= {least}, got {value!r}")
    return Request(float(t), model, prompt, output)


def read_jsonl(path: str | Path) -> list[Request]:
    """A JSONL trace, sorted by arrival (stable: equal times keep their file order)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not JSON: {err.msg}") from None
            out.append(_request(obj, f"{path}:{i}"))
    out.sort(key=lambda r: r.t)
    return out


def write_jsonl(path: str | Path, requests: Iterable[Request], header: str = "") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in header.splitlines():
            f.write(f"# {line}\n")
        for r in requests:
            f.write(r.to_json() + "\n")


def _azure_time(text: str) -> float:
    """Seconds since the epoch of an Azure trace timestamp, e.g. ``2023-11-16
    18:15:46.6805900`` (7 fraction digits, more than ``datetime`` parses)."""
    text = text.strip()
    head, _, frac = text.partition(".")
    base = datetime.fromisoformat(head)
    return base.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def read_azure_csv(path: str | Path, models: Mapping[str, float] | Sequence[str],
                   seed: int = 0) -> list[Request]:
    """An Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Times become seconds from the first row. Each row gets a model from ``models``: the
    one name given, or one drawn by weight (a mapping name -> weight) with ``seed``.
    Rows with no generated tokens (the trace has some) generate one.
    """
    weights = dict(models) if isinstance(models, Mapping) else {m: 1.0 for m in models}
    if not weights:
        raise ValueError("read_azure_csv: name at least one model")
    names, cum = list(weights), []
    total = 0.0
    for n in names:
        total += weights[n]
        cum.append(total)
    rng = random.Random(seed)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns {', '.join(sorted(need))}, "
                             f"got {reader.fieldnames}")
        for i, row in enumerate(reader, 2):
            try:
                at = _azure_time(row["TIMESTAMP"])
                prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{i}: {err}") from None
            rows.append((at, max(1, prompt), max(1, output)))
    rows.sort(key=lambda r: r[0])
    if not rows:
        return []
    start = rows[0][0]
    out = []
    for at, prompt, output in rows:
        if len(names) == 1:
            model = names[0]
        else:
            x = rng.random() * total
            model = names[next(i for i, c in enumerate(cum) if x < c)]
        out.append(Request(at - start, model, prompt, output))
    return out


# --- generators ------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One model's share of a generated trace.

    ``rate``: mean requests/s before the diurnal and burst factors. Prompt tokens are
    lognormal around ``prompt`` (median) with shape ``prompt_sigma``, output tokens
    likewise; a ``long_share`` of the requests instead get a prompt drawn uniformly from
    the top quarter of what ``context`` leaves after the output (the long-context tail).
    Prompt + output never exceed ``context``.
    """

    model: str
    rate: float
    context: int
    prompt: int = 1024
    prompt_sigma: float = 0.8
    output: int = 256
    output_sigma: float = 0.6
    long_share: float = 0.0


@dataclass(frozen=True)
class Shape:
    """How the rate moves over time, for every model alike except the bursts.

    Diurnal: the rate times ``1 + diurnal x sin(2 pi (t / period - 1/4))``, so a trace
    starts at its trough and peaks at half a period. Bursts: per model, bursts start as
    a Poisson process of ``bursts_per_hour``; each multiplies that model's rate by
    ``burst_factor`` for ``burst_seconds``.
    """

    diurnal: float = 0.0
    period: float = 86400.0
    bursts_per_hour: float = 0.0
    burst_factor: float = 3.0
    burst_seconds: float = 300.0

    def factor(self, t: float) -> float:
        return 1.0 + self.diurnal * math.sin(2 * math.pi * (t / self.period - 0.25))


@dataclass
class _Bursts:
    spans: list[tuple[float, float]] = field(default_factory=list)

    def active(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.spans)


def _lognormal(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(median * math.exp(sigma * rng.gauss(0.0, 1.0)))))


def generate(workloads: Sequence[Workload], duration: float, shape: Shape = Shape(),
             seed: int = 0) -> list[Request]:
    """A trace of ``duration`` seconds for ``workloads``; the same arguments give the
    same trace. Models draw from one generator in the order given."""
    rng = random.Random(seed)
    out: list[Request] = []
    top = (1.0 + shape.diurnal) * max(1.0, shape.burst_factor)
    for w in workloads:
        if w.rate <= 0:
            continue
        bursts = _Bursts()
        if shape.bursts_per_hour > 0:
            t = rng.expovariate(shape.bursts_per_hour / 3600)
            while t < duration:
                bursts.spans.append((t, t + shape.burst_seconds))
                t += shape.burst_seconds + rng.expovariate(shape.bursts_per_hour / 3600)
        bound = w.rate * top  # thinning: draw at the highest rate, keep by the true one
        t = 0.0
        while True:
            t += rng.expovariate(bound)
            if t >= duration:
                break
            rate = w.rate * shape.factor(t) * (shape.burst_factor if bursts.active(t) else 1.0)
            if rng.random() * bound >= rate:
                continue
            output = _lognormal(rng, w.output, w.output_sigma, 1, max(1, w.context // 2))
            room = w.context - output
            if w.long_share > 0 and rng.random() < w.long_share:
                prompt = rng.randint(max(1, (3 * room) // 4), room)
            else:
                prompt = _lognormal(rng, w.prompt, w.prompt_sigma, 1, room)
            out.append(Request(t, w.model, prompt, output))
    out.sort(key=lambda r: r.t)
    return out

