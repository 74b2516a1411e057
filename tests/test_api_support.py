"""What the worker can serve: accepted Models it cannot are flagged, not refused."""

from __future__ import annotations

import pytest
import yaml

from kvpilot.api import support
from kvpilot.api.model import Model, ModelSpec
from kvpilot.api.support import worker_support_problem
from tests.conftest import EXAMPLES, llama_spec
from tests.invalid_models import PHI3_ARCH


def spec(**overrides) -> ModelSpec:
    return ModelSpec.model_validate(llama_spec(**overrides))


def test_llama_is_servable():
    assert worker_support_problem(spec()) is None
    assert worker_support_problem(spec(), tp=1) is None


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
def test_kernel_head_dims_are_servable(head_dim):
    arch = {**llama_spec()["architecture"], "headDim": head_dim}
    assert worker_support_problem(spec(architecture=arch)) is None


@pytest.mark.parametrize("head_dim", [8, 24, 80, 96, 112, 192, 512, 1024])
def test_other_head_dims_are_planned_and_flagged(head_dim):
    arch = {**llama_spec()["architecture"], "headDim": head_dim}
    assert worker_support_problem(spec(architecture=arch)) == (
        f"architecture.headDim {head_dim} is not one the worker's attention kernels take "
        "(16, 32, 64, 128, 256) (the Model is planned, but no worker serves it)")


def test_phi3_mini_is_accepted_and_flagged():
    phi3 = spec(architecture=PHI3_ARCH, sla={"contextTokens": 4096, "concurrentSequences": 8})
    assert "headDim 96" in worker_support_problem(phi3)


def test_tensor_parallel_replicas_up_to_a_whole_node_are_servable():
    # One worker process per GPU: every degree the API takes is one the worker runs.
    assert support.WORKER_MAX_TENSOR_PARALLEL == 16
    for tp in (1, 2, 4, 8, 16):
        assert worker_support_problem(spec(tensorParallel=tp)) is None
        # with tensorParallel auto, the degree placement resolved decides
        assert worker_support_problem(spec(), tp=tp) is None


def test_replicas_wider_than_a_worker_are_flagged():
    assert worker_support_problem(spec(), tp=32) == (
        "tensorParallel 32: a worker drives at most 16 GPUs, so a replica cannot span more "
        "(the Model is planned, but no worker serves it)")
    arch = {**llama_spec()["architecture"], "headDim": 96}
    both = worker_support_problem(spec(architecture=arch), tp=32)
    assert "headDim 96" in both and "; tensorParallel 32:" in both


@pytest.mark.parametrize("name, problem", [
    ("deepseek-v2-lite", "architecture.attention mla: the worker's engine runs Llama-style "
                         "GQA attention only"),
    ("mistral-7b-v0.1", "architecture.slidingWindow: the worker's engine has no "
                        "sliding-window attention (every layer attends over the whole context)"),
    ("gemma-3-27b", "architecture.slidingWindow: the worker's engine has no sliding-window"),
])
def test_latent_and_sliding_window_attention_are_planned_and_flagged(name, problem):
    doc = yaml.safe_load((EXAMPLES / "attention" / f"{name}.yaml").read_text())
    why = worker_support_problem(Model.model_validate(doc).spec, tp=1)
    assert why.startswith(problem) and why.endswith("(the Model is planned, but no worker serves it)")


def test_deepseek_names_every_problem():
    doc = yaml.safe_load((EXAMPLES / "attention" / "deepseek-v2-lite.yaml").read_text())
    why = worker_support_problem(Model.model_validate(doc).spec, tp=32)
    assert [p.split(" ")[0] for p in why.split("; ")] == [
        "architecture.attention", "architecture.headDim", "tensorParallel"]
    assert [p.split(" ")[0] for p in worker_support_problem(
        Model.model_validate(doc).spec, tp=2).split("; ")] == [
        "architecture.attention", "architecture.headDim"]
