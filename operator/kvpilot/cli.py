"""The ``kvpilot`` command.

``kvpilot plan FLEET.yaml MODEL.yaml...`` places the replicas of the Models on the fleet
with the same ``place()`` the operator uses, without a cluster, and prints the plan: per
node the GPUs and HBM in use and which replica holds what on each GPU; per model the
replicas placed, what one needs on each product, its KV capacity; for models with
sliding-window layers or latent attention, their KV cache beside what the plain GQA
formula would say; and for every replica that does not fit, why and what would make it
fit.

``kvpilot import SOURCE > MODEL.yaml`` writes a Model for a Hugging Face checkpoint:
its architecture from ``config.json`` (:mod:`kvpilot.api.checkpoint`), its weights'
bytes and dtype from the safetensors headers (never the tensors), and an SLA from
``--context`` and ``--concurrency``. SOURCE is a checkpoint directory, a ``config.json``
(the safetensors beside it give the weights), or ``hf://ORG/NAME[@REVISION]`` (config.json
and the safetensors metadata from the hub, which needs huggingface_hub, in the worker
extra; ``HF_ENDPOINT`` and ``HF_TOKEN`` apply). ``--weights-bytes`` or ``--parameters``
state the weights instead, for a config.json alone or weights in another format; their
dtype is ``--weights-dtype``, else config.json's ``torch_dtype``. Nothing is guessed: a
config.json with no weights facts is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

from kvpilot.operator.settings import Settings

WIDTH = 100
# Widest first columns of the tables; a longer name gets a line of its own above its row,
# so no name (Kubernetes allows 253 characters for a node) widens the table.
NODE_COLUMN = 24
PRODUCT_COLUMN = 30
MODEL_COLUMN = 24  # the header is then exactly 100 wide


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kvpilot", description="Memory-aware placement of LLM replicas on GPU nodes.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan = sub.add_parser(
        "plan", help="place Model replicas on a fleet offline and print the plan",
        description="Place the replicas of MODEL files on the nodes of FLEET by HBM "
                    "(weights + KV cache for each model's context SLA) and print the plan.")
    plan.add_argument("fleet", metavar="FLEET.yaml", type=Path, help="fleet description")
    plan.add_argument("models", metavar="MODEL.yaml", type=Path, nargs="+",
                      help="Model files (several documents per file allowed)")
    plan.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    plan.add_argument("--policy", choices=("pack", "spread"), default="pack",
                      help="pack: fewest GPUs with load (default); spread: most headroom")
    plan.add_argument("--reserve", type=_fraction, default=0.0, metavar="FRACTION",
                      help="fraction of every GPU's HBM kept free (default 0)")
    plan.add_argument("--spread", choices=("gpu", "node", "none"),
                      help="plan every Model as if its spec.placement.spread were this "
                           "(default: each Model's own, as the operator does; node when "
                           "absent)")
    plan.add_argument("--spread-replicas", action="store_const", const="node",
                      dest="spread", help="the same as --spread node (kept for scripts)")
    plan.add_argument("--all-models", action="store_true",
                      help="plan every Model as placement alone allows, also those kvpilot's "
                           "worker does not serve (by default the plan is the operator's, "
                           "which lists those as not served)")
    plan.add_argument("--mode", choices=("dra", "devicePlugin"), default="dra",
                      help="as the operator's placement.mode: dra shares GPUs by HBM budget "
                           "(default); devicePlugin gives each replica whole GPUs")
    reserved = Settings.model_fields["reserved_pods_per_node"].default
    plan.add_argument("--reserved-pods", type=_count, default=reserved, metavar="N",
                      help="pods a node with maxPods keeps for other workloads, as the "
                           f"operator's reservedPodsPerNode (default {reserved})")
    plan.set_defaults(run=_plan)
    add_import_arguments(sub.add_parser(
        "import", help="write a Model for a Hugging Face checkpoint (YAML on stdout)",
        description="Describe a checkpoint as a Model: the architecture from config.json, "
                    "the weights' bytes and dtype from the safetensors headers, the SLA "
                    "from the flags. Validated before it is printed."))
    operator = sub.add_parser(
        "operator", help="run the operator (out of cluster with a kubeconfig, or in a pod)",
        description="Place Model replicas on the cluster's GPUs and run their worker pods.")
    from kvpilot.operator.main import add_arguments

    add_arguments(operator)
    operator.set_defaults(run=_operator)
    router = sub.add_parser(
        "router", help="run the router: one OpenAI endpoint for every Model of the fleet",
        description="Route OpenAI requests by model to ready replicas, by prefix affinity, "
                    "load and KV pressure.")
    from kvpilot.router.main import add_arguments as add_router_arguments

    add_router_arguments(router)
    router.set_defaults(run=_router)
    simulate = sub.add_parser(
        "simulate", help="replay a request trace through placement and autoscaling offline",
        description="Simulate the fleet serving a request trace with kvpilot's placement "
                    "and autoscaling, count-based scheduling and a static fleet; print "
                    "GPU-hours, SLA attainment and rejections.")
    from kvpilot.simulator.cli import add_arguments as add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(run=_simulate)
    return top


def add_import_arguments(imp: argparse.ArgumentParser) -> None:
    from kvpilot.api.checkpoint import DEFAULT_CONCURRENCY, DEFAULT_CONTEXT

    imp.add_argument("checkpoint", metavar="SOURCE",
                     help="a checkpoint directory, its config.json, or hf://ORG/NAME[@REVISION]")
    imp.add_argument("--name", help="the Model's name (default: from the repository or "
                     "directory name, e.g. llama-3-1-8b-instruct)")
    imp.add_argument("--context", type=_positive, metavar="N",
                     help="sla.contextTokens (default: the model's longest context, at most "
                          f"{DEFAULT_CONTEXT})")
    imp.add_argument("--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, metavar="N",
                     help=f"sla.concurrentSequences (default {DEFAULT_CONCURRENCY})")
    imp.add_argument("--kv-cache-dtype", choices=("bf16", "fp16", "fp8"), default="bf16",
                     help="spec.kvCacheDtype (default bf16)")
    imp.add_argument("--source", metavar="URI",
                     help="spec.source, where the operator gets the weights (e.g. "
                          "pvc://models/llama); default: SOURCE when it is hf://, else none")
    facts = imp.add_mutually_exclusive_group()
    facts.add_argument("--weights-bytes", type=_positive, metavar="N",
                       help="the weights' size, instead of reading the safetensors")
    facts.add_argument("--parameters", type=_positive, metavar="N",
                       help="the parameter count, instead of reading the safetensors")
    imp.add_argument("--weights-dtype", choices=("fp32", "bf16", "fp16", "fp8", "int8", "int4"),
                     help="with --weights-bytes or --parameters: the weights' dtype "
                          "(default: config.json's torch_dtype)")
    imp.set_defaults(run=_import)


def _import(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from kvpilot.api import checkpoint
    from kvpilot.api.files import one_line
    from kvpilot.api.model import Model
    from kvpilot.api.source import parse_source

    if args.weights_dtype and args.weights_bytes is None and args.parameters is None:
        raise ValueError("--weights-dtype goes with --weights-bytes or --parameters (the "
                         "safetensors state their own dtype)")
    source = args.source
    if source is not None:
        parse_source(source)  # ValueError with the scheme's message
    if args.checkpoint.startswith("hf://"):
        hub = parse_source(args.checkpoint)
        config, weights = _from_hub(hub, read_weights=not _stated(args))
        source = source or str(hub)
        derived = hub.location.split("/")[1]
    else:
        config, weights, derived = _from_path(Path(args.checkpoint), read_weights=not _stated(args))
    architecture = checkpoint.architecture_from_config(config)
    if _stated(args):
        weights = _stated_weights(args, config)
    elif weights["dtype"] is None:
        raise ValueError(f"the safetensors hold mostly {weights['safetensorsDtype']} tensors, "
                         "a dtype no Model names: give --weights-bytes and --weights-dtype")
    else:
        weights = {"bytes": weights["bytes"], "dtype": weights["dtype"]}
    doc = checkpoint.model_document(
        name=args.name or checkpoint.model_name(derived), architecture=architecture,
        weights=weights, source=source, context=args.context, concurrency=args.concurrency,
        kv_cache_dtype=args.kv_cache_dtype)
    try:
        Model.model_validate(doc)
    except ValidationError as err:
        raise ValueError(f"the Model for {args.checkpoint} is not valid: {one_line(err)}") from err
    if source is None:
        print("kvpilot import: no spec.source (a local checkpoint); give --source (e.g. "
              "pvc://CLAIM/PATH or host:///PATH) for the operator to mount it", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, width=WIDTH))
    return 0


def _stated(args: argparse.Namespace) -> bool:
    return args.weights_bytes is not None or args.parameters is not None


def _stated_weights(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    from kvpilot.api.checkpoint import config_dtype

    dtype = args.weights_dtype or config_dtype(config)
    if dtype is None:
        raise ValueError("config.json states no torch_dtype: give --weights-dtype")
    if args.weights_bytes is not None:
        return {"bytes": args.weights_bytes, "dtype": dtype}
    return {"parameters": args.parameters, "dtype": dtype}


def _from_path(path: Path, read_weights: bool) -> tuple[dict[str, Any], Any, str]:
    """config.json, the weights (None unless ``read_weights``) and the name to derive a
    Model name from, for a checkpoint directory or its config.json."""
    from kvpilot.api.checkpoint import CheckpointUnreadable, read_config, weights_from_directory

    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    directory = path if path.is_dir() else path.parent
    config = read_config(path)
    weights = None
    if read_weights:
        try:
            weights = weights_from_directory(directory)
        except CheckpointUnreadable as err:
            raise ValueError(f"{err}; give --weights-bytes or --parameters (and "
                             "--weights-dtype) to state the weights") from err
    return config, weights, directory.resolve().name


def _from_hub(hub, read_weights: bool) -> tuple[dict[str, Any], Any]:
    """config.json and the weights (None unless ``read_weights``) of an hf:// source,
    from the hub (the safetensors metadata: the files' headers, fetched by range)."""
    from kvpilot.api.checkpoint import read_config, weights_from_headers

    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError as err:
        raise ValueError(f"importing {hub} needs huggingface_hub (pip install "
                         "'kvpilot[worker]'), or download the checkpoint and import its "
                         "directory") from err
    try:
        config_path = hf_hub_download(hub.location, "config.json", revision=hub.revision)
        metadata = (HfApi().get_safetensors_metadata(hub.location, revision=hub.revision)
                    if read_weights else None)
    except Exception as err:  # noqa: BLE001 - the hub's errors, one line each
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read {hub} from the hub: {type(err).__name__}: {first}") from err
    config = read_config(config_path)
    if metadata is None:
        return config, None
    headers = [{name: {"dtype": t.dtype, "data_offsets": list(t.data_offsets)}
                for name, t in f.tensors.items()} for f in metadata.files_metadata.values()]
    return config, weights_from_headers(headers)


def _simulate(args: argparse.Namespace) -> int:
    from kvpilot.simulator.cli import run

    return run(args)


def _operator(args: argparse.Namespace) -> int:
    from kvpilot.operator.main import main

    return main(args)


def _router(args: argparse.Namespace) -> int:
    from kvpilot.router.main import main

    return main(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input files: one line, no traceback
        print(f"kvpilot {args.command}: {err}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from kvpilot.api.files import load_models
    from kvpilot.api.fleet import load_fleet
    from kvpilot.operator.placement import (
        Policy, demands_from_models, place, snapshot_from_fleet,
    )

    fleet = load_fleet(args.fleet)
    models = [m for path in args.models for m in load_models(path)]
    kind = Policy.pack if args.policy == "pack" else Policy.spread
    options: dict[str, Any] = {"reserve": args.reserve, "share_gpus": args.mode == "dra",
                               "worker_limits": not args.all_models}
    policy = kind(**options)
    snapshot = snapshot_from_fleet(fleet.expand(), args.reserved_pods)
    demands, refused = demands_from_models(models, snapshot, policy,
                                           worker_limits=not args.all_models,
                                           spread=args.spread)
    plan = place(snapshot, demands, policy)
    if args.output == "table":
        sys.stdout.write(render_table(plan, demands, refused))
    else:
        data = {**plan.to_dict(), "models": model_summary(plan, demands, refused)}
        if args.output == "json":
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
        else:
            import yaml
            sys.stdout.write(yaml.safe_dump(data, sort_keys=False, width=WIDTH))
    return 0


def model_summary(plan, demands, refused) -> list[dict[str, Any]]:
    """Per Model: what was asked, placed and why not; a Model the operator would start
    no worker for says so in ``refused``, with nothing placed."""
    out: list[dict[str, Any]] = [{"name": name, "replicas": r.replicas, "placed": 0,
                                  "refused": r.reason} for name, r in refused.items()]
    crowded = {c.model: c for c in plan.crowded}
    for d in demands:
        reasons: list[str] = []
        for u in plan.unplaced:
            if u.model == d.model and u.reason not in reasons:
                reasons.append(u.reason)
        c = crowded.get(d.model)
        out.append({
            "name": d.model,
            "replicas": d.replicas,
            "placed": plan.placed(d.model),
            "spread": d.spread,
            "notSpread": None if c is None else {"sharing": c.sharing, "reason": c.reason},
            "perReplica": {
                p: {"tensorParallel": r.tp, "hbmPerGpu": r.hbm_per_gpu, "kvTokens": r.kv_tokens,
                    "stepBytes": r.step_bytes, "stepBudget": r.step_budget}
                for p, r in sorted(d.requirements.items())
            },
            "unfit": dict(sorted(d.unfit.items())),
            "reasons": reasons,
            **_kv_figures(d),
        })
    return out


def _kv_figures(demand) -> dict[str, int]:
    """KV bytes of one sequence at the SLA's context, whole replica (TP 1): the memory
    model's and the plain GQA formula's."""
    from kvpilot.api.memory import kv_bytes_per_sequence, naive_kv_bytes_per_sequence

    spec = demand.spec
    if spec is None:
        return {}
    arch, dtype, context = spec.architecture, spec.kv_cache_dtype, spec.sla.context_tokens
    return {"kvBytesPerSequence": kv_bytes_per_sequence(arch, dtype, context),
            "naiveKvBytesPerSequence": naive_kv_bytes_per_sequence(arch, dtype, context)}


def _kv_against_naive(demands, model_w: int) -> list[str]:
    """A line per model whose attention caches less than the plain GQA formula says."""
    from kvpilot.api.memory import local_layers

    rows = []
    for d in demands:
        figures = _kv_figures(d)
        if not figures or figures["kvBytesPerSequence"] == figures["naiveKvBytesPerSequence"]:
            continue
        arch, sla = d.spec.architecture, d.spec.sla
        why = []
        if arch.mla is not None:
            why.append(f"latent {arch.mla.kv_lora_rank} + RoPE key {arch.mla.qk_rope_head_dim}")
        if arch.sliding_window is not None:
            local = local_layers(arch)
            which = "every layer" if local == arch.layers else f"{local} of {arch.layers} layers"
            why.append(f"{which} local, window {arch.sliding_window.tokens:,}")
        own, first = _first_cells([(d.model, model_w)])
        rows.extend(own)
        seqs = sla.concurrent_sequences
        rows.extend(_wrap(
            f"{first}  {seqs} x {sla.context_tokens:,} tokens: "
            f"{_gib(figures['kvBytesPerSequence'] * seqs)} GiB vs "
            f"{_gib(figures['naiveKvBytesPerSequence'] * seqs)} GiB ({'; '.join(why)})", 0))
    if not rows:
        return []
    return ["", "KV CACHE OF ONE REPLICA AT TP 1: BY ITS ATTENTION vs 2 x LAYERS x KV HEADS x "
            "HEAD DIM x TOKENS", *rows]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def _ranges(gpus: Sequence[int]) -> str:
    """0,1,2,3,6 -> '0-3,6'."""
    runs: list[list[int]] = []
    for g in sorted(gpus):
        if runs and g == runs[-1][1] + 1:
            runs[-1][1] = g
        else:
            runs.append([g, g])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _ms(seconds: Optional[float]) -> str:
    """A decode step as people read it; '?' where the GPU's bandwidth is unknown."""
    return "?" if seconds is None else f"{seconds * 1000:.1f} ms"


def _wrap(text: str, indent: int) -> list[str]:
    lines = textwrap.wrap(text, WIDTH, initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + 2), break_on_hyphens=False,
                          break_long_words=False)
    return [line.replace("\u00a0", " ") for line in lines]


def _first_cells(cells: list[tuple[str, int]]) -> tuple[list[str], str]:
    """Leading cells padded to their widths; when one is longer than its width, the
    cells go on a line of their own (wrapped) and the row starts blank."""
    if all(len(text) <= width for text, width in cells):
        return [], "  ".join(f"{text:<{width}}" for text, width in cells)
    own = _wrap("  ".join(text for text, _ in cells), 0)
    return own, "  ".join(" " * width for _, width in cells)


def render_table(plan, demands, refused) -> str:
    """The plan for people, at most 100 columns wide."""
    lines: list[str] = []
    by_gpu: dict[tuple[str, int], list[str]] = {}
    for a in plan.assignments:
        for g in a.gpus:
            # A no-break space keeps "replica size" together when the line wraps.
            by_gpu.setdefault((a.node, g), []).append(f"{a.replica}\u00a0{_gib(a.hbm_per_gpu)}")
    name_w = min(NODE_COLUMN, max([4] + [len(n.name) for n in plan.nodes]))
    prod_w = min(PRODUCT_COLUMN, max([7] + [len(n.product) for n in plan.nodes]))
    lines.append(f"{'NODE':<{name_w}}  {'PRODUCT':<{prod_w}}  {'GPUS':>5}  "
                 f"{'HBM USED':>9}  {'HBM FREE':>9}  (GiB)")
    for n in plan.nodes:
        used = sum(n.used)
        free = n.gpu_capacity * len(n.used) - used
        state = "" if n.schedulable else "  unschedulable"
        own, first = _first_cells([(n.name, name_w), (n.product, prod_w)])
        lines.extend(own)
        lines.append(f"{first}  "
                     f"{f'{n.gpus_in_use}/{len(n.used)}':>5}  {_gib(used):>9}  {_gib(free):>9}"
                     f"{state}")
        for g, u in enumerate(n.used):
            tenants = by_gpu.get((n.name, g))
            if tenants:
                step = n.step_seconds[g] if g < len(n.step_seconds) else None
                lines.extend(_wrap(f"GPU {g}  {_gib(u)}/{_gib(n.gpu_capacity)}  {_ms(step)}:  "
                                   + ", ".join(tenants), 2))
    lines.append("")
    model_w = min(MODEL_COLUMN, max([5] + [len(d.model) for d in demands]))
    lines.append(f"{'MODEL':<{model_w}}  {'PLACED':>7}  {'KV TOKENS/REPLICA':>17}  "
                 "PER REPLICA (TP x HBM PER GPU, BY GPU PRODUCT)")
    for d in demands:
        groups: dict[tuple[int, int], list[str]] = {}
        for p, r in sorted(d.requirements.items()):
            groups.setdefault((r.tp, r.hbm_per_gpu), []).append(p)
        per = "; ".join(f"{tp} x {_gib(hbm)} GiB on {', '.join(ps)}"
                        for (tp, hbm), ps in groups.items()) or "fits no GPU product of the fleet"
        kv = max((r.kv_tokens for r in d.requirements.values()), default=0)
        own, first = _first_cells([(d.model, model_w)])
        lines.extend(own)
        head = f"{first}  {f'{plan.placed(d.model)}/{d.replicas}':>7}  {kv:>17,}  "
        body = textwrap.wrap(per, WIDTH - len(head), break_on_hyphens=False,
                             break_long_words=False) or [""]
        if max(map(len, body)) > WIDTH - len(head):  # a product name wider than the column
            lines.append(head.rstrip())
            lines.extend(_wrap(per, 4))
        else:
            lines.append(head + body[0])
            lines.extend(" " * len(head) + b for b in body[1:])
    lines.extend(_kv_against_naive(demands, model_w))
    if plan.assignments:
        lines.append("")
        replica_w = min(MODEL_COLUMN, max(len(a.replica) for a in plan.assignments))
        node_w = min(NODE_COLUMN, max(len(a.node) for a in plan.assignments))
        lines.append(f"{'REPLICA':<{replica_w}}  {'NODE':<{node_w}}  {'GPUS':<11}  "
                     f"{'DECODE STEP':>11}  {'KV TOKENS':>11}  {'KV CAPACITY':>11}")
        for a in plan.assignments:
            own, first = _first_cells([(a.replica, replica_w), (a.node, node_w)])
            lines.extend(own)
            gpus = _ranges(a.gpus)
            lines.append(f"{first}  {gpus:<11}  {_ms(a.step_seconds):>11}  "
                         f"{a.kv_tokens:>11,}  {a.kv_capacity:>11,}")
    if plan.unplaced:
        lines.append("")
        lines.append("NOT PLACED")
        groups_u: dict[tuple[str, str], list[str]] = {}
        for u in plan.unplaced:
            groups_u.setdefault((u.model, u.reason), []).append(u.replica)
        for (model, reason), names in groups_u.items():
            who = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
            lines.extend(_wrap(f"{who}: {reason}", 0))
    if plan.crowded:
        lines += ["", "NOT SPREAD (replicas that share what their spread keeps apart)"]
        for c in plan.crowded:
            domain = "node" if c.spread == "node" else "GPU"
            lines.extend(_wrap(f"{c.model}: {c.sharing} of {c.replicas} replicas share a "
                               f"{domain}; {c.reason}", 0))
    if refused:
        lines += ["", "NOT SERVED (the operator starts no worker for these Models: "
                  "WorkerUnsupported)"]
        for name, r in refused.items():
            lines.extend(_wrap(f"{name} ({r.replicas} replicas): {r.reason}", 0))
    lines.append("")
    shared = len(plan.shared_gpus)
    total_gpus = sum(len(n.used) for n in plan.nodes)
    placed = len(plan.assignments)
    not_served = sum(r.replicas for r in refused.values())
    lines.append(f"GPUs with load: {plan.gpus_used} of {total_gpus} ({shared} shared); "
                 f"replicas placed: {placed} of {placed + len(plan.unplaced) + not_served}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
