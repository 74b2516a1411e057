"""Fleet and Model files: expansion, GFD labels, and one-line errors naming file and field."""

from __future__ import annotations

import pytest

from kvpilot.api.files import load_models
from kvpilot.api.fleet import load_fleet
from tests.conftest import EXAMPLES


def test_mixed_fleet_expands_with_gfd_labels():
    nodes = load_fleet(EXAMPLES / "fleets" / "mixed.yaml").expand()
    assert [n.name for n in nodes] == ["h100-0", "h100-1", "a100", "l4-0", "l4-1"]
    assert nodes[0].gfd_labels() == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": "8",
    }
    assert nodes[2].gpu_hbm_bytes == 40960 * 2**20


@pytest.mark.parametrize(
    "text, message",
    [
        ("nodes:\n  - {name: x, product: ACME, gpus: 2}\n", "nodes.0: product 'ACME' is not in the catalog"),
        ("nodes:\n  - {name: x, product: NVIDIA-L4, gpus: -1}\n", "nodes.0.gpus:"),
        ("nodes:\n  - {name: x, product: NVIDIA-L4, gpus: 1}\n  - {name: x, product: NVIDIA-L4, gpus: 1}\n",
         "node name 'x' appears twice"),
        ("nodes: [\n", "cannot read"),
        ("nodes:\n  - {name: x, product: NVIDIA-L4, gpu: 1}\n", "nodes.0.gpus: Field required; nodes.0.gpu: Extra inputs are not permitted"),
    ],
)
def test_bad_fleet_is_one_line_naming_file_and_field(tmp_path, text, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_fleet(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_fleet_file_is_an_empty_fleet(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("")
    assert load_fleet(path).expand() == []


def test_bad_model_file_names_file_and_field(tmp_path):
    path = tmp_path / "m.yaml"
    text = (EXAMPLES / "llama-3-8b.yaml").read_text().replace("kvHeads: 8", "kvHeads: 0")
    path.write_text(text + "---\n" + text)
    with pytest.raises(ValueError) as err:
        load_models(path)
    assert str(err.value) == (
        f"{path}: spec.architecture.kvHeads: Input should be greater than or equal to 1"
    )
    path.write_text((EXAMPLES / "llama-3-8b.yaml").read_text() + "---\n" + (EXAMPLES / "mistral-7b.yaml").read_text())
    assert [m.metadata.name for m in load_models(path)] == ["llama-3-8b", "mistral-7b"]
