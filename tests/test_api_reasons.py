"""Reasons ``kvpilot plan`` gives for a Model that fits nowhere: the actual cause and a fix
computed from the memory model, on fleets with nothing else on them."""

from __future__ import annotations

from pathlib import Path

from kvpilot.cli import main
from tests.conftest import EXAMPLES

LLAMA_8B = (EXAMPLES / "llama-3-8b.yaml").read_text()
LLAMA_70B = (EXAMPLES / "llama-3.1-70b.yaml").read_text().split("  gpuProducts:")[0]


def reason(capsys, tmp_path: Path, fleet: str, model: str) -> str:
    (tmp_path / "fleet.yaml").write_text(f"nodes:\n  - {fleet}\n")
    (tmp_path / "model.yaml").write_text(model)
    assert main(["plan", str(tmp_path / "fleet.yaml"), str(tmp_path / "model.yaml")]) == 0
    out = capsys.readouterr().out
    return " ".join(out.split("NOT PLACED\n", 1)[1].split("\n\n")[0].split())


def test_an_sla_too_large_for_an_empty_gpu_gets_the_sla_that_fits(capsys, tmp_path):
    # 64 x 8K tokens at 128 KiB: 64 GiB of KV + 15.0 GiB weights + 2 GiB > 79.6 GiB; room
    # for KV is 85520809984 - 16060522496 - 2147483648 = 62.7 GiB, so 62 sequences.
    text = reason(capsys, tmp_path, "{name: h100, product: NVIDIA-H100-80GB-HBM3, gpus: 1}",
                  LLAMA_8B.replace("concurrentSequences: 16", "concurrentSequences: 64"))
    assert text == (
        "llama-3-8b-0 .. llama-3-8b-1 (2): fits no allowed GPU product at any tensorParallel "
        "(NVIDIA-H100-80GB-HBM3: needs 81.0 GiB per GPU even at tensorParallel 1 (the most "
        "GPUs on one node), a GPU holds 79.6 GiB); try kvCacheDtype fp8 or "
        "concurrentSequences <= 62 (0/1 nodes fit: 1 GPU too small at any tensorParallel)")
    assert "held by other replicas" not in text


def test_weights_too_large_for_any_empty_gpu_say_so(capsys, tmp_path):
    text = reason(capsys, tmp_path, "{name: l4, product: NVIDIA-L4, gpus: 4}",
                  LLAMA_70B.replace("kvCacheDtype: fp8", "kvCacheDtype: bf16"))
    assert text.endswith(
        "no allowed GPU holds the weights and overhead of one replica, even with nothing "
        "else on it: add nodes with larger GPUs or more GPUs per node (0/1 nodes fit: 1 GPU "
        "too small at any tensorParallel)")


def test_a_tensor_parallel_larger_than_any_node_is_said_as_such(capsys, tmp_path):
    text = reason(capsys, tmp_path, "{name: l4, product: NVIDIA-L4, gpus: 4}",
                  LLAMA_70B.replace("tensorParallel: auto", "tensorParallel: 8"))
    assert text == (
        "llama-3-1-70b-0: fits no allowed GPU product at tensorParallel 8 (NVIDIA-L4: "
        "tensorParallel 8 needs 8 GPUs on one node, nodes have at most 4); no allowed node "
        "has 8 GPUs (the most is 4): add nodes with 8 or more (0/1 nodes fit: 1 fewer than "
        "8 GPUs)")


LLAMA_70B_NO_TTFT = "\n".join(line for line in LLAMA_70B.splitlines()
                              if "ttftMilliseconds" not in line) + "\n"
# Worlds where one Model does not fit, each with the fixes its reason suggests.
H100 = "{name: h100, product: NVIDIA-H100-80GB-HBM3, gpus: 1}"
HINT_WORLDS = [
    ("sla-too-large", H100,
     LLAMA_8B.replace("concurrentSequences: 16", "concurrentSequences: 64")),
    ("tight-itl", H100, LLAMA_8B.replace("concurrentSequences: 16", "concurrentSequences: 40")
     .replace("interTokenLatencyMilliseconds: 50", "interTokenLatencyMilliseconds: 12")),
    ("70b-on-four-h100", "{name: h100, product: NVIDIA-H100-80GB-HBM3, gpus: 4}",
     LLAMA_70B_NO_TTFT.replace("concurrentSequences: 8", "concurrentSequences: 64")),
    ("70b-at-a-fixed-tp-2", "{name: h100, product: NVIDIA-H100-80GB-HBM3, gpus: 8}",
     LLAMA_70B_NO_TTFT.replace("tensorParallel: auto", "tensorParallel: 2")),
    ("not-an-allowed-product", "{name: h200, product: NVIDIA-H200, gpus: 1}",
     LLAMA_8B.replace("concurrentSequences: 16", "concurrentSequences: 2")),
]


def _hints(text: str) -> list[str]:
    """Every fix a reason suggests: each 'try A, B or C' in it (a product's own, in
    parentheses, and the replica's)."""
    import re

    return [h for group in re.findall(r"try ([^();]+?)(?= \(|\)|;|$)", text)
            for h in re.split(r", | or ", group)]


def _one_replica(model: str) -> str:
    import yaml

    doc = yaml.safe_load(model)
    doc["spec"]["replicas"] = doc["spec"]["minReplicas"] = 1
    return yaml.safe_dump(doc)


def _applied(model: str, hint: str) -> str:
    import re

    import yaml

    doc = yaml.safe_load(model)
    spec = doc["spec"]
    if hint == "kvCacheDtype fp8":
        spec["kvCacheDtype"] = "fp8"
    elif m := re.fullmatch(r"tensorParallel (\d+)", hint):
        spec["tensorParallel"] = int(m.group(1))
    elif m := re.fullmatch(r"(concurrentSequences|contextTokens) <= (\d+)", hint):
        spec["sla"][m.group(1)] = int(m.group(2))
    elif m := re.fullmatch(r"adding (\S+) to gpuProducts", hint):
        spec["gpuProducts"] = [*spec.get("gpuProducts", []), m.group(1)]
    else:
        raise AssertionError(f"a hint this test cannot apply: {hint!r}")
    return yaml.safe_dump(doc)


def test_every_fix_a_reason_suggests_makes_the_replica_fit_when_applied(capsys, tmp_path):
    import json

    applied = 0
    for name, fleet, model in HINT_WORLDS:
        model = _one_replica(model)
        if name == "not-an-allowed-product":
            model = model.replace("spec:\n", "spec:\n  gpuProducts: [NVIDIA-H100-80GB-HBM3]\n")
        text = reason(capsys, tmp_path, fleet, model)
        hints = _hints(text)
        assert hints, (name, text)
        for hint in hints:
            (tmp_path / "model.yaml").write_text(_applied(model, hint))
            assert main(["plan", str(tmp_path / "fleet.yaml"), str(tmp_path / "model.yaml"),
                         "-o", "json"]) == 0
            plan = json.loads(capsys.readouterr().out)
            assert plan["unplaced"] == [] and len(plan["assignments"]) == 1, (name, hint, text)
            applied += 1
    assert applied >= len(HINT_WORLDS)
