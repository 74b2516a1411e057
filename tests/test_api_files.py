"""Model files as ``kvpilot plan`` reads them: the invalid and edge tables, hostile YAML,
and a bound on the work one file can cost."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from kvpilot.api import files
from kvpilot.api.files import FileError, load_models, parse_documents
from kvpilot.cli import main
from tests.conftest import EXAMPLES, llama_spec
from tests.invalid_models import INVALID, VALID, document

FLEET = EXAMPLES / "fleets" / "mixed.yaml"
EXAMPLE = (EXAMPLES / "llama-3-8b.yaml").read_text()
LOADERS = [pytest.param(files._LOADER, id="libyaml"),
           pytest.param(files.PYTHON_LOADER, id="python")]


def plan(capsys, *args):
    code = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in INVALID])
def test_plan_refuses_what_the_api_server_refuses(capsys, tmp_path, case):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(document(case, llama_spec())))
    code, out, err = plan(capsys, FLEET, path)
    assert code == 2 and out == ""
    assert err.startswith(f"kvpilot plan: {path}: {case.field}: ") or (
        err.startswith(f"kvpilot plan: {path}: ") and f"; {case.field}: " in err), err
    assert case.loader_text in err and err.count("\n") == 1, err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in VALID])
def test_plan_handles_edge_models(capsys, tmp_path, case):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(document(case, llama_spec(replicas=3))))
    code, out, err = plan(capsys, FLEET, path)
    assert code == 0 and err == "", err
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert out.splitlines()[-1].endswith("of 3"), out
    code, out, _ = plan(capsys, FLEET, path, "-o", "json")
    assert code == 0 and json.loads(out)["models"][0]["replicas"] == 3


def test_longest_name_keeps_the_table_100_columns_wide(capsys, tmp_path):
    name = VALID[0].name
    assert name is not None and len(name) == 50
    path = tmp_path / "model.yaml"
    path.write_text(EXAMPLE.replace("name: llama-3-8b", f"name: {name}")
                    .replace("replicas: 2", "replicas: 60").replace("maxReplicas: 8",
                                                                    "maxReplicas: 60"))
    code, out, _ = plan(capsys, FLEET, path, "-o", "json")
    placed = json.loads(out)["models"][0]["placed"]
    assert code == 0 and placed < 60
    code, out, _ = plan(capsys, FLEET, path)
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, out
    assert f"{name}-59" in out  # an unplaced replica, named in full
    row = lines.index(name)  # the name has a line of its own, its figures the next one
    assert lines[row + 1].split()[:2] == [f"{placed}/60", "131,072"]


HOSTILE = [
    ("duplicate-top-key", EXAMPLE + "kind: Model\n", "duplicate key 'kind' at line"),
    ("duplicate-nested-key", EXAMPLE.replace("  replicas: 2\n", "  replicas: 2\n  replicas: 3\n"),
     "duplicate key 'replicas' at line"),
    ("deep-block", "spec:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)),
     "nested deeper than 32 levels"),
    ("deep-flow", "spec: " + "[" * 600 + "]" * 600, "cannot read"),
    ("billion-laughs", "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
     "more than 10000 values (aliases counted at every use)"),
    ("recursive-alias", "a: &a [1, *a]\n", "cannot read"),
    ("many-values", "spec: [" + ", ".join(["1"] * 20_000) + "]\n",
     "a document holds more than 10000 values"),
    ("long-integer", EXAMPLE.replace("replicas: 2", "replicas: " + "9" * 5000),
     "Exceeds the limit (4300 digits)"),
    ("tab-indent", "kind: Model\n\tspec: {}\n", "cannot read"),
    ("list-document", "- kind: Model\n", "not a Model (kind: list)"),
    ("scalar-document", "just words\n", "not a Model (kind: str)"),
    ("other-kind", "kind: Deployment\n", "not a Model (kind: Deployment)"),
    ("empty", "", "holds no Model"),
    ("second-document", EXAMPLE + "---\n" + EXAMPLE.replace("kvHeads: 8", "kvHeads: 0"),
     "(document 2): spec.architecture.kvHeads"),
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("text, message", [pytest.param(t, m, id=i) for i, t, m in HOSTILE])
def test_hostile_yaml_is_one_clear_error(loader, text, message):
    with pytest.raises(FileError) as err:
        files.models_from_documents(parse_documents(text, "m.yaml", loader), "m.yaml")
    assert str(err.value).startswith("m.yaml") and message in str(err.value), err.value
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_aliases_within_the_bounds_still_load(loader):
    text = EXAMPLE.replace("  name: llama-3-8b\n", "  name: llama-3-8b\n  labels: &team {team: a}\n"
                           "  annotations: *team\n")
    model = files.models_from_documents(parse_documents(text, "m.yaml", loader), "m.yaml")[0]
    assert model.metadata.model_extra == {"labels": {"team": "a"}, "annotations": {"team": "a"}}


def test_unreadable_files_name_the_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(EXAMPLE.replace("Llama", "L\xe4ma").encode("latin-1"))
    big = tmp_path / "big.yaml"
    big.write_text(EXAMPLE + "#" * files.MAX_FILE_BYTES)
    for path, message in [(latin1, "not UTF-8 text (line 1, byte 3)"), (big, "larger than 1 MiB"),
                          (tmp_path, "cannot read"), (tmp_path / "missing.yaml", "cannot read")]:
        with pytest.raises(FileError, match="^" + str(path)) as err:
            load_models(path)
        assert message in str(err.value)
        code, _, out = plan(capsys, FLEET, path)
        assert code == 2 and out.startswith(f"kvpilot plan: {path}: ") and message in out


def _python_calls(fn) -> int:
    """Python function calls made by fn(): the work done, independent of the machine."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fn()
    except FileError:
        pass
    finally:
        sys.setprofile(None)
    return calls


def _all_wrong() -> str:
    """Every field of a Model wrong at once, at the largest size each allows."""
    spec = {
        "weights": {"bytes": "9" * 20 + "." + "9" * 20 + "e99", "parameters": "x"},
        "architecture": {"layers": 10**30, "attentionHeads": -1, "kvHeads": 0.5,
                         "headDim": "128", "maxContextTokens": None},
        "sla": {"contextTokens": [1] * 1000, "concurrentSequences": {"a": 1}},
        "runtimeOverhead": "1" * 64, "tensorParallel": "a" * 1000,
        "gpuProducts": ["x" * 63] * 1000,
        "worker": {"image": "a/" * 256, "engineArgs": ["\x00" * 1024] * 200,
                   "resources": {"requests": {f"example.com/{'d' * 60}{i}": "1e99"
                                              for i in range(1000)}}},
    }
    return yaml.safe_dump({"kind": "Model", "metadata": {"name": "x" * 10_000}, "spec": spec})


NASTY = {
    "all-wrong": _all_wrong(),
    "billion-laughs": HOSTILE[4][1],
    "many-values": HOSTILE[6][1],
    "long-string": EXAMPLE.replace("hf://", "hf://" + "x" * (files.MAX_FILE_BYTES - 2000)),
}


def _load(text: str, loader) -> None:
    files.models_from_documents(parse_documents(text, "m.yaml", loader), "m.yaml")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", NASTY)
def test_work_per_document_is_bounded(loader, name):
    text = NASTY[name]
    assert len(text.encode()) <= files.MAX_FILE_BYTES
    one_model = _python_calls(lambda: _load(EXAMPLE, loader))
    # The worst single document costs what a few hundred ordinary Models do, however
    # large its numbers, deep its nesting or many its aliases.
    assert _python_calls(lambda: _load(text, loader)) <= 300 * one_model


def test_work_per_file_is_bounded_by_its_size():
    count = files.MAX_FILE_BYTES // (len(EXAMPLE) + 4)
    text = "---\n".join([EXAMPLE] * count)
    assert len(text.encode()) <= files.MAX_FILE_BYTES
    one_model = _python_calls(lambda: _load(EXAMPLE, None))
    # the largest file costs what its Models cost one by one, no more
    assert _python_calls(lambda: _load(text, None)) <= count * one_model * 1.05
