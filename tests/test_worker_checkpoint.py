"""The worker checks its checkpoint against its Model before it serves: a checkpoint that
disagrees, or cannot be opened, and a model that fails to load stop it with status 1 and
a reason in the termination message file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from kvpilot.api import contract
from kvpilot.api.checkpoint import (
    architecture_from_config, model_document, read_config, weights_from_directory,
)
from kvpilot.api.model import Model
from kvpilot.worker.__main__ import check_checkpoint
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    subprocess.run([sys.executable, "-m", "kvpilot.worker.tiny", str(directory)], check=True,
                   env=ENV, cwd=ROOT, capture_output=True, timeout=120)
    return directory


def truthful(directory, **architecture) -> dict:
    """The Model `kvpilot import` writes for the checkpoint, with ``architecture`` changed."""
    weights = weights_from_directory(directory)
    arch = {**architecture_from_config(read_config(directory)), **architecture}
    return model_document(name="tiny", architecture=arch,
                          weights={"bytes": weights["bytes"], "dtype": weights["dtype"]},
                          context=256, concurrency=2)


def test_check_in_process(tiny, tmp_path):
    spec = Model.model_validate(truthful(tiny)).spec
    assert check_checkpoint(str(tiny), spec, "tiny") is None
    wrong = Model.model_validate(truthful(tiny, layers=4, kvHeads=4)).spec
    assert check_checkpoint(str(tiny), wrong, "tiny") == (
        contract.REASON_WEIGHTS_MISMATCH,
        f"the checkpoint at {tiny} disagrees with Model tiny: architecture.layers: the Model "
        "says 4, config.json says 2; architecture.kvHeads: the Model says 4, config.json "
        "says 2")
    empty = tmp_path / "empty"
    empty.mkdir()
    reason, message = check_checkpoint(str(empty), spec, "tiny")
    assert reason == contract.REASON_WEIGHTS_UNAVAILABLE
    assert message.startswith(f"the checkpoint at {empty}: {empty}/config.json: cannot read")
    shutil.copy(tiny / "config.json", empty / "config.json")
    assert check_checkpoint(str(empty), spec, "tiny") == (
        contract.REASON_WEIGHTS_UNAVAILABLE,
        f"the checkpoint at {empty}: {empty}: no *.safetensors files")


def start(tiny, tmp_path, model: dict, *, port: int | None = None,
          by_env: bool = False) -> tuple:
    """The worker with the Model from --spec, or (``by_env``) as the operator hands it."""
    log = tmp_path / "termination-log"
    env = {**ENV, contract.ENV_TERMINATION_LOG: str(log)}
    if by_env:
        env.update({contract.ENV_MODEL_SPEC: json.dumps(model["spec"]),
                    contract.ENV_MODEL_NAME: model["metadata"]["name"]})
        given = []
    else:
        spec_file = tmp_path / "model.yaml"
        spec_file.write_text(yaml.safe_dump(model))
        given = ["--spec", str(spec_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpilot.worker", "--model", str(tiny), *given,
         "--host", "127.0.0.1", "--port", str(port or free_port()), "--device", "cpu"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


@pytest.mark.parametrize("by_env", [False, True], ids=["spec-file", "operator-env"])
def test_a_model_the_checkpoint_disagrees_with_is_not_served(tiny, tmp_path, by_env):
    proc, log = start(tiny, tmp_path, truthful(tiny, layers=3), by_env=by_env)
    assert proc.wait(timeout=120) == 1, proc.stdout.read()
    assert log.read_text() == (
        f"WeightsMismatch: the checkpoint at {tiny} disagrees with Model tiny: "
        "architecture.layers: the Model says 3, config.json says 2")


def test_a_model_that_fails_to_load_says_so(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "tokenizer.json").unlink()  # the check passes; loading does not
    proc, log = start(broken, tmp_path, truthful(broken))
    assert proc.wait(timeout=120) == 1, proc.stdout.read()
    assert log.read_text().startswith("LoadFailed: ")
    assert "tokenizer.json" in log.read_text()


def test_a_truthful_model_is_served(tiny, tmp_path):
    port = free_port()
    proc, log = start(tiny, tmp_path, truthful(tiny), port=port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}{contract.PATH_READY}", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not log.exists()
