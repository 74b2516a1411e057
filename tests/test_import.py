"""`kvpilot import`: a Model from a checkpoint, and kvpilot.api.checkpoint, which the
import and the worker's start-up check share.

The configs in fixtures/configs are the published config.json of each model; the weights
are not here, so fixtures/configs/weights.json states their bytes and dtype as the hub's
safetensors metadata gives them (parameters x 2 bytes, all bf16), and the import takes
them through --weights-bytes/--weights-dtype, or through a hub whose metadata says them.
Reading real safetensors headers is tested on small files written with safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml

from kvpilot.api.checkpoint import (
    CheckpointUnreadable, architecture_from_config, checkpoint_mismatches,
    read_safetensors_header, safetensors_files, weights_from_directory,
    weights_from_safetensors,
)
from kvpilot.api.files import load_models
from kvpilot.api.memory import replica_budget
from kvpilot.api.model import Model, ModelSpec
from kvpilot.cli import main
from tests.conftest import EXAMPLES, ROOT

FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = FIXTURES / "configs"
WEIGHTS = json.loads((CONFIGS / "weights.json").read_text())
NAMES = sorted(WEIGHTS)


def config_of(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def expected(name: str) -> dict:
    return yaml.safe_load((FIXTURES / "imported" / f"{name}.yaml").read_text())


def checkpoint_dir(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", directory / "config.json")
    return directory


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["import", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def stated(name: str) -> list[str]:
    w = WEIGHTS[name]
    return ["--weights-bytes", str(w["bytes"]), "--weights-dtype", w["dtype"]]


# --- the import of published checkpoints --------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_import_of_a_published_config(capsys, tmp_path, name):
    directory = checkpoint_dir(tmp_path, name)
    code, out, err = run(capsys, directory, *stated(name),
                         "--source", f"hf://{WEIGHTS[name]['repo']}")
    assert (code, err) == (0, "")
    assert yaml.safe_load(out) == expected(name)
    # The same from config.json itself, here without --source: none, and a note.
    code, out2, err = run(capsys, directory / "config.json", *stated(name))
    assert code == 0 and "no spec.source" in err
    doc = yaml.safe_load(out2)
    assert "source" not in doc["spec"]
    doc["spec"] = {"source": f"hf://{WEIGHTS[name]['repo']}", **doc["spec"]}
    assert doc == expected(name)


@pytest.mark.parametrize("name", NAMES)
def test_an_imported_model_is_valid_and_agrees_with_its_checkpoint(name):
    model = Model.model_validate(expected(name))
    w = WEIGHTS[name]
    assert checkpoint_mismatches(model.spec, config_of(name), w["bytes"], w["dtype"]) == []


def test_the_decisions_in_the_fixtures():
    arch = {n: expected(n)["spec"]["architecture"] for n in NAMES}
    # Phi-3-mini-4k: head_dim is hidden / heads; its 2047-token window slides on every
    # layer, as transformers and vLLM apply it.
    assert arch["Phi-3-mini-4k-instruct"]["headDim"] == 3072 // 32 == 96
    assert arch["Phi-3-mini-4k-instruct"]["slidingWindow"] == {"tokens": 2047}
    # Mistral v0.1 slides on every layer; v0.3 says sliding_window: null.
    assert arch["Mistral-7B-v0.1"]["slidingWindow"] == {"tokens": 4096}
    assert "slidingWindow" not in arch["Mistral-7B-Instruct-v0.3"]
    # Qwen 2.5 name a window with use_sliding_window false: none.
    assert not any("slidingWindow" in arch[n] for n in NAMES if n.startswith("Qwen"))
    # Gemma 2 alternates from a local layer 0; Gemma 3 has five local to one global,
    # nested in text_config (12b, 27b) or not (1b), head_dim and the pattern defaulted.
    assert arch["gemma-2-9b-it"]["slidingWindow"] == {
        "tokens": 4096, "localLayers": 1, "globalLayers": 1}
    for name, tokens in (("gemma-3-1b-it", 512), ("gemma-3-12b-it", 1024),
                         ("gemma-3-27b-it", 1024)):
        assert arch[name]["slidingWindow"] == {"tokens": tokens, "localLayers": 5,
                                               "globalLayers": 1}
    assert arch["gemma-3-12b-it"]["headDim"] == 256
    # DeepSeek-V2-Lite: MLA, a head of 128 + 64, a KV head per query head.
    assert arch["DeepSeek-V2-Lite"] == {
        "layers": 27, "attentionHeads": 16, "kvHeads": 16, "headDim": 192,
        "maxContextTokens": 163840, "attention": "mla",
        "mla": {"kvLoraRank": 512, "qkRopeHeadDim": 64}}
    # The SLA's context: the model's longest, at most 8192.
    assert expected("Phi-3-mini-4k-instruct")["spec"]["sla"]["contextTokens"] == 4096
    assert expected("Qwen3-8B")["spec"]["sla"] == {"contextTokens": 8192,
                                                     "concurrentSequences": 8}


def test_flags_set_name_sla_and_kv_dtype(capsys, tmp_path):
    directory = checkpoint_dir(tmp_path, "Qwen3-8B")
    code, out, _ = run(capsys, directory, *stated("Qwen3-8B"), "--name", "qwen",
                       "--context", "40960", "--concurrency", "3", "--kv-cache-dtype", "fp8",
                       "--source", "pvc://models/qwen3-8b")
    spec = yaml.safe_load(out)["spec"]
    assert code == 0 and yaml.safe_load(out)["metadata"] == {"name": "qwen"}
    assert spec["source"] == "pvc://models/qwen3-8b" and spec["kvCacheDtype"] == "fp8"
    assert spec["sla"] == {"contextTokens": 40960, "concurrentSequences": 3}


def test_a_config_alone_with_parameters_takes_its_torch_dtype(capsys, tmp_path):
    directory = checkpoint_dir(tmp_path, "Llama-3.2-1B")
    code, out, _ = run(capsys, directory / "config.json", "--parameters", "1235814400")
    assert code == 0
    assert yaml.safe_load(out)["spec"]["weights"] == {"parameters": 1235814400, "dtype": "bf16"}


def test_a_long_name_is_cut_to_a_valid_model_name(capsys, tmp_path):
    directory = tmp_path / ("My_Org.Llama-3.1-8B-Instruct.Finetuned-" + "x" * 40)
    directory.mkdir()
    shutil.copy(CONFIGS / "Llama-3.1-8B-Instruct.json", directory / "config.json")
    code, out, _ = run(capsys, directory, *stated("Llama-3.1-8B-Instruct"))
    assert code == 0
    assert yaml.safe_load(out)["metadata"]["name"] == (
        "my-org-llama-3-1-8b-instruct-finetuned-xxxxxxxxxxx")


# --- kvpilot plan on an imported Model ------------------------------------------------------

def test_plan_of_an_imported_llama_matches_the_hand_written_example(capsys, tmp_path):
    """Llama-3.1-8B-Instruct imported with the SLA of examples/llama-3-8b.yaml (Llama-3-8B:
    the same shape and weights) needs the same HBM per GPU at every TP degree."""
    directory = checkpoint_dir(tmp_path, "Llama-3.1-8B-Instruct")
    code, out, _ = run(capsys, directory, *stated("Llama-3.1-8B-Instruct"),
                       "--context", "8192", "--concurrency", "16", "--kv-cache-dtype", "bf16",
                       "--name", "llama-3-8b")
    assert code == 0
    imported = tmp_path / "imported.yaml"
    imported.write_text(out)
    example = load_models(EXAMPLES / "llama-3-8b.yaml")[0]
    mine = load_models(imported)[0]
    for tp in (1, 2, 4, 8):
        assert replica_budget(mine.spec, tp) == replica_budget(example.spec, tp)
    # The plan too, once the example's latency targets (not facts of a checkpoint) go.
    doc = yaml.safe_load((EXAMPLES / "llama-3-8b.yaml").read_text())
    for target in ("ttftMilliseconds", "interTokenLatencyMilliseconds"):
        del doc["spec"]["sla"][target]
    hand = tmp_path / "hand.yaml"
    hand.write_text(yaml.safe_dump(doc))
    fleet = EXAMPLES / "fleets" / "mixed.yaml"
    plans = []
    for path in (hand, imported):
        assert main(["plan", str(fleet), str(path), "-o", "json"]) == 0
        plans.append(json.loads(capsys.readouterr().out)["models"][0]["perReplica"])
    assert plans[0] == plans[1]
    assert plans[0]["NVIDIA-H100-80GB-HBM3"]["hbmPerGpu"] == replica_budget(mine.spec, 1).per_gpu


# --- an hf:// source ---------------------------------------------------------------------------

class FakeHub:
    """hf_hub_download and HfApi().get_safetensors_metadata over the fixtures: the
    metadata splits each model's published bytes over two shards of real TensorInfo."""

    def __init__(self, name: str):
        from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

        self.name, self.calls = name, []
        total = WEIGHTS[name]["bytes"]
        half = total // 2

        def shard(tensors):
            return SafetensorsFileMetadata(metadata={}, tensors={
                n: TensorInfo(dtype=d, shape=[size // 2], data_offsets=(0, size))
                for n, d, size in tensors})

        # A little fp32 (norms) beside the bf16 majority, as real checkpoints have.
        self.metadata = type("Repo", (), {"files_metadata": {
            "model-00001-of-00002.safetensors": shard([("a", "BF16", half - 1024)]),
            "model-00002-of-00002.safetensors": shard([("b", "BF16", total - half),
                                                       ("norm", "F32", 1024)]),
        }})()

    def hf_hub_download(self, repo_id, filename, *, revision=None, **_):
        self.calls.append(("download", repo_id, filename, revision))
        return str(CONFIGS / f"{self.name}.json")

    def api(self):
        hub = self

        class Api:
            def get_safetensors_metadata(self, repo_id, *, revision=None, **_):
                hub.calls.append(("metadata", repo_id, revision))
                return hub.metadata

        return Api()


@pytest.mark.parametrize("name", ["Llama-3.1-8B-Instruct", "gemma-3-12b-it"])
def test_import_from_the_hub(capsys, monkeypatch, name):
    import huggingface_hub

    hub = FakeHub(name)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    repo = WEIGHTS[name]["repo"]
    code, out, err = run(capsys, f"hf://{repo}")
    assert (code, err) == (0, "")
    assert yaml.safe_load(out) == expected(name)
    assert hub.calls == [("download", repo, "config.json", None), ("metadata", repo, None)]
    code, out, _ = run(capsys, f"hf://{repo}@abc123")
    assert yaml.safe_load(out)["spec"]["source"] == f"hf://{repo}@abc123"
    assert hub.calls[-2:] == [("download", repo, "config.json", "abc123"),
                              ("metadata", repo, "abc123")]


def test_import_from_the_hub_without_huggingface_hub(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    code, _, err = run(capsys, "hf://meta-llama/Llama-3.1-8B-Instruct")
    assert code == 2
    assert err.startswith("kvpilot import: importing hf://meta-llama/Llama-3.1-8B-Instruct "
                          "needs huggingface_hub")


def test_hub_errors_are_one_line(capsys, monkeypatch):
    import huggingface_hub

    def missing(*_, **__):
        raise OSError("404 Client Error.\n\nRepository Not Found for url: ...")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    code, _, err = run(capsys, "hf://nobody/nothing")
    assert code == 2
    assert err == ("kvpilot import: cannot read hf://nobody/nothing from the hub: OSError: "
                   "404 Client Error.\n")


# --- bad input -------------------------------------------------------------------------------

def write_config(tmp_path: Path, config, name: str = "m") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "config.json").write_text(text)
    return directory


@pytest.mark.parametrize("args, message", [
    (["{dir}/nowhere"], "{dir}/nowhere: no such file or directory"),
    (["{dir}/bad"], "{dir}/bad/config.json: not JSON: "),
    (["{dir}/bert", "--parameters", "1"],
     "config.json (model_type bert): architectures BertForMaskedLM is not a decoder LLM"),
    (["{dir}/t5", "--parameters", "1"], "config.json (model_type t5) is an encoder-decoder"),
    (["{dir}/llama"], "{dir}/llama: no *.safetensors files; give --weights-bytes or "
                      "--parameters (and --weights-dtype) to state the weights"),
    (["{dir}/llama/config.json"], "{dir}/llama: no *.safetensors files; give"),
    (["{dir}/no-dtype", "--parameters", "100"], "config.json states no torch_dtype: give "
                                                "--weights-dtype"),
    (["{dir}/llama", "--weights-dtype", "bf16"], "--weights-dtype goes with --weights-bytes"),
    (["{dir}/llama", "--parameters", "1", "--context", "200000"],
     "the Model for {dir}/llama is not valid: spec.sla.contextTokens: sla.contextTokens must "
     "be <= architecture.maxContextTokens"),
    (["{dir}/llama", "--parameters", "1", "--name", "Llama_3"],
     "metadata.name: metadata.name must be a DNS label"),
    (["{dir}/llama", "--parameters", "1", "--source", "s3://bucket/llama"],
     "source must start with hf://"),
    (["{dir}/no-layers", "--parameters", "1"], "config.json (model_type llama) has no "
                                                "num_hidden_layers"),
    (["hf://meta-llama/../x"], "source hf:// must be hf://ORG/NAME"),
])
def test_bad_input_is_one_line_and_status_2(capsys, tmp_path, args, message):
    llama = config_of("Llama-3.2-1B")
    write_config(tmp_path, "{not json", "bad")
    write_config(tmp_path, {"model_type": "bert", "architectures": ["BertForMaskedLM"],
                            "num_hidden_layers": 12, "num_attention_heads": 12,
                            "hidden_size": 768, "max_position_embeddings": 512}, "bert")
    write_config(tmp_path, {"model_type": "t5", "is_encoder_decoder": True,
                            "architectures": ["T5ForConditionalGeneration"]}, "t5")
    write_config(tmp_path, llama, "llama")
    write_config(tmp_path, {k: v for k, v in llama.items() if k != "torch_dtype"}, "no-dtype")
    write_config(tmp_path, {k: v for k, v in llama.items() if k != "num_hidden_layers"},
                 "no-layers")
    code, out, err = run(capsys, *(a.format(dir=tmp_path) for a in args))
    assert code == 2 and out == ""
    assert err.startswith("kvpilot import: ") and err.count("\n") == 1
    assert message.format(dir=tmp_path) in err


def test_a_name_nothing_can_be_made_of(capsys, tmp_path):
    directory = write_config(tmp_path, config_of("Llama-3.2-1B"), "___")
    code, _, err = run(capsys, directory, "--parameters", "1")
    assert code == 2 and "cannot make a Model name of '___': give --name" in err


# --- architecture_from_config -----------------------------------------------------------------

def qwen2(**over) -> dict:
    return {**config_of("Qwen2.5-7B-Instruct"), **over}


def test_qwen2_windows_when_used():
    window = {"use_sliding_window": True, "sliding_window": 4096}
    assert architecture_from_config(qwen2(**window, max_window_layers=0))["slidingWindow"] == {
        "tokens": 4096}
    assert "slidingWindow" not in architecture_from_config(qwen2(**window, max_window_layers=28))
    with pytest.raises(ValueError, match=r"model_type qwen2\): its sliding-window layers "
                                         r"\(layers 14-27 of 28\) are not a pattern"):
        architecture_from_config(qwen2(**window, max_window_layers=14))


def test_layer_types_give_the_pattern():
    gemma = config_of("gemma-3-1b-it")
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    config = {**gemma, "sliding_window_pattern": None,
              "layer_types": (layer_types * 5)[:26]}
    assert architecture_from_config(config)["slidingWindow"] == {
        "tokens": 512, "localLayers": 5, "globalLayers": 1}
    # A last, partial group starts with its local layers: 24 = 4 x 6, then 2 local.
    assert config["layer_types"][24:] == ["sliding_attention"] * 2
    irregular = {**config, "layer_types": ["sliding_attention", "full_attention"] * 10
                 + ["sliding_attention"] * 6}
    with pytest.raises(ValueError, match="layers 0, 2, 4, .*, 18, 20-25 of 26"):
        architecture_from_config(irregular)
    global_first = {**config, "layer_types": ["full_attention"] + ["sliding_attention"] * 25}
    with pytest.raises(ValueError, match="not a pattern of local layers"):
        architecture_from_config(global_first)
    with pytest.raises(ValueError, match="layer_types names 3 layers, num_hidden_layers is 26"):
        architecture_from_config({**config, "layer_types": layer_types[:3]})
    every = {**config, "layer_types": ["full_attention"] * 26}
    assert "slidingWindow" not in architecture_from_config(every)


def test_windows_as_long_as_the_context_never_slide():
    phi_128k = {**config_of("Phi-3-mini-4k-instruct"), "max_position_embeddings": 131072,
                "sliding_window": 262144}
    assert "slidingWindow" not in architecture_from_config(phi_128k)


def test_other_decoders_and_missing_fields():
    granite = {"model_type": "granite", "architectures": ["GraniteForCausalLM"],
               "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096, "max_position_embeddings": 131072}
    assert architecture_from_config(granite) == {
        "layers": 40, "attentionHeads": 32, "kvHeads": 8, "headDim": 128,
        "maxContextTokens": 131072}
    mha = {k: v for k, v in granite.items() if k != "num_key_value_heads"}
    assert architecture_from_config(mha)["kvHeads"] == 32
    with pytest.raises(ValueError, match=r"model_type granite\) has sliding_window 4096 but "
                                         "no layer_types"):
        architecture_from_config({**granite, "sliding_window": 4096})
    with pytest.raises(ValueError, match=r"model_type granite\) has no max_position_embeddings"):
        architecture_from_config({k: v for k, v in granite.items()
                                  if k != "max_position_embeddings"})
    with pytest.raises(ValueError, match="hidden_size 4096 is not a multiple of "
                                         "num_attention_heads 48"):
        architecture_from_config({**granite, "num_attention_heads": 48})
    with pytest.raises(ValueError, match="config.json has no model_type"):
        architecture_from_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="num_hidden_layers must be a whole number, not '32'"):
        architecture_from_config({**granite, "num_hidden_layers": "32"})


def test_deepseek_v3_is_mla():
    v3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
          "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "hidden_size": 7168, "max_position_embeddings": 163840}
    assert architecture_from_config(v3) == {
        "layers": 61, "attentionHeads": 128, "kvHeads": 128, "headDim": 192,
        "maxContextTokens": 163840, "attention": "mla",
        "mla": {"kvLoraRank": 512, "qkRopeHeadDim": 64}}


# --- checkpoint_mismatches ---------------------------------------------------------------------

# Each example and the published checkpoint it describes (llama-3-8b is Meta-Llama-3-8B,
# the same shape and weights as Llama 3.1 8B with a shorter context).
EXAMPLE_CHECKPOINTS = {
    "llama-3-8b.yaml": "Llama-3.1-8B-Instruct",
    "llama-3.1-70b.yaml": "Llama-3.1-70B-Instruct",
    "mistral-7b.yaml": "Mistral-7B-Instruct-v0.3",
    "qwen2.5-0.5b.yaml": "Qwen2.5-0.5B-Instruct",
    "attention/deepseek-v2-lite.yaml": "DeepSeek-V2-Lite",
    "attention/gemma-2-9b.yaml": "gemma-2-9b-it",
    "attention/gemma-3-27b.yaml": "gemma-3-27b-it",
    "attention/mistral-7b-v0.1.yaml": "Mistral-7B-v0.1",
}


def test_every_example_is_covered():
    examples = {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.glob("**/*.yaml")
                if p.parent.name in ("examples", "attention")}
    assert examples == set(EXAMPLE_CHECKPOINTS)


@pytest.mark.parametrize("example, name", sorted(EXAMPLE_CHECKPOINTS.items()))
def test_the_examples_agree_with_their_checkpoints(example, name):
    spec = load_models(EXAMPLES / example)[0].spec
    w = WEIGHTS[name]
    assert checkpoint_mismatches(spec, config_of(name), w["bytes"], w["dtype"]) == []


def spec_of(name: str, **architecture) -> ModelSpec:
    doc = expected(name)["spec"]
    doc["architecture"] = {**doc["architecture"], **architecture}
    doc["architecture"] = {k: v for k, v in doc["architecture"].items() if v is not None}
    return ModelSpec.model_validate(doc)


def mismatches(name: str, spec: ModelSpec, **config) -> list[str]:
    w = WEIGHTS[name]
    return checkpoint_mismatches(spec, {**config_of(name), **config}, w["bytes"], w["dtype"])


@pytest.mark.parametrize("name, field, value, message", [
    ("Llama-3.1-8B-Instruct", "layers", 16,
     "architecture.layers: the Model says 16, config.json says 32"),
    ("Llama-3.1-8B-Instruct", "attentionHeads", 64,
     "architecture.attentionHeads: the Model says 64, config.json says 32"),
    ("Llama-3.1-8B-Instruct", "kvHeads", 4,
     "architecture.kvHeads: the Model says 4, config.json says 8"),
    ("Llama-3.1-8B-Instruct", "headDim", 64,
     "architecture.headDim: the Model says 64, config.json says 128"),
    ("Llama-3.1-8B-Instruct", "maxContextTokens", 262144,
     "architecture.maxContextTokens: the Model says 262144, config.json says 131072 "
     "(max_position_embeddings; a Model may say less, not more)"),
    ("DeepSeek-V2-Lite", "mla", {"kvLoraRank": 256, "qkRopeHeadDim": 64},
     "architecture.mla.kvLoraRank: the Model says 256, config.json says 512"),
    ("DeepSeek-V2-Lite", "mla", {"kvLoraRank": 512, "qkRopeHeadDim": 32},
     "architecture.mla.qkRopeHeadDim: the Model says 32, config.json says 64"),
    ("gemma-2-9b-it", "slidingWindow", {"tokens": 2048, "localLayers": 1, "globalLayers": 1},
     "architecture.slidingWindow.tokens: the Model says 2048, config.json says 4096"),
    ("gemma-3-12b-it", "slidingWindow", {"tokens": 1024, "localLayers": 1, "globalLayers": 1},
     "architecture.slidingWindow.localLayers: the Model says 1, config.json says 5"),
    ("gemma-3-12b-it", "slidingWindow", {"tokens": 1024, "localLayers": 5},
     "architecture.slidingWindow.globalLayers: the Model says 0, config.json says 1"),
    ("Mistral-7B-v0.1", "slidingWindow", None,
     "architecture.slidingWindow: the Model says none (every layer global), config.json "
     "says tokens 4096 on every layer"),
    ("Mistral-7B-Instruct-v0.3", "slidingWindow", {"tokens": 4096},
     "architecture.slidingWindow: the Model says tokens 4096 on every layer, config.json "
     "says none (every layer global)"),
])
def test_each_field_that_disagrees(name, field, value, message):
    assert mismatches(name, spec_of(name, **{field: value})) == [message]


def test_what_may_differ():
    # A shorter context than the checkpoint's, and the same window pattern said another way.
    assert mismatches("Llama-3.1-8B-Instruct", spec_of("Llama-3.1-8B-Instruct",
                                                      maxContextTokens=8192)) == []
    every_layer = {"tokens": 4096, "localLayers": 3, "globalLayers": 0}
    assert mismatches("Mistral-7B-v0.1", spec_of("Mistral-7B-v0.1",
                                                 slidingWindow=every_layer)) == []


def test_attention_kind_and_several_fields():
    gqa = spec_of("DeepSeek-V2-Lite", attention="gqa", mla=None, kvHeads=16, headDim=128)
    assert mismatches("DeepSeek-V2-Lite", gqa) == [
        "architecture.headDim: the Model says 128, config.json says 192",
        "architecture.attention: the Model says gqa, config.json says mla"]


def llama_weights(**weights) -> ModelSpec:
    doc = expected("Llama-3.1-8B-Instruct")["spec"]
    return ModelSpec.model_validate({**doc, "weights": weights})


HELD = 16060522496  # Llama-3.1-8B's safetensors
EDGE = HELD // 50  # 2% of it, rounded down


@pytest.mark.parametrize("difference, agrees", [
    (0, True), (EDGE, True), (-EDGE, True), (EDGE + 1, False), (-EDGE - 1, False)])
def test_weights_within_two_percent(difference, agrees):
    spec = llama_weights(bytes=HELD + difference, dtype="bf16")
    found = checkpoint_mismatches(spec, config_of("Llama-3.1-8B-Instruct"), HELD, "bf16")
    assert (found == []) is agrees
    if not agrees:
        said = HELD + difference
        assert found == [f"weights: the Model says {said / 2**30:.1f} GiB ({said} bytes), "
                         f"the safetensors hold 15.0 GiB ({HELD} bytes of bf16)"]


def test_weights_messages():
    config = config_of("Llama-3.1-8B-Instruct")
    half = llama_weights(parameters=4015130624, dtype="bf16")
    assert checkpoint_mismatches(half, config, HELD, "bf16") == [
        "weights: the Model says 7.5 GiB (8030261248 bytes: 4015130624 parameters x bf16), "
        "the safetensors hold 15.0 GiB (16060522496 bytes of bf16)"]
    # An fp32 checkpoint served in bf16 takes bf16 bytes, and the other way round.
    bf16 = llama_weights(parameters=8030261248, dtype="bf16")
    assert checkpoint_mismatches(bf16, config, 2 * HELD, "fp32") == []
    fp32 = llama_weights(parameters=8030261248, dtype="fp32")
    assert checkpoint_mismatches(fp32, config, HELD, "bf16") == []
    assert checkpoint_mismatches(half, config, 2 * HELD, "fp32") == [
        "weights: the Model says 7.5 GiB (8030261248 bytes: 4015130624 parameters x bf16), "
        "the safetensors hold 29.9 GiB (32121044992 bytes of fp32; 15.0 GiB = 16060522496 "
        "bytes in bf16)"]
    # A cast to fp8 would be quantization: the bytes must match as they are.
    fp8 = llama_weights(parameters=8030261248, dtype="fp8")
    assert checkpoint_mismatches(fp8, config, HELD, "bf16") == [
        "weights: the Model says 7.5 GiB (8030261248 bytes: 8030261248 parameters x fp8), "
        "the safetensors hold 15.0 GiB (16060522496 bytes of bf16)"]
    small = llama_weights(bytes=2**21, dtype="fp32")
    assert checkpoint_mismatches(small, config, 2**20, "fp32") == [
        "weights: the Model says 2.0 MiB (2097152 bytes), the safetensors hold 1.0 MiB "
        "(1048576 bytes of fp32)"]
    quantity = llama_weights(bytes="16Gi", dtype="bf16")
    assert checkpoint_mismatches(quantity, config, 2**33, None) == [
        "weights: the Model says 16.0 GiB (16Gi = 17179869184 bytes), the safetensors hold "
        "8.0 GiB (8589934592 bytes)"]


# --- safetensors headers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def save(torch, path: Path, **shapes_dtypes) -> None:
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape, dtype=dtype)
               for name, (shape, dtype) in shapes_dtypes.items()}, str(path))


def test_weights_of_bf16_and_fp32_files(torch, tmp_path):
    bf16, fp32 = torch.bfloat16, torch.float32
    save(torch, tmp_path / "a.safetensors", w=((64, 48), bf16), norm=((48,), fp32))
    save(torch, tmp_path / "b.safetensors", v=((10, 7), bf16), b=((3,), fp32))
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    held = 64 * 48 * 2 + 48 * 4 + 10 * 7 * 2 + 3 * 4
    assert weights_from_safetensors(files) == {"bytes": held, "dtype": "bf16",
                                               "safetensorsDtype": "BF16"}
    # Mostly fp32 bytes: fp32.
    save(torch, tmp_path / "c.safetensors", big=((100, 100), fp32), small=((10,), bf16))
    assert weights_from_safetensors([tmp_path / "c.safetensors"]) == {
        "bytes": 40020, "dtype": "fp32", "safetensorsDtype": "F32"}
    # A directory: every *.safetensors without an index.
    assert weights_from_directory(tmp_path)["bytes"] == held + 40020
    header = read_safetensors_header(tmp_path / "a.safetensors")
    start, end = header["w"]["data_offsets"]
    assert (header["w"]["dtype"], header["w"]["shape"], end - start) == ("BF16", [64, 48], 6144)


def test_an_index_names_the_shards(torch, tmp_path):
    save(torch, tmp_path / "model-00001-of-00002.safetensors", a=((8, 8), torch.float16))
    save(torch, tmp_path / "model-00002-of-00002.safetensors", b=((4,), torch.float16))
    save(torch, tmp_path / "consolidated.safetensors", a=((8, 8), torch.float16),
         b=((4,), torch.float16))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 136},
        "weight_map": {"a": "model-00001-of-00002.safetensors",
                       "b": "model-00002-of-00002.safetensors"}}))
    assert [Path(p).name for p in safetensors_files(tmp_path)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert weights_from_directory(tmp_path) == {"bytes": 136, "dtype": "fp16",
                                                "safetensorsDtype": "F16"}


def test_import_reads_the_safetensors(capsys, tmp_path):
    from kvpilot.worker.tiny import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path / "tiny-llama")
    code, out, _ = run(capsys, directory, "--context", "512")
    spec = yaml.safe_load(out)["spec"]
    params = 261 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert code == 0 and spec["weights"] == {"bytes": 4 * params, "dtype": "fp32"}
    assert spec["architecture"] == {"layers": 2, "attentionHeads": 4, "kvHeads": 2,
                                    "headDim": 16, "maxContextTokens": 4096}


def test_unreadable_safetensors(tmp_path):
    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    whole = write("whole.safetensors", struct.pack("<Q", len(header)) + header + bytes(8))
    assert weights_from_safetensors([whole])["bytes"] == 8
    cases = {
        "short.safetensors": (b"\x01\x02", "under 8 bytes"),
        "huge.safetensors": (struct.pack("<Q", 2**40), "a header of 1099511627776 bytes"),
        "cut-header.safetensors": (struct.pack("<Q", len(header)) + header[:10],
                                   "truncated (its header needs"),
        "cut-data.safetensors": (struct.pack("<Q", len(header)) + header + bytes(7),
                                 "truncated (tensor w ends at byte 8 of 7)"),
        "not-json.safetensors": (struct.pack("<Q", 4) + b"{{{{", "not a safetensors file"),
        "no-offsets.safetensors": (struct.pack("<Q", 15) + b'{"w": {"a": 1}}',
                                   "tensor w: no valid dtype and data_offsets"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(CheckpointUnreadable, match=re.escape(message)):
            weights_from_safetensors([write(name, data)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointUnreadable, match="no \\*.safetensors files"):
        weights_from_directory(empty)


def test_checkpoint_module_is_pure():
    from tests.layering_helpers import imported_heavy

    assert imported_heavy("kvpilot.api.checkpoint") == []
