"""The main job on an embedded default: a local cluster with a mixed GPU fleet, the example
Models applied through the real API server, and kvpilot's placement plan for them.

The plan is computed from what the API server holds (nodes with their GPU Feature
Discovery labels, Models after server-side defaulting), not from the local files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from e2e.cluster import Cluster, default_state, install_crds, log
from e2e.fleet import create_fleet

ROOT = Path(__file__).resolve().parents[1]
GPU_COLUMNS = "-Lnvidia.com/gpu.product,nvidia.com/gpu.count,nvidia.com/gpu.memory"


def fleet_from_cluster(cluster: Cluster) -> dict:
    """The cluster's GPU nodes as a fleet description (labels -> product, count, MiB)."""
    items = cluster.get("nodes")["items"]
    nodes = []
    for item in items:
        labels = item["metadata"].get("labels", {})
        if "nvidia.com/gpu.product" not in labels:
            continue
        nodes.append({
            "name": item["metadata"]["name"],
            "product": labels["nvidia.com/gpu.product"],
            "gpus": int(item["status"].get("allocatable", {}).get("nvidia.com/gpu", 0)),
            "memoryMiB": int(labels["nvidia.com/gpu.memory"]),
            "unschedulable": bool(item["spec"].get("unschedulable", False)),
        })
    return {"nodes": nodes}


def models_from_cluster(cluster: Cluster) -> list[dict]:
    items = cluster.get("models", "-A")["items"]
    return [{"apiVersion": m["apiVersion"], "kind": m["kind"],
             "metadata": {"name": m["metadata"]["name"],
                          "namespace": m["metadata"]["namespace"]},
             "spec": m["spec"]} for m in items]


def run(fleet: Path, models: list[Path], keep: bool) -> int:
    from kvpilot import cli

    cluster = Cluster(default_state("demo"))
    if cluster.running():
        log("a demo cluster is still running; stopping it first")
        cluster.down()
    cluster.up()
    try:
        install_crds(cluster, ROOT / "crds")
        nodes = create_fleet(cluster, fleet)
        log(f"created {len(nodes)} fake GPU nodes from {fleet}")
        for path in models:
            print(cluster.kubectl("apply", "-f", str(path)).stdout, end="")
        print()
        print(cluster.kubectl("get", "nodes", GPU_COLUMNS).stdout)
        print(cluster.kubectl("get", "models").stdout)
        workdir = cluster.state / "plan"
        workdir.mkdir(exist_ok=True)
        (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet_from_cluster(cluster)))
        (workdir / "models.yaml").write_text(yaml.safe_dump_all(models_from_cluster(cluster)))
        print("Placement plan for the Models and nodes in the cluster:\n")
        code = cli.main(["plan", str(workdir / "fleet.yaml"), str(workdir / "models.yaml")])
    finally:
        if keep:
            log(f"cluster left running; export KUBECONFIG={cluster.kubeconfig}; "
                "stop it with: python -m e2e.cluster --name demo down")
        else:
            cluster.down()
            log("cluster stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0])
    parser.add_argument("--fleet", type=Path, default=ROOT / "examples" / "fleets" / "mixed.yaml")
    parser.add_argument("models", nargs="*", type=Path,
                        default=sorted((ROOT / "examples").glob("*.yaml")))
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args(argv)
    try:
        return run(args.fleet, args.models, args.keep)
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError) as err:
        log(f"error: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
