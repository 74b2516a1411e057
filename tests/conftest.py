from __future__ import annotations

import glob
import os
from pathlib import Path

# Without a GPU, Triton kernels run on CPU through its interpreter, which must be chosen
# before any module that defines a kernel is imported (@triton.jit reads it then); set
# here so the order in which test modules import the worker does not matter.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import yaml

from kvpilot.api.model import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def llama_spec(**overrides):
    """Llama-3-8B with an 8K x 16 SLA, as a plain dict; overrides merge at the top."""
    spec = {
        "weights": {"parameters": 8030261248, "dtype": "bf16"},
        "architecture": {
            "layers": 32, "attentionHeads": 32, "kvHeads": 8, "headDim": 128,
            "maxContextTokens": 8192,
        },
        "sla": {"contextTokens": 8192, "concurrentSequences": 16},
    }
    spec.update(overrides)
    return spec


def llama_70b(**overrides):
    """Llama-3-70B (80 layers, 8 KV heads) in bf16 with an 8K x 8 SLA, validated."""
    return ModelSpec.model_validate(llama_spec(
        weights={"parameters": 70553706496, "dtype": "bf16"},
        architecture={"layers": 80, "attentionHeads": 64, "kvHeads": 8, "headDim": 128,
                      "maxContextTokens": 131072},
        sla={"contextTokens": 8192, "concurrentSequences": 8},
        **overrides,
    ))


@pytest.fixture
def example_docs():
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}
