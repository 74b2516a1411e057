"""``kvpilot simulate FLEET.yaml MODEL.yaml... --trace TRACE``: the command's arguments
and what it does; ``kvpilot.cli`` only registers it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

STRATEGIES = ("kvpilot", "count-based", "static-peak")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fleet", metavar="FLEET.yaml", type=Path, help="fleet description")
    p.add_argument("models", metavar="MODEL.yaml", type=Path, nargs="+",
                   help="Model files (several documents per file allowed)")
    p.add_argument("--trace", type=Path, required=True,
                   help="requests: JSONL (t, model, prompt, output) or an Azure LLM "
                        "inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    p.add_argument("--azure-models", metavar="NAME[=WEIGHT],...",
                   help="for a CSV trace: the models its rows go to (default: every model "
                        "given, equally)")
    p.add_argument("--seed", type=int, default=0, help="draws models for CSV rows")
    p.add_argument("--strategy", action="append", choices=STRATEGIES,
                   help="run only these (repeatable; default: all three; static-peak "
                        "needs kvpilot, whose peak replicas it keeps all along)")
    p.add_argument("--startup-seconds", type=float, default=None,
                   help="every start takes this long, pod created to serving (default: "
                        "download when the node lacks the weights, load, graph capture)")
    p.add_argument("--scrape-seconds", type=float, default=15.0,
                   help="scrape and autoscaling interval (default 15)")
    p.add_argument("--drain-timeout-seconds", type=float, default=120.0)
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences per batch, unless a Model's engineArgs say (default 64)")
    p.add_argument("--target-requests", type=float, default=None,
                   help="count-based: active requests per replica (default: each Model's "
                        "concurrentSequences x its KV-pressure target)")
    p.add_argument("--window-seconds", type=float, default=60.0,
                   help="count-based: moving-average window (default 60)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="write PNG plots there (needs matplotlib: kvpilot[sim])")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _azure_models(text: Optional[str], names: list[str]) -> dict[str, float]:
    if not text:
        return {n: 1.0 for n in names}
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--azure-models: not a weight: {weight!r}") from None
    return out


def progress_bar(label: str, stream=sys.stderr) -> Callable[[int, int], None]:
    """A one-line bar redrawn in place: requests replayed of the trace."""
    started = time.monotonic()

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(1, total)
        stream.write(f"\r{label:<12} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total} requests, {time.monotonic() - started:.0f}s")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


def run(args: argparse.Namespace) -> int:
    from kvpilot.api.files import load_models
    from kvpilot.api.fleet import load_fleet
    from kvpilot.operator.placement import snapshot_from_fleet
    from kvpilot.simulator.engine import Settings, count_based, kvpilot, simulate, static
    from kvpilot.simulator.report import plot, summarize, table
    from kvpilot.simulator.trace import read_azure_csv, read_jsonl

    nodes = snapshot_from_fleet(load_fleet(args.fleet).expand()).nodes
    models = [m for path in args.models for m in load_models(path)]
    names = [m.metadata.name for m in models]
    if args.trace.suffix.lower() == ".csv":
        requests = read_azure_csv(args.trace, _azure_models(args.azure_models, names),
                                  args.seed)
    else:
        requests = read_jsonl(args.trace)
    settings = Settings(startup_seconds=args.startup_seconds,
                        scrape_seconds=args.scrape_seconds,
                        drain_timeout_seconds=args.drain_timeout_seconds,
                        max_num_seqs=args.max_num_seqs)
    chosen = args.strategy or list(STRATEGIES)
    if "static-peak" in chosen and "kvpilot" not in chosen:
        raise ValueError("static-peak keeps kvpilot's peak replicas: run kvpilot too")
    show = not args.no_progress and sys.stderr.isatty()
    results = []
    peak = None
    for name in STRATEGIES:
        if name not in chosen:
            continue
        if name == "kvpilot":
            strategy = kvpilot()
        elif name == "count-based":
            target = None if args.target_requests is None else {
                n: args.target_requests for n in names}
            strategy = replace(count_based(target), window_seconds=args.window_seconds)
        else:
            strategy = static(peak or {})
        result = simulate(nodes, models, requests, strategy, settings,
                          progress_bar(name) if show else None)
        if name == "kvpilot":
            peak = result.peak_replicas
        results.append(result)
    summaries = [summarize(r) for r in results]
    if args.output == "json":
        sys.stdout.write(json.dumps([s.to_dict() for s in summaries], indent=2) + "\n")
    else:
        hours = max(s.hours for s in summaries) if summaries else 0.0
        sys.stdout.write(f"{len(requests)} requests, {len(models)} models, {len(nodes)} nodes, "
                         f"{hours:.2f} h simulated\n")
        sys.stdout.write(table(summaries))
    if args.plots is not None:
        for path in plot(results, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0
