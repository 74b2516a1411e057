"""Download an ``hf://`` checkpoint for the worker: the init container of a worker pod.

``python -m kvpilot.worker.fetch hf://ORG/NAME[@REVISION] --dest DIR [--retries N]
[--backoff SECONDS]``

The operator runs it before the worker with DIR = the node's weights cache (a hostPath
all pods on the node share) joined with ``hf_cache_path(source)``, and the worker then
opens DIR as its checkpoint. ``HF_TOKEN`` (from ``spec.sourceSecret``) authenticates,
``HF_ENDPOINT`` names a mirror or a test hub.

- Only what the worker loads: ``config.json``, ``generation_config.json``, the tokenizer
  files and the top-level ``*.safetensors`` with their index. Where the repository has
  ``model.safetensors.index.json``, only the shards its ``weight_map`` names: a
  repository that also ships its weights in another layout (Mistral's
  ``consolidated.safetensors``) would otherwise download them twice, and the worker loads
  every ``*.safetensors`` in DIR. Never ``*.bin``, ``*.pt``, ``*.gguf`` or ``original/``:
  kvpilot serves safetensors only, and those copies are as large as the model.
- One download per node: an ``flock`` on ``DIR.lock``. A replica that starts while
  another downloads waits, then finds the download complete and exits.
- A marker, ``DIR/.kvpilot-fetched.json`` (commit, files, bytes), written last, once
  every file has its size: DIR with the marker of the commit is complete, so a restart
  downloads nothing. A branch is still resolved to its commit on the hub; when the hub
  cannot be reached, a complete earlier download is used, and the log says so.
- Files already complete stay (huggingface_hub keeps their commit and ETag under
  ``DIR/.cache/huggingface``), so a failed run's retry downloads only what is missing; a
  connection that breaks mid-file resumes within the run (in 10 MiB steps). Partial files
  of a killed run are never reused by huggingface_hub, so they are removed, and so are
  top-level files the commit does not have (a branch that moved).
- Space: the download starts only when the disk has room for what is missing; a disk
  that fills anyway (ENOSPC, EDQUOT) gets its partial files removed.
- Trouble that may pass (5xx, 408, 429, a broken connection) is retried with exponential
  backoff; anything else ends the run at once.
- A failure writes one line, ``WeightsUnavailable: <what to do>``, to the termination
  message file (``kvpilot.worker.termination``) and exits 1; a bad command line exits 2.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from kvpilot.api import contract
from kvpilot.api.source import DEFAULT_REVISION, Source, parse_source
from kvpilot.worker.termination import write_termination

# Exactly these names, top-level, besides the weights.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
INDEX = "model.safetensors.index.json"
# What a repository may hold instead of safetensors, named when it has nothing else.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
MARKER = ".kvpilot-fetched.json"
PARTIALS = Path(".cache") / "huggingface" / "download"  # huggingface_hub's *.incomplete
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PROGRESS_EVERY = 5.0  # seconds between progress lines
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class Context:
    """What every message needs: which checkpoint, where to, from where, with a token?"""

    source: Source
    dest: Path
    endpoint: str
    token: Optional[str]

    @property
    def repo(self) -> str:
        return self.source.location

    @property
    def revision(self) -> str:
        return self.source.revision or DEFAULT_REVISION


@dataclass(frozen=True)
class Marker:
    """The content of DIR/.kvpilot-fetched.json."""

    source: str
    repo: str
    revision: str
    commit: str
    files: dict[str, int]  # path in DIR -> bytes
    bytes: int
    fetched_at: str


@dataclass(frozen=True)
class Failure:
    """What went wrong: the user's message, whether trying again may help, and the
    error in a few words (for the message after the last retry)."""

    message: str
    transient: bool
    detail: str = ""


class Failed(Exception):
    """The run ends: ``message`` goes to the termination message file."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unusable(Exception):
    """The repository has no checkpoint the worker can open."""


class Incomplete(Exception):
    """A download ended without every file at its size."""


class NoSpace(Exception):
    """The weights cache cannot hold the rest of the checkpoint."""

    def __init__(self, needed: int, free: int, cause: str):
        super().__init__(f"{cause}: needs {needed} more bytes, {free} free")
        self.needed, self.free, self.cause = needed, free, cause


# --- decisions (pure) -----------------------------------------------------------------


def is_commit(revision: Optional[str]) -> bool:
    return revision is not None and len(revision) == 40 and all(
        c in "0123456789abcdef" for c in revision)


def checkpoint_problem(tree: dict[str, int]) -> Optional[str]:
    """None when the repository's files (path -> bytes) hold a checkpoint the worker can
    open, else what is missing."""
    top = [p for p in tree if "/" not in p]
    weights = [p for p in top if p.endswith(WEIGHTS_SUFFIX)]
    if "config.json" not in top:
        return ("has no config.json at its top level: kvpilot serves Hugging Face "
                "checkpoints (config.json and *.safetensors weights)")
    if not weights:
        others = sorted(p for p in tree if p.endswith(OTHER_WEIGHTS))
        found = f" (it has {', '.join(others[:4])}{', ...' if len(others) > 4 else ''})" \
            if others else ""
        return (f"has no *.safetensors weights at its top level{found}: kvpilot serves "
                "safetensors only; use a repository or revision with safetensors weights")
    return None


def config_files(tree: dict[str, int]) -> dict[str, int]:
    """The top-level configuration, tokenizer and index files of the repository."""
    return {p: n for p, n in tree.items()
            if "/" not in p and (p in CONFIG_FILES or p.endswith(INDEX_SUFFIX))}


def weight_files(tree: dict[str, int], index: Optional[dict]) -> tuple[dict[str, int], list[str]]:
    """The weight files to fetch and the shards the index names that the repository lacks.
    With an index, the shards of its ``weight_map``; without one, every top-level
    ``*.safetensors``."""
    if index is None:
        return {p: n for p, n in tree.items()
                if "/" not in p and p.endswith(WEIGHTS_SUFFIX)}, []
    shards = sorted(set(index.get("weight_map", {}).values()))
    return {p: tree[p] for p in shards if p in tree}, [p for p in shards if p not in tree]


def format_bytes(n: float) -> str:
    """1.2 GiB, 15.0 GiB, 110 MiB, 682 B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"


def progress_line(source: Source, files_done: int, files_total: int, bytes_done: int,
                  bytes_total: int, rate: float) -> str:
    percent = 100 * bytes_done // bytes_total if bytes_total else 100
    return (f"fetch {source}: {files_done}/{files_total} files, {format_bytes(bytes_done)} "
            f"of {format_bytes(bytes_total)} ({percent}%), {format_bytes(rate)}/s")


def _causes(err: Optional[BaseException]) -> Iterator[BaseException]:
    seen: list[BaseException] = []
    while err is not None and not any(err is s for s in seen):
        seen.append(err)
        yield err
        err = err.__cause__ or err.__context__


def diagnose(err: BaseException, ctx: Context) -> Failure:
    """What ``err`` means for the user, and whether it may pass: the first error in its
    chain (``raise ... from``) that kvpilot or the hub client can name."""
    import httpx2
    from huggingface_hub.errors import (FileMetadataError, HfHubHTTPError,
                                        IncompleteSnapshotError, LocalEntryNotFoundError)

    for e in _causes(err):
        if isinstance(e, Unusable):
            return Failure(str(e), transient=False)
        if isinstance(e, NoSpace):
            return Failure(
                f"no space for {ctx.source} in {ctx.dest} ({e.cause}): it needs "
                f"{format_bytes(e.needed)} more, {format_bytes(e.free)} are free; give the "
                "node's weights cache more room or remove old checkpoints from it",
                transient=False)
        if isinstance(e, (Incomplete, IncompleteSnapshotError)):
            return Failure(f"incomplete download ({e})", transient=True, detail=str(e))
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            return _http_failure(e, ctx)
        if isinstance(e, httpx2.TransportError):
            detail = f"{type(e).__name__}: {e}"
            return Failure(f"hub at {ctx.endpoint} unreachable ({detail})", transient=True,
                           detail=detail)
        if isinstance(e, FileMetadataError):
            return Failure(f"{ctx.endpoint} does not answer as a Hugging Face hub ({e}): "
                           "check HF_ENDPOINT", transient=False)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return Failure(f"no space for {ctx.source} in {ctx.dest} "
                           f"({errno.errorcode[e.errno]}: {e.strerror})", transient=False)
        if isinstance(e, OSError) and e.errno is not None:
            return Failure(f"cannot write the checkpoint into {ctx.dest}: {e.strerror} "
                           f"({e.filename or ctx.dest}); the weights cache must be writable "
                           "by the fetch", transient=False)
    if isinstance(err, LocalEntryNotFoundError) or "Consistency check failed" in str(err):
        # huggingface_hub's words for a connection problem, or a short body.
        return Failure(f"download from {ctx.endpoint} failed ({err})", transient=True,
                       detail=f"{type(err).__name__}: {err}")
    return Failure(f"fetching {ctx.source} failed: {type(err).__name__}: {err}",
                   transient=False)


def _http_failure(e, ctx: Context) -> Failure:
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    status = e.response.status_code
    request = e.response.request
    detail = f"{status} on {request.method} {request.url.path}" if request else str(status)
    token_note = ("the token given was refused" if ctx.token
                  else "no token was given")
    access = "set spec.sourceSecret to a Secret whose HF_TOKEN has access"
    if isinstance(e, GatedRepoError):
        return Failure(f"hub refused access to {ctx.repo} ({status}, a gated repository): "
                       f"{access} and whose account accepted the repository's terms "
                       f"({token_note})", transient=False, detail=detail)
    if isinstance(e, RepositoryNotFoundError) and status == 401 and not ctx.token:
        return Failure(f"hub refused access to {ctx.repo} (401): it does not exist, or it is "
                       f"private or gated; check spec.source, or {access} ({token_note})",
                       transient=False, detail=detail)
    if isinstance(e, RepositoryNotFoundError):
        return Failure(f"repository {ctx.repo} not found on {ctx.endpoint} ({status})"
                       + ("; or the token given has no access to it" if ctx.token else "")
                       + ": check spec.source", transient=False, detail=detail)
    if isinstance(e, RevisionNotFoundError):
        return Failure(f"revision {ctx.revision} not found in {ctx.repo} on {ctx.endpoint} "
                       f"({status}): check the @REVISION of spec.source (a branch, tag or "
                       "commit id)", transient=False, detail=detail)
    if isinstance(e, RemoteEntryNotFoundError):
        return Failure(f"a file of {ctx.repo}@{ctx.revision} is missing on {ctx.endpoint} "
                       f"({detail})", transient=False, detail=detail)
    if status in (401, 403):
        return Failure(f"hub refused access to {ctx.repo} ({status}): {access} "
                       f"({token_note})", transient=False, detail=detail)
    if status == 404:
        return Failure(f"{ctx.repo}@{ctx.revision} not found on {ctx.endpoint} ({detail}, "
                       "without saying whether the repository, the revision or a file is "
                       "missing): check spec.source and HF_ENDPOINT", transient=False,
                       detail=detail)
    if status in TRANSIENT_STATUS or status >= 500:
        return Failure(f"hub at {ctx.endpoint} answered {detail}", transient=True,
                       detail=detail)
    server = getattr(e, "server_message", None) or ""
    return Failure(f"hub at {ctx.endpoint} answered {detail}{': ' + server if server else ''}",
                   transient=False, detail=detail)


# --- the directory --------------------------------------------------------------------


def read_marker(dest: Path) -> Optional[Marker]:
    try:
        return Marker(**json.loads((dest / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_marker(dest: Path, marker: Marker) -> None:
    tmp = dest / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(asdict(marker), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, dest / MARKER)


def missing_files(dest: Path, files: dict[str, int]) -> dict[str, int]:
    """The files not in DIR at their size."""
    missing = {}
    for path, size in files.items():
        try:
            if (dest / path).stat().st_size == size:
                continue
        except OSError:
            pass
        missing[path] = size
    return missing


def remove_partials(dest: Path, files: dict[str, int]) -> int:
    """Remove huggingface_hub's partial downloads and any of ``files`` not at its size (with
    its download metadata, so it is fetched again); returns how many files went."""
    removed = 0
    for p in (dest / PARTIALS).rglob("*.incomplete"):
        p.unlink(missing_ok=True)
        removed += 1
    for path in missing_files(dest, files):
        if (dest / path).is_file():
            (dest / path).unlink(missing_ok=True)
            (dest / PARTIALS / f"{path}.metadata").unlink(missing_ok=True)
            removed += 1
    return removed


def remove_stale(dest: Path, files: dict[str, int]) -> list[str]:
    """Remove the top-level files that are not ``files`` (those of an earlier commit of a
    branch): the worker loads every ``*.safetensors`` in DIR."""
    stale = sorted(p.name for p in dest.iterdir()
                   if p.is_file() and p.name not in files and p.name != MARKER)
    for name in stale:
        (dest / name).unlink()
        (dest / PARTIALS / f"{name}.metadata").unlink(missing_ok=True)
    return stale


def bytes_on_disk(dest: Path, files: dict[str, int]) -> tuple[int, int]:
    """(files complete, bytes written): complete files plus the partial downloads."""
    missing = missing_files(dest, files)
    done = [size for path, size in files.items() if path not in missing]
    partial = 0
    for p in (dest / PARTIALS).rglob("*.incomplete"):
        try:
            partial += p.stat().st_size
        except OSError:  # renamed into place since the listing
            pass
    return len(done), sum(done) + partial


@contextmanager
def node_lock(ctx: Context) -> Iterator[None]:
    """Hold ``DIR.lock`` (next to DIR): one download per directory on the node. The file
    stays; removing it would let a third process lock a new file while the second holds
    the old one."""
    dest = ctx.dest
    lock = dest.parent / f"{dest.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(ctx, f"waiting for another download into {dest} to finish (lock {lock})")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def say(ctx: Context, text: str) -> None:
    print(f"fetch {ctx.source}: {text}", flush=True)


class Progress:
    """Prints a progress line every ``every`` seconds while the download runs, from the
    sizes under DIR, and one at the end."""

    def __init__(self, ctx: Context, files: dict[str, int], every: float):
        self.ctx, self.files, self.every = ctx, files, every
        self.total = sum(files.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-progress", daemon=True)
        self._start = time.monotonic()
        self._first = bytes_on_disk(ctx.dest, files)[1]

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        done, written = bytes_on_disk(self.ctx.dest, self.files)
        rate = (written - self._first) / max(time.monotonic() - self._start, 1e-3)
        print(progress_line(self.ctx.source, done, len(self.files), written, self.total, rate),
              flush=True)

    def _run(self) -> None:
        last_t, last_b = self._start, self._first
        while not self._stop.wait(self.every):
            done, written = bytes_on_disk(self.ctx.dest, self.files)
            now = time.monotonic()
            rate = (written - last_b) / max(now - last_t, 1e-3)
            print(progress_line(self.ctx.source, done, len(self.files), written, self.total,
                                rate), flush=True)
            last_t, last_b = now, written


# --- the run --------------------------------------------------------------------------


def fetch(ctx: Context, retries: int, backoff: float) -> Marker:
    """Make DIR hold the checkpoint; returns its marker. Raises Failed."""
    marker = read_marker(ctx.dest)
    complete = marker is not None and not missing_files(ctx.dest, marker.files)
    if complete and is_commit(ctx.source.revision) and marker.commit == ctx.source.revision:
        say(ctx, f"{ctx.dest} already holds it ({len(marker.files)} files, "
            f"{format_bytes(marker.bytes)}); nothing to download")
        return marker
    attempt = 0
    while True:
        try:
            return fetch_once(ctx, marker if complete else None)
        except Exception as err:  # noqa: BLE001 (every error becomes a message)
            failure = diagnose(err, ctx)
            if failure.transient and complete:
                say(ctx, f"the hub cannot be reached ({failure.detail}); using the complete "
                    f"download of commit {marker.commit} in {ctx.dest} from {marker.fetched_at}")
                return marker
            if not failure.transient:
                raise Failed(failure.message) from err
            if attempt == retries:
                raise Failed(f"hub at {ctx.endpoint} did not serve {ctx.source} after "
                             f"{retries + 1} attempts (last: {failure.detail}): check that the "
                             "node reaches the hub (HF_ENDPOINT) and the hub's status") from err
        delay = backoff * 2 ** attempt
        attempt += 1
        say(ctx, f"attempt {attempt} of {retries + 1} failed ({failure.detail}); "
            f"again in {delay:g} s")
        time.sleep(delay)


def fetch_once(ctx: Context, complete: Optional[Marker]) -> Marker:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    token = ctx.token or False  # never a token saved on the node
    api = HfApi(endpoint=ctx.endpoint, token=token)
    commit = api.repo_info(ctx.repo, revision=ctx.revision).sha
    if complete is not None and complete.commit == commit:
        say(ctx, f"{ctx.dest} already holds commit {commit} ({len(complete.files)} files, "
            f"{format_bytes(complete.bytes)}); nothing to download")
        return complete
    tree = {f.path: f.size for f in api.list_repo_tree(ctx.repo, recursive=True, revision=commit)
            if isinstance(f, RepoFile)}
    problem = checkpoint_problem(tree)
    if problem:
        raise Unusable(f"{ctx.source} (commit {commit}) {problem}")

    (ctx.dest / MARKER).unlink(missing_ok=True)  # DIR changes now: not complete until the end
    ctx.dest.mkdir(parents=True, exist_ok=True)
    configs = config_files(tree)
    removed = remove_partials(ctx.dest, {})
    if removed:
        say(ctx, f"removed {removed} partial file(s) of an earlier run")
    index = None
    if INDEX in tree:
        with no_space_check(ctx, configs):
            hf_hub_download(ctx.repo, INDEX, revision=commit, local_dir=ctx.dest,
                            endpoint=ctx.endpoint, token=token)
        index = json.loads((ctx.dest / INDEX).read_text())
    weights, absent = weight_files(tree, index)
    if absent:
        raise Unusable(f"{ctx.source} (commit {commit}) has {INDEX} naming shards the "
                       f"repository does not have: {', '.join(absent[:4])}")
    files = {**configs, **weights}
    total = sum(files.values())
    stale = remove_stale(ctx.dest, files)
    if stale:
        say(ctx, f"removed {', '.join(stale)} (not in commit {commit})")
    needed = sum(missing_files(ctx.dest, files).values())
    free = shutil.disk_usage(ctx.dest).free
    if needed > free:
        raise NoSpace(needed, free, "not enough free space to start")
    say(ctx, f"commit {commit}, {len(files)} files, {format_bytes(total)} "
        f"({format_bytes(needed)} to download) from {ctx.endpoint} into {ctx.dest}")
    with no_space_check(ctx, files), Progress(ctx, files, PROGRESS_EVERY):
        # Exact names as patterns: *.safetensors would also take sub/x.safetensors and the
        # weights of a second layout.
        snapshot_download(ctx.repo, revision=commit, local_dir=ctx.dest, endpoint=ctx.endpoint,
                          token=token, allow_patterns=[glob.escape(p) for p in sorted(files)])
    missing = missing_files(ctx.dest, files)
    if missing:
        raise Incomplete(f"{len(missing)} file(s) not at their size after the download: "
                         f"{', '.join(sorted(missing)[:4])}")
    marker = Marker(source=str(ctx.source), repo=ctx.repo, revision=ctx.revision,
                    commit=commit, files=files, bytes=total,
                    fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_marker(ctx.dest, marker)
    say(ctx, f"done, commit {commit} in {ctx.dest}")
    return marker


@contextmanager
def no_space_check(ctx: Context, files: dict[str, int]) -> Iterator[None]:
    """Turn a full disk (or quota) during the download into NoSpace, after removing the
    partial files so that the node gets its space back."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        remove_partials(ctx.dest, files)
        needed = sum(missing_files(ctx.dest, files).values())
        free = shutil.disk_usage(ctx.dest).free
        raise NoSpace(needed, free, f"{errno.errorcode[err.errno]}: {err.strerror}; "
                      "partial files removed") from err


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m kvpilot.worker.fetch",
        description="Download an hf:// checkpoint (safetensors, config, tokenizer) into DIR.")
    ap.add_argument("source", help="hf://ORG/NAME[@REVISION]")
    ap.add_argument("--dest", required=True, help="the checkpoint directory to fill")
    ap.add_argument("--retries", type=int, default=5,
                    help="retries after 5xx or connection errors (default 5)")
    ap.add_argument("--backoff", type=float, default=2.0,
                    help="seconds before the first retry, doubling each time (default 2)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        source = parse_source(args.source)
    except ValueError as err:
        write_termination(contract.REASON_WEIGHTS_UNAVAILABLE, str(err))
        return 2
    if source.scheme != "hf":
        write_termination(contract.REASON_WEIGHTS_UNAVAILABLE,
                          f"{source} is not an hf:// source: only hub repositories are "
                          "fetched; other schemes are mounted")
        return 2
    # Before huggingface_hub is imported: its settings are read then.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    ctx = Context(source, Path(args.dest).absolute(), endpoint,
                  os.environ.get("HF_TOKEN") or None)
    try:
        with node_lock(ctx):
            fetch(ctx, args.retries, args.backoff)
    except Failed as failed:
        write_termination(contract.REASON_WEIGHTS_UNAVAILABLE, failed.message)
        return 1
    except Exception as err:  # noqa: BLE001 (the lock or the marker: a message all the same)
        write_termination(contract.REASON_WEIGHTS_UNAVAILABLE, diagnose(err, ctx).message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
