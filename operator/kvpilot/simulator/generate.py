"""``python -m kvpilot.simulator.generate``: write a generated trace (JSONL) for Model
files; the shapes are those of ``kvpilot.simulator.trace.generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kvpilot.simulator.trace import Shape, Workload, generate, write_jsonl


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvpilot.simulator.generate MODEL.yaml... -o TRACE.jsonl``: a generated
    trace for the Models of the files, every model at ``--rate`` requests/s before the
    shape's factors, prompts and outputs within its context SLA."""
    import argparse

    from kvpilot.api.files import load_models

    ap = argparse.ArgumentParser(prog="python -m kvpilot.simulator.generate",
                                 description=main.__doc__)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s per model")
    ap.add_argument("--prompt", type=int, default=1024, help="median prompt tokens")
    ap.add_argument("--output-tokens", type=int, default=256, help="median output tokens")
    ap.add_argument("--long-share", type=float, default=0.02)
    ap.add_argument("--diurnal", type=float, default=0.0)
    ap.add_argument("--period", type=float, default=86400.0)
    ap.add_argument("--bursts-per-hour", type=float, default=0.0)
    ap.add_argument("--burst-factor", type=float, default=3.0)
    ap.add_argument("--burst-seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    models = [m for p in args.models for m in load_models(p)]
    work = [Workload(m.metadata.name, args.rate, m.spec.sla.context_tokens,
                     min(args.prompt, m.spec.sla.context_tokens // 4),
                     output=min(args.output_tokens, m.spec.sla.context_tokens // 4),
                     long_share=args.long_share) for m in models]
    shape = Shape(args.diurnal, args.period, args.bursts_per_hour, args.burst_factor,
                  args.burst_seconds)
    reqs = generate(work, args.duration, shape, args.seed)
    write_jsonl(args.output, reqs)
    print(f"{len(reqs)} requests -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
