"""kvpilot.worker.fetch against the stand-in hub (e2e.hub): the files a worker loads and no
others, one download per node, a restart that downloads nothing, and one termination
line a user can act on for each way it fails.

The hub serves ROOT/org/tiny (a real tiny checkpoint from ``python -m kvpilot.worker.tiny``
plus a ``pytorch_model.bin`` and an ``original/x.pth`` that must stay behind),
org/sharded (an index, two shards, one of 12 MiB, and a second layout,
``consolidated.safetensors``, that the index does not name), org/binonly and
org/noconfig. Success, a restart, two replicas at once and one refusal run as real
processes; the rest calls ``main(argv)`` in this process, which is quicker.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.file_download
import pytest

from e2e.hub import Hub
from kvpilot.api.source import parse_source
from kvpilot.worker import fetch

ROOT = Path(__file__).resolve().parents[1]
TINY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
MiB = 1 << 20


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    tiny = root / "org" / "tiny"
    subprocess.run([sys.executable, "-m", "kvpilot.worker.tiny", str(tiny)], check=True,
                   env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"})
    (tiny / "pytorch_model.bin").write_bytes(b"\x80" * 1000)
    (tiny / "original").mkdir()
    (tiny / "original" / "x.pth").write_bytes(b"\x80" * 500)

    sharded = root / "org" / "sharded"
    sharded.mkdir()
    shutil.copy(tiny / "config.json", sharded)
    rng = random.Random(0)
    (sharded / SHARDS[0]).write_bytes(rng.randbytes(12 * MiB))
    (sharded / SHARDS[1]).write_bytes(rng.randbytes(1000))
    (sharded / "consolidated.safetensors").write_bytes(rng.randbytes(3000))
    (sharded / fetch.INDEX).write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1],
                                        "c.weight": SHARDS[1]}}))

    binonly = root / "org" / "binonly"
    binonly.mkdir()
    shutil.copy(tiny / "config.json", binonly)
    shutil.copy(tiny / "pytorch_model.bin", binonly)
    noconfig = root / "org" / "noconfig"
    noconfig.mkdir()
    shutil.copy(tiny / "model.safetensors", noconfig)
    return root


@pytest.fixture
def hub(hub_root):
    with Hub(hub_root) as h:
        yield h


@dataclass
class Run:
    rc: int
    out: str  # stdout
    termination: str  # the termination message file ("" when none was written)


def fetch_env(hub: Hub, tmp_path: Path, token: str | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", ""),
           "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}",
           "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(tmp_path / "hf-home"),
           "KVPILOT_TERMINATION_LOG": str(tmp_path / "termination-log")}
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def termination(tmp_path: Path) -> str:
    path = tmp_path / "termination-log"
    text = path.read_text() if path.exists() else ""
    path.unlink(missing_ok=True)
    return text


def run_process(hub: Hub, tmp_path: Path, source: str, dest: Path, *args: str,
                token: str | None = None) -> Run:
    done = subprocess.run([sys.executable, "-m", "kvpilot.worker.fetch", source,
                           "--dest", str(dest), *args],
                          env=fetch_env(hub, tmp_path, token), capture_output=True, text=True,
                          timeout=120)
    return Run(done.returncode, done.stdout, termination(tmp_path))


@pytest.fixture
def run_here(hub, tmp_path, monkeypatch, capsys):
    """``fetch.main`` in this process, with the environment a subprocess gets."""
    # Read when huggingface_hub was imported: set on the module as the env var would.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)

    def run(source: str, dest: Path, *args: str, token: str | None = None) -> Run:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        for k, v in fetch_env(hub, tmp_path, token).items():
            if k not in ("PATH", "PYTHONPATH", "HF_HOME"):
                monkeypatch.setenv(k, v)
        capsys.readouterr()
        rc = fetch.main([source, "--dest", str(dest), *args])
        return Run(rc, capsys.readouterr().out, termination(tmp_path))

    return run


def files_in(dest: Path) -> dict[str, bytes]:
    """The checkpoint's files, without huggingface_hub's .cache and the marker."""
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(dest).parts
            and p.name != fetch.MARKER}


def resolve(repo: str, commit: str, path: str) -> str:
    return f"/{repo}/resolve/{commit}/{path}"


# --- success --------------------------------------------------------------------------


def test_fetch_downloads_only_what_a_worker_loads(hub, hub_root, tmp_path):
    dest = tmp_path / "cache" / "hf" / "org" / "tiny" / "main"
    commit = hub.repo("org/tiny").commit

    run = run_process(hub, tmp_path, "hf://org/tiny", dest)

    assert (run.rc, run.termination) == (0, "")
    tiny = hub_root / "org" / "tiny"
    assert files_in(dest) == {name: (tiny / name).read_bytes() for name in TINY_FILES}
    sizes = {name: (tiny / name).stat().st_size for name in TINY_FILES}
    marker = json.loads((dest / fetch.MARKER).read_text())
    assert {k: v for k, v in marker.items() if k != "fetched_at"} == {
        "source": "hf://org/tiny", "repo": "org/tiny", "revision": "main", "commit": commit,
        "files": sizes, "bytes": sum(sizes.values())}
    assert (dest.parent / "main.lock").is_file()
    # Each wanted file once; nothing of pytorch_model.bin or original/.
    gets = sorted(r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path)
    assert gets == [resolve("org/tiny", commit, name) for name in TINY_FILES]
    assert not [r for r in hub.requests if ".bin" in r.path or "original" in r.path]
    lines = run.out.splitlines()
    assert lines[0] == (f"fetch hf://org/tiny: commit {commit}, 5 files, 429 KiB (429 KiB to "
                        f"download) from {hub.url} into {dest}")
    assert re.fullmatch(r"fetch hf://org/tiny: 5/5 files, 429 KiB of 429 KiB \(100%\), "
                        r"[\d.]+ [KMG]?i?B/s", lines[-2])
    assert lines[-1] == f"fetch hf://org/tiny: done, commit {commit} in {dest}"


def test_a_second_fetch_downloads_nothing(hub, tmp_path):
    dest = tmp_path / "tiny"
    assert run_process(hub, tmp_path, "hf://org/tiny", dest).rc == 0
    before = len(hub.requests)

    run = run_process(hub, tmp_path, "hf://org/tiny", dest)

    assert (run.rc, run.termination) == (0, "")
    # A branch is still resolved to its commit; no file is asked for.
    assert [(r.method, r.path) for r in hub.requests[before:]] == [
        ("GET", "/api/models/org/tiny/revision/main")]
    assert run.out == (f"fetch hf://org/tiny: {dest} already holds commit "
                       f"{hub.repo('org/tiny').commit} (5 files, 429 KiB); nothing to download\n")


def test_a_pinned_commit_fetched_before_needs_no_hub(hub, tmp_path, run_here):
    commit = hub.repo("org/tiny").commit
    dest = tmp_path / "tiny"
    assert run_here(f"hf://org/tiny@{commit}", dest).rc == 0
    before = len(hub.requests)

    run = run_here(f"hf://org/tiny@{commit}", dest)

    assert run.rc == 0
    assert hub.requests[before:] == []
    assert "nothing to download" in run.out


def test_files_of_another_commit_are_removed(hub, tmp_path, run_here):
    dest = tmp_path / "tiny"
    dest.mkdir()
    (dest / "model-00001-of-00009.safetensors").write_bytes(b"old")

    run = run_here("hf://org/tiny", dest)

    assert run.rc == 0
    assert sorted(files_in(dest)) == sorted(TINY_FILES)
    commit = hub.repo("org/tiny").commit
    assert (f"fetch hf://org/tiny: removed model-00001-of-00009.safetensors (not in commit "
            f"{commit})") in run.out.splitlines()


def test_an_unreachable_hub_leaves_a_complete_download_in_use(hub, tmp_path, run_here):
    dest = tmp_path / "tiny"
    assert run_here("hf://org/tiny", dest).rc == 0
    hub.fail("/api/", status=503)

    run = run_here("hf://org/tiny", dest)

    assert (run.rc, run.termination) == (0, "")
    assert run.out.startswith(
        "fetch hf://org/tiny: the hub cannot be reached (503 on GET "
        "/api/models/org/tiny/revision/main); using the complete download of commit "
        f"{hub.repo('org/tiny').commit} in {dest} from ")


def test_two_fetches_into_one_directory_download_once(hub, tmp_path):
    dest = tmp_path / "cache" / "tiny"
    commit = hub.repo("org/tiny").commit
    weights = resolve("org/tiny", commit, "model.safetensors")
    release = hub.hold(weights)
    env = fetch_env(hub, tmp_path)
    cmd = [sys.executable, "-m", "kvpilot.worker.fetch", "hf://org/tiny", "--dest", str(dest)]
    with open(tmp_path / "a.out", "w") as a_out, open(tmp_path / "b.out", "w") as b_out:
        a = subprocess.Popen(cmd, env=env, stdout=a_out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: hub.count("HEAD", weights) == 1)  # A holds the lock, mid-download
            b = subprocess.Popen(cmd, env=env, stdout=b_out, stderr=subprocess.STDOUT)
            wait_for(lambda: "waiting" in (tmp_path / "b.out").read_text())
        finally:
            release.set()
        assert (a.wait(timeout=60), b.wait(timeout=60)) == (0, 0)

    gets = sorted(r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path)
    assert gets == [resolve("org/tiny", commit, name) for name in TINY_FILES]
    assert (tmp_path / "b.out").read_text().splitlines() == [
        f"fetch hf://org/tiny: waiting for another download into {dest} to finish "
        f"(lock {dest}.lock)",
        f"fetch hf://org/tiny: {dest} already holds commit {commit} (5 files, 429 KiB); "
        "nothing to download"]
    assert (tmp_path / "a.out").read_text().splitlines()[-1] == (
        f"fetch hf://org/tiny: done, commit {commit} in {dest}")


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_with_an_index_only_its_shards_are_fetched(hub, hub_root, tmp_path, run_here):
    dest = tmp_path / "sharded"

    run = run_here("hf://org/sharded", dest)

    assert run.rc == 0
    sharded = hub_root / "org" / "sharded"
    # Not consolidated.safetensors: the worker would load it as well.
    assert files_in(dest) == {name: (sharded / name).read_bytes()
                              for name in ("config.json", fetch.INDEX, *SHARDS)}


def test_progress_is_printed_while_a_file_downloads(hub, tmp_path, run_here, monkeypatch):
    monkeypatch.setattr(fetch, "PROGRESS_EVERY", 0.05)
    release = hub.hold(resolve("org/sharded", hub.repo("org/sharded").commit, SHARDS[0]))
    threading.Timer(0.5, release.set).start()

    run = run_here("hf://org/sharded", tmp_path / "sharded")

    assert run.rc == 0
    progress = [re.fullmatch(r"fetch hf://org/sharded: (\d)/4 files, .+ of 12\.0 MiB "
                             r"\((\d+)%\), .+/s", line) for line in run.out.splitlines()[1:-1]]
    assert all(progress), run.out
    # While the 12 MiB shard is held, at most the three small files are done.
    assert [m.groups() for m in progress if int(m.group(1)) < 4 and int(m.group(2)) == 0]
    assert progress[-1].groups() == ("4", "100")


def test_a_connection_cut_mid_file_resumes(hub, hub_root, tmp_path, run_here):
    commit = hub.repo("org/sharded").commit
    big = resolve("org/sharded", commit, SHARDS[0])
    hub.cut(big, after_bytes=11 * MiB)

    run = run_here("hf://org/sharded", tmp_path / "sharded")

    assert run.rc == 0
    assert (tmp_path / "sharded" / SHARDS[0]).read_bytes() == \
        (hub_root / "org" / "sharded" / SHARDS[0]).read_bytes()
    # huggingface_hub writes 10 MiB at a time: the second request starts after the first
    # 10 MiB it kept.
    assert [r.range for r in hub.requests if r.method == "GET" and r.path == big] == [
        None, f"bytes={10 * MiB}-"]


# --- refusals and missing things ------------------------------------------------------


def test_a_gated_repository_needs_a_token(hub, tmp_path, run_here):
    hub.protect("org/tiny", "hf_good")

    refused = run_process(hub, tmp_path, "hf://org/tiny", tmp_path / "a")
    wrong = run_here("hf://org/tiny", tmp_path / "b", token="hf_bad")
    ok = run_here("hf://org/tiny", tmp_path / "c", token="hf_good")

    access = ("set spec.sourceSecret to a Secret whose HF_TOKEN has access and whose account "
              "accepted the repository's terms")
    assert (refused.rc, refused.termination) == (1, (
        "WeightsUnavailable: hub refused access to org/tiny (401, a gated repository): "
        f"{access} (no token was given)"))
    assert (wrong.rc, wrong.termination) == (1, (
        "WeightsUnavailable: hub refused access to org/tiny (403, a gated repository): "
        f"{access} (the token given was refused)"))
    assert (ok.rc, ok.termination) == (0, "")
    assert sorted(files_in(tmp_path / "c")) == sorted(TINY_FILES)
    assert {r.token for r in hub.requests if r.path.startswith("/org/tiny/resolve/")} == {
        "hf_good"}


def test_a_private_repository_without_a_token(hub, tmp_path, run_here):
    hub.protect("org/tiny", "hf_good", gated=False)

    run = run_here("hf://org/tiny", tmp_path / "tiny")

    assert (run.rc, run.termination) == (1, (
        "WeightsUnavailable: hub refused access to org/tiny (401): it does not exist, or it is "
        "private or gated; check spec.source, or set spec.sourceSecret to a Secret whose "
        "HF_TOKEN has access (no token was given)"))


def test_a_missing_repository_or_revision_is_named(hub, tmp_path, run_here):
    repo = run_here("hf://org/nope", tmp_path / "a", token="hf_any")
    revision = run_here("hf://org/tiny@v9", tmp_path / "b")

    assert (repo.rc, repo.termination) == (1, (
        f"WeightsUnavailable: repository org/nope not found on {hub.url} (404); or the token "
        "given has no access to it: check spec.source"))
    assert (revision.rc, revision.termination) == (1, (
        f"WeightsUnavailable: revision v9 not found in org/tiny on {hub.url} (404): check the "
        "@REVISION of spec.source (a branch, tag or commit id)"))
    assert not (tmp_path / "b").exists()


def test_a_bare_404_says_what_was_asked_for(hub, tmp_path, run_here):
    hub.bare_errors = True  # a proxy or mirror that drops X-Error-Code

    run = run_here("hf://org/tiny@v9", tmp_path / "tiny")

    assert (run.rc, run.termination) == (1, (
        f"WeightsUnavailable: org/tiny@v9 not found on {hub.url} (404 on GET "
        "/api/models/org/tiny/revision/v9, without saying whether the repository, the "
        "revision or a file is missing): check spec.source and HF_ENDPOINT"))


def test_only_pytorch_bin_weights_are_refused(hub, tmp_path, run_here):
    run = run_here("hf://org/binonly", tmp_path / "binonly")

    commit = hub.repo("org/binonly").commit
    assert (run.rc, run.termination) == (1, (
        f"WeightsUnavailable: hf://org/binonly (commit {commit}) has no *.safetensors weights "
        "at its top level (it has pytorch_model.bin): kvpilot serves safetensors only; use a "
        "repository or revision with safetensors weights"))
    assert hub.count("GET", "/org/binonly/resolve/") == 0


def test_weights_without_config_are_refused(hub, tmp_path, run_here):
    run = run_here("hf://org/noconfig", tmp_path / "noconfig")

    commit = hub.repo("org/noconfig").commit
    assert (run.rc, run.termination) == (1, (
        f"WeightsUnavailable: hf://org/noconfig (commit {commit}) has no config.json at its "
        "top level: kvpilot serves Hugging Face checkpoints (config.json and *.safetensors "
        "weights)"))


def test_another_scheme_is_a_usage_error(tmp_path, run_here):
    run = run_here("pvc://models/llama", tmp_path / "x")

    assert (run.rc, run.termination) == (2, (
        "WeightsUnavailable: pvc://models/llama is not an hf:// source: only hub repositories "
        "are fetched; other schemes are mounted"))


# --- trouble that passes, and trouble that does not ----------------------------------


def test_5xx_twice_then_success(hub, tmp_path, run_here):
    hub.fail("/api/models/org/tiny/revision/", times=2)

    run = run_here("hf://org/tiny", tmp_path / "tiny", "--backoff", "0.01")

    assert (run.rc, run.termination) == (0, "")
    assert run.out.splitlines()[:2] == [
        "fetch hf://org/tiny: attempt 1 of 6 failed (503 on GET "
        "/api/models/org/tiny/revision/main); again in 0.01 s",
        "fetch hf://org/tiny: attempt 2 of 6 failed (503 on GET "
        "/api/models/org/tiny/revision/main); again in 0.02 s"]
    assert hub.count("GET", "/api/models/org/tiny/revision/") == 3


def test_a_failed_file_is_fetched_again_and_the_rest_kept(hub, tmp_path, run_here):
    commit = hub.repo("org/tiny").commit
    weights = resolve("org/tiny", commit, "model.safetensors")
    hub.fail(weights, times=1, method="GET")

    run = run_here("hf://org/tiny", tmp_path / "tiny", "--backoff", "0.01")

    assert (run.rc, run.termination) == (0, "")
    assert f"attempt 1 of 6 failed (503 on GET {weights}); again in 0.01 s" in run.out
    gets = sorted(r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path)
    assert gets == sorted([resolve("org/tiny", commit, n) for n in TINY_FILES] + [weights])


def test_5xx_forever_fails_after_the_retries(hub, tmp_path, run_here):
    hub.fail("/api/models/org/tiny/revision/")

    run = run_here("hf://org/tiny", tmp_path / "tiny", "--retries", "2", "--backoff", "0.01")

    assert (run.rc, run.termination) == (1, (
        f"WeightsUnavailable: hub at {hub.url} did not serve hf://org/tiny after 3 attempts "
        "(last: 503 on GET /api/models/org/tiny/revision/main): check that the node reaches "
        "the hub (HF_ENDPOINT) and the hub's status"))
    assert hub.count("GET", "/api/models/org/tiny/revision/") == 3


class FullDisk:
    """A file on a disk with ``room`` bytes left, shared by every file: the write that
    overflows it writes what fits, then fails as a full disk does."""

    def __init__(self, file, disk: dict):
        self._file, self._disk = file, disk

    def write(self, data: bytes) -> int:
        with self._disk["lock"]:
            n = min(len(data), self._disk["room"])
            self._disk["room"] -= n
        self._file.write(data[:n])
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_a_full_disk_removes_the_partial_files_and_says_how_much_is_needed(
        hub, tmp_path, run_here, monkeypatch):
    dest = tmp_path / "tiny"
    # A partial file of an earlier run that was killed.
    orphan = dest / fetch.PARTIALS / "abc.deadbeef.12345678.incomplete"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"\0" * 5000)
    disk = {"room": 4096, "lock": threading.Lock()}
    real = huggingface_hub.file_download.http_get
    monkeypatch.setattr(huggingface_hub.file_download, "http_get",
                        lambda url, f, *a, **kw: real(url, FullDisk(f, disk), *a, **kw))

    run = run_here("hf://org/tiny", dest)

    assert run.rc == 1
    assert not list(dest.rglob("*.incomplete"))
    assert not (dest / "model.safetensors").exists()
    assert not (dest / fetch.MARKER).exists()
    tiny = hub.repo("org/tiny")
    needed = sum(tiny.files[name].size for name in TINY_FILES if not (dest / name).exists())
    match = re.fullmatch(
        rf"WeightsUnavailable: no space for hf://org/tiny in {re.escape(str(dest))} \(ENOSPC: "
        r"No space left on device; partial files removed\): it needs (.+) more, (.+) are "
        r"free; give the node's weights cache more room or remove old checkpoints from it",
        run.termination)
    assert match is not None, run.termination
    assert match.group(1) == fetch.format_bytes(needed)


def test_too_little_space_fails_before_downloading(hub, tmp_path, run_here, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10**9, 10**9 - 1000, 1000))

    run = run_here("hf://org/tiny", tmp_path / "tiny")

    assert (run.rc, run.termination) == (1, (
        f"WeightsUnavailable: no space for hf://org/tiny in {tmp_path / 'tiny'} (not enough "
        "free space to start): it needs 429 KiB more, 1000 B are free; give the node's "
        "weights cache more room or remove old checkpoints from it"))
    assert hub.count("GET", "/org/tiny/resolve/") == 0


# --- pure parts -----------------------------------------------------------------------


def test_progress_line():
    source = parse_source("hf://org/name@rev")
    assert fetch.progress_line(source, 3, 5, int(1.23 * 2**30), 15 * 2**30, 110 * MiB) == (
        "fetch hf://org/name@rev: 3/5 files, 1.2 GiB of 15.0 GiB (8%), 110 MiB/s")
    assert fetch.progress_line(source, 0, 0, 0, 0, 0) == (
        "fetch hf://org/name@rev: 0/0 files, 0 B of 0 B (100%), 0 B/s")


def test_format_bytes():
    assert [fetch.format_bytes(n) for n in (0, 1023, 1024, 439646, 99.94 * MiB, 100 * MiB,
                                            2**40 * 3)] == [
        "0 B", "1023 B", "1.0 KiB", "429 KiB", "99.9 MiB", "100 MiB", "3.0 TiB"]


def test_weight_files_follow_the_index():
    tree = {"config.json": 10, "a.safetensors": 1, "b.safetensors": 2,
            "consolidated.safetensors": 3, "sub/c.safetensors": 4}
    assert fetch.weight_files(tree, None) == (
        {"a.safetensors": 1, "b.safetensors": 2, "consolidated.safetensors": 3}, [])
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "gone.safetensors"}}
    assert fetch.weight_files(tree, index) == (
        {"a.safetensors": 1, "b.safetensors": 2}, ["gone.safetensors"])


# --- the stand-in itself --------------------------------------------------------------


def test_the_stand_in_serves_ranges(hub, hub_root):
    commit = hub.repo("org/tiny").commit
    url = hub.url + resolve("org/tiny", "main", "config.json")
    data = (hub_root / "org" / "tiny" / "config.json").read_bytes()

    head = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"))
    part = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"}))

    assert (head.status, head.headers["X-Repo-Commit"], head.headers["Content-Length"],
            head.headers["Accept-Ranges"]) == (200, commit, str(len(data)), "bytes")
    assert head.headers["ETag"] == f'"{hub.repo("org/tiny").files["config.json"].blob_id}"'
    assert (part.status, part.headers["Content-Range"], part.read()) == (
        206, f"bytes 100-{len(data) - 1}/{len(data)}", data[100:])
