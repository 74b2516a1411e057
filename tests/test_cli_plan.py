"""`kvpilot plan FLEET.yaml MODEL.yaml...`: the table, JSON and YAML, and bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from kvpilot.cli import main
from tests.conftest import EXAMPLES

FLEET = EXAMPLES / "fleets" / "mixed.yaml"
MODELS = sorted(EXAMPLES.glob("*.yaml"))


def run(capsys, *args):
    code = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_for_the_examples(capsys):
    code, out, err = run(capsys, FLEET, *MODELS)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split() == ["NODE", "PRODUCT", "GPUS", "HBM", "USED", "HBM", "FREE", "(GiB)"]
    assert lines[1].split()[:3] == ["h100-0", "NVIDIA-H100-80GB-HBM3", "8/8"]
    # Llama-3.1-70B (fp8 KV, 8 x 32K, TTFT 2 s): a 32K prefill takes 3.0 s at TP 4 on
    # H100, 1.5 s at TP 8, so TP 8 with 23.4 GiB on each GPU. Beside it on GPU 0, a
    # Llama-3-8B and a Qwen2.5-0.5B replica: 33.2 + 23.0 + 2.2 GB per decode step at
    # 2.85 TB/s, + 2 ms.
    assert ("  GPU 0  59.4/79.6  22.5 ms:  llama-3-8b-0 33.0, llama-3-1-70b-0 23.4, "
            "qwen2-5-0-5b-0 3.0") in lines
    model_rows = {line.split()[0]: line.split() for line in lines if line[:1].isalpha()}
    assert model_rows["llama-3-8b"][1:3] == ["2/2", "131,072"]
    assert model_rows["llama-3-1-70b"][1:4] == ["1/1", "262,144", "8"]
    # Per replica: its GPUs, the decode step of its slowest GPU with every tenant busy
    # (TP 8 adds two all-reduces per layer: 80 x 2 x 10 us = 1.6 ms), and the KV tokens
    # its share of the spare HBM holds.
    replica = {line.split()[0]: line.split()[1:] for line in lines
               if line.startswith("llama-3-1-70b-0 ")}
    assert replica["llama-3-1-70b-0"] == ["h100-0", "0-7", "24.1", "ms", "262,144", "615,473"]
    # Each Model spreads by node (its default): the 8B's two replicas and Qwen's four
    # each take a node of their own, on 11 GPUs (8 packed: see below).
    assert {r.split()[0]: r.split()[1] for r in lines if r.startswith("qwen2-5-0-5b-")} == {
        "qwen2-5-0-5b-0": "h100-0", "qwen2-5-0-5b-1": "h100-1", "qwen2-5-0-5b-2": "a100",
        "qwen2-5-0-5b-3": "l4-0"}
    assert "NOT SPREAD" not in out
    assert lines[-1] == "GPUs with load: 11 of 26 (3 shared); replicas placed: 8 of 8"


def test_json_and_yaml_carry_the_same_plan(capsys):
    code, out, _ = run(capsys, FLEET, *MODELS, "-o", "json")
    assert code == 0
    data = json.loads(out)
    code, out, _ = run(capsys, FLEET, *MODELS, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == data
    assert data["gpusUsed"] == 11 and data["unplaced"] == [] and data["crowded"] == []
    by_replica = {a["replica"]: a for a in data["assignments"]}
    seventy = by_replica["llama-3-1-70b-0"]
    assert seventy["gpus"] == list(range(8)) and seventy["hbmPerGpu"] == 25154619392
    # 141107412992 / 8 bytes of weights + 8 x 32768 tokens x 16 KiB of fp8 KV per GPU
    assert seventy["stepBytes"] == 17638426624 + 262144 * 20480 == 23007135744
    assert seventy["kvCapacityTokens"] == 615473
    models = {m["name"]: m for m in data["models"]}
    assert {(m["spread"], m["notSpread"]) for m in models.values()} == {("node", None)}
    assert models["llama-3-1-70b"]["perReplica"] == {
        "NVIDIA-H100-80GB-HBM3": {"tensorParallel": 8, "hbmPerGpu": 25154619392,
                                  "kvTokens": 262144, "stepBytes": 23007135744,
                                  "stepBudget": None},
    }
    assert models["llama-3-8b"]["perReplica"]["NVIDIA-H100-80GB-HBM3"]["stepBudget"] == (
        int((0.05 - 0.002) * 3350e9 * 0.85))
    assert models["mistral-7b"]["unfit"] == {
        "NVIDIA-L4": "needs 31.5 GiB per GPU at tensorParallel 1, a GPU holds 22.5 GiB"}


def test_policies_and_reserve(capsys):
    # The policy alone (the Models' own spread off): spreading by headroom keeps 56 GiB
    # beside a 70B shard rather than take an L4.
    _, out, _ = run(capsys, FLEET, *MODELS, "-o", "json", "--policy", "spread",
                    "--spread", "none")
    spread = json.loads(out)
    assert spread["gpusUsed"] == 15 and spread["sharedGpus"] == [{"node": "h100-0", "gpu": 0}]
    _, out, _ = run(capsys, FLEET, *MODELS, "-o", "json", "--mode", "devicePlugin")
    assert json.loads(out)["sharedGpus"] == []
    _, out, _ = run(capsys, FLEET, *MODELS, "-o", "json", "--reserve", "0.5")
    reserved = json.loads(out)
    # Half of every GPU kept free: Llama-3.1-70B needs TP 8 on H100 now.
    models = {m["name"]: m for m in reserved["models"]}
    assert models["llama-3-1-70b"]["perReplica"]["NVIDIA-H100-80GB-HBM3"]["tensorParallel"] == 8
    assert {n["name"]: n["gpuCapacity"] for n in reserved["nodes"]} == {
        "h100-0": 81559 * 2**19, "h100-1": 81559 * 2**19, "a100": 40960 * 2**19,
        "l4-0": 23034 * 2**19, "l4-1": 23034 * 2**19,
    }


def test_spread_as_each_model_says_or_as_the_flag_says(capsys, tmp_path):
    def gpus(*args):
        code, out, _ = run(capsys, FLEET, *args, "-o", "json")
        assert code == 0
        data = json.loads(out)
        return data["gpusUsed"], {m["name"]: m["spread"] for m in data["models"]}

    # Packed, the examples take 8 GPUs; Qwen's four replicas on GPUs of their own cost
    # nothing (they top up GPUs the others use); on nodes of their own, 3 GPUs more.
    assert gpus(*MODELS, "--spread", "none")[0] == 8
    assert gpus(*MODELS, "--spread", "gpu")[0] == 8
    assert gpus(*MODELS, "--spread", "node")[0] == gpus(*MODELS)[0] == 11
    assert gpus(*MODELS, "--spread-replicas") == gpus(*MODELS, "--spread", "node")
    # A Model that says spread none is packed, the others still spread.
    packed = tmp_path / "qwen.yaml"
    packed.write_text((EXAMPLES / "qwen2.5-0.5b.yaml").read_text().replace(
        "spec:\n", "spec:\n  placement: {spread: none}\n", 1))
    others = [m for m in MODELS if m.name != "qwen2.5-0.5b.yaml"]
    used, spread = gpus(*others, packed)
    assert spread == {"llama-3-8b": "node", "llama-3-1-70b": "node", "mistral-7b": "node",
                      "qwen2-5-0-5b": "none"}
    assert used == 9


def test_replicas_that_share_a_node_are_listed_with_the_reason(capsys, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("nodes:\n  - {name: n, product: NVIDIA-L4, gpus: 1, count: 2}\n")
    code, out, _ = run(capsys, fleet, EXAMPLES / "qwen2.5-0.5b.yaml")
    assert code == 0
    text = " ".join(out.split("NOT SPREAD (replicas that share what their spread keeps "
                              "apart)\n", 1)[1].split())
    assert text.startswith(
        "qwen2-5-0-5b: 4 of 4 replicas share a node; spread node: every node with room for "
        "another replica of the Model holds one already (0/2 nodes fit: 2 holding a replica "
        "of it)")


def test_replicas_that_do_not_fit_are_listed_with_their_reason(capsys, tmp_path):
    big = tmp_path / "big.yaml"
    text = (EXAMPLES / "llama-3.1-70b.yaml").read_text()
    big.write_text(text.replace("replicas: 1", "replicas: 8").replace("maxReplicas: 4",
                                                                     "maxReplicas: 8"))
    code, out, _ = run(capsys, FLEET, big)
    assert code == 0
    # Three TP-8 replicas stack on each 8 x H100 node (3 x 23.4 GiB per GPU).
    assert out.splitlines()[-1] == "GPUs with load: 16 of 26 (16 shared); replicas placed: 6 of 8"
    text = " ".join(out.split("NOT PLACED\n", 1)[1].split())
    assert text.startswith(
        "llama-3-1-70b-6 .. llama-3-1-70b-7 (2): needs 8 GPUs with >= 23.4 GiB free each on "
        "NVIDIA-H100-80GB-HBM3; largest free set on any allowed node is 8 x 9.4 GiB (h100-0); "
        "free HBM is held by other replicas: scale some down or add GPU nodes (0/5 nodes fit: "
        "3 GPU product not allowed, 2 not enough free HBM)")


def test_empty_fleet_gives_reasons_not_a_crash(capsys, tmp_path):
    fleet = tmp_path / "empty.yaml"
    fleet.write_text("nodes: []\n")
    code, out, _ = run(capsys, fleet, *MODELS, "-o", "json")
    data = json.loads(out)
    assert code == 0 and data["assignments"] == []
    assert len(data["unplaced"]) == 8
    assert {u["reason"] for u in data["unplaced"]} == {"the fleet has no GPU nodes"}


@pytest.mark.parametrize(
    "which, text, message",
    [
        ("fleet", "nodes:\n  - {name: x, product: NVIDIA-L4, gpus: -1}\n", "nodes.0.gpus:"),
        ("fleet", "nodes: [\n", "cannot read"),
        ("model", "kind: Model\nmetadata: {name: m}\nspec: {}\n", "spec.weights: Field required"),
        ("model", "kind: Deployment\n", "not a Model"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_field(capsys, tmp_path, which, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    args = (bad, *MODELS) if which == "fleet" else (FLEET, bad)
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"kvpilot plan: {bad}: ") and message in err


def test_two_models_with_one_name_are_refused(capsys):
    code, _, err = run(capsys, FLEET, MODELS[0], MODELS[0])
    assert code == 2 and "appears twice" in err


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(FLEET), str(MODELS[0]), "--reserve", "1.5"])
    assert exit_.value.code == 2
    assert "must be in [0, 1)" in capsys.readouterr().err


def test_a_fleet_node_states_its_pods_and_the_plan_keeps_room_for_other_pods(
        capsys, tmp_path):
    # Four 3 GiB Qwen replicas share one GPU of a 1-GPU node; with maxPods 12 and 10 pods
    # kept for other workloads each node takes two of them.
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("nodes:\n"
                     "  - {name: n, product: NVIDIA-L4, gpus: 1, maxPods: 12, count: 2}\n")
    # Packed (--spread none), so that only the pod limit keeps them apart.
    qwen = EXAMPLES / "qwen2.5-0.5b.yaml"
    code, out, _ = run(capsys, fleet, qwen, "-o", "json", "--spread", "none")
    nodes = sorted(a["node"] for a in json.loads(out)["assignments"])
    assert code == 0 and nodes == ["n-0", "n-0", "n-1", "n-1"]
    code, out, _ = run(capsys, fleet, qwen, "-o", "json", "--reserved-pods", "0",
                       "--spread", "none")
    assert code == 0 and sorted(a["node"] for a in json.loads(out)["assignments"]) == ["n-0"] * 4
    with pytest.raises(SystemExit):
        main(["plan", str(fleet), str(qwen), "--reserved-pods", "-1"])
    assert "must be >= 0" in capsys.readouterr().err
