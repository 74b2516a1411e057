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


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 256])
def test_kernel_head_dims_are_servable(head_dim):
    arch = {**llama_spec()["architecture"], "headDim": head_dim}
    assert worker_support_problem(spec(architecture=arch)) is None


@pytest.mark.parametrize("head_dim", [8, 24, 48, 112, 160, 192, 512, 1024])
def test_other_head_dims_are_planned_and_flagged(head_dim):
    arch = {**llama_spec()["architecture"], "headDim": head_dim}
    assert worker_support_problem(spec(architecture=arch)) == (
        f"architecture.headDim {head_dim} is not one the worker's attention kernels take "
        "(16, 32, 64, 80, 96, 128, 256) (the Model is planned, but no worker serves it)")


def test_phi3_heads_of_96_and_its_4k_window_are_servable():
    # Heads of 96 go through a padded kernel tile; Phi-3-mini-4k's 2047-token window
    # is a ring of pages per sequence in every layer.
    sla = {"contextTokens": 4096, "concurrentSequences": 8}
    assert worker_support_problem(spec(architecture=PHI3_ARCH, sla=sla)) is None
    windowed = {**PHI3_ARCH, "slidingWindow": {"tokens": 2047}}
    assert worker_support_problem(spec(architecture=windowed, sla=sla)) is None


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "mistral-7b", "llama-3-8b", "llama-3.1-70b"])
def test_the_examples_of_served_families_are_servable(name):
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    assert worker_support_problem(Model.model_validate(doc).spec) is None


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
    arch = {**llama_spec()["architecture"], "headDim": 112}
    both = worker_support_problem(spec(architecture=arch), tp=32)
    assert "headDim 112" in both and "; tensorParallel 32:" in both


@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "gemma-3-27b"])
def test_sliding_window_models_are_servable(name):
    doc = yaml.safe_load((EXAMPLES / "attention" / f"{name}.yaml").read_text())
    assert worker_support_problem(Model.model_validate(doc).spec, tp=1) is None


def test_latent_attention_is_planned_and_flagged():
    doc = yaml.safe_load((EXAMPLES / "attention" / "deepseek-v2-lite.yaml").read_text())
    why = worker_support_problem(Model.model_validate(doc).spec, tp=1)
    assert why.startswith("architecture.attention mla: the worker's engine runs Llama-style "
                          "GQA attention only")
    assert why.endswith("(the Model is planned, but no worker serves it)")


def test_deepseek_names_every_problem():
    doc = yaml.safe_load((EXAMPLES / "attention" / "deepseek-v2-lite.yaml").read_text())
    why = worker_support_problem(Model.model_validate(doc).spec, tp=32)
    assert [p.split(" ")[0] for p in why.split("; ")] == [
        "architecture.attention", "architecture.headDim", "tensorParallel"]
    assert [p.split(" ")[0] for p in worker_support_problem(
        Model.model_validate(doc).spec, tp=2).split("; ")] == [
        "architecture.attention", "architecture.headDim"]
