"""A stand-in for the Hugging Face hub, for tests and the demo.

Serves model repositories from a local directory: ``ROOT/ORG/NAME/`` holds the files of
the default branch ``main``. Its commit id is a sha1 over the file list (paths, sizes and
content hashes), so the same files give the same commit in every run; a repository
answers to ``main`` and to that commit id, and to no other revision.

It speaks the part of the hub's HTTP API that ``huggingface_hub`` (2.5) uses to download
(``snapshot_download``, ``hf_hub_download``, ``HfApi.model_info``/``repo_info``,
``HfApi.list_repo_tree``):

- ``GET /api/models/ORG/NAME[/revision/REV]``: the model info (``id``, ``sha``,
  ``siblings``; sizes and LFS data with ``?blobs=True``).
- ``GET /api/models/ORG/NAME/tree/REV[/PATH][?recursive=True]``: the files (with sizes,
  blob ids and, for weights, LFS data) and folders, in one page.
- ``HEAD`` and ``GET /ORG/NAME/resolve/REV/PATH``: the file, with ``ETag`` (sha256 for
  LFS-stored files, the git blob id for others), ``X-Repo-Commit``, ``Content-Length``,
  ``Accept-Ranges: bytes``; ``Range: bytes=N-`` (or ``N-M``) answers 206. Files are
  served directly, not through a 302 to a CDN as the real hub does for LFS files.

Errors carry ``X-Error-Code`` and ``X-Error-Message`` as the hub sends them:
``RepoNotFound`` (401 without a token, 404 with one, as the hub answers so as not to
tell which private repositories exist), ``RevisionNotFound`` (404), ``EntryNotFound``
(404) and ``GatedRepo`` (401 without a token, 403 with a wrong one).

Faults for tests, set on the object while it runs: ``protect`` (a repository needs a
token), ``fail`` (N answers 5xx under a path prefix, then success), ``cut`` (drop the
connection after K bytes of a file, once), ``hold`` (answer under a prefix only once an
event is set) and ``bare_errors`` (errors without ``X-Error-Code``, as a plain proxy
sends them). ``requests`` records every request, for assertions such as "the second
fetch downloaded no file".

``python -m e2e.hub ROOT [--host 127.0.0.1] [--port N]`` serves ROOT and prints its URL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_BRANCH = "main"
# Files the hub stores in LFS (by the .gitattributes most model repositories have): their
# tree entries carry LFS data and their ETag is the content's sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".h5", ".onnx",
                ".msgpack", ".ckpt")
CHUNK = 1 << 20

_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass(frozen=True)
class Request:
    """One request as the stand-in saw it."""

    method: str
    path: str  # unquoted, without the query
    range: Optional[str]  # the Range header, if any
    token: Optional[str]  # the bearer token, if any


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    blob_id: str  # the git blob sha1 of the content
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Repo:
    """A repository's default branch as it is on disk now."""

    repo_id: str
    commit: str
    files: dict[str, HubFile]


@dataclass
class _Protection:
    token: str
    gated: bool


@dataclass
class _Failure:
    prefix: str
    left: Optional[int]  # None: forever
    status: int
    method: Optional[str]  # None: any


class Hub:
    """The stand-in hub: ``with Hub(root) as hub: ... hub.url ...``."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False):
        self.root = Path(root)
        self.verbose = verbose
        self.bare_errors = False
        self.requests: list[Request] = []
        self._protected: dict[str, _Protection] = {}
        self._failures: list[_Failure] = []
        self._cuts: dict[str, int] = {}
        self._holds: list[tuple[str, threading.Event]] = []
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Hub":
        # A short poll: stop() waits for the serving loop to see the request to stop.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for _, event in self._holds:  # nothing stays parked past the end
            event.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Hub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- faults --------------------------------------------------------------------------

    def protect(self, repo_id: str, token: str, *, gated: bool = True) -> None:
        """Answer ``repo_id`` only to ``Authorization: Bearer <token>``. Gated: 401
        ``GatedRepo`` without a token, 403 with another one. Private (``gated=False``):
        ``RepoNotFound``, 401 without a token and 404 with another one."""
        self._protected[repo_id] = _Protection(token, gated)

    def fail(self, prefix: str, times: Optional[int] = None, status: int = 503,
             method: Optional[str] = None) -> None:
        """Answer ``status`` to the next ``times`` requests (of ``method``, or any) whose
        path starts with ``prefix`` (every one while ``times`` is None), before anything
        else is checked."""
        with self._lock:
            self._failures.append(_Failure(prefix, times, status, method))

    def cut(self, path: str, after_bytes: int) -> None:
        """Close the connection after ``after_bytes`` bytes of the next GET of ``path``
        (a resolve path such as ``/org/tiny/resolve/main/model.safetensors``; any
        revision matches), which still announces the full Content-Length."""
        with self._lock:
            self._cuts[_any_revision(path)] = after_bytes

    def hold(self, prefix: str) -> threading.Event:
        """Park requests whose path starts with ``prefix`` until the returned event is set."""
        event = threading.Event()
        with self._lock:
            self._holds.append((prefix, event))
        return event

    def count(self, method: str, prefix: str = "/") -> int:
        """How many ``method`` requests had a path starting with ``prefix``."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and r.path.startswith(prefix))

    # --- the repositories ----------------------------------------------------------------

    def repo(self, repo_id: str) -> Optional[Repo]:
        """The repository as it is on disk now (None when there is no such folder)."""
        folder = self.root / repo_id
        if "/" not in repo_id or not folder.is_dir():
            return None
        files = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                files[rel] = self._describe(p, rel)
        listing = "".join(f"{f.path}\0{f.size}\0{f.sha256}\n" for f in files.values())
        return Repo(repo_id, hashlib.sha1(listing.encode()).hexdigest(), files)

    def _describe(self, path: Path, rel: str) -> HubFile:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            hashes = self._hashes.get(key)
        if hashes is None:
            blob = hashlib.sha1(f"blob {st.st_size}\0".encode())
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    blob.update(chunk)
                    sha.update(chunk)
            hashes = (blob.hexdigest(), sha.hexdigest())
            with self._lock:
                self._hashes[key] = hashes
        return HubFile(rel, st.st_size, hashes[0], hashes[1], rel.endswith(LFS_SUFFIXES))

    # --- what the handler asks -----------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _injected_failure(self, method: str, path: str) -> Optional[int]:
        with self._lock:
            for f in self._failures:
                if (path.startswith(f.prefix) and f.method in (None, method)
                        and (f.left is None or f.left > 0)):
                    if f.left is not None:
                        f.left -= 1
                    return f.status
        return None

    def _wait_for_holds(self, path: str) -> None:
        with self._lock:
            events = [e for prefix, e in self._holds if path.startswith(prefix)]
        for event in events:
            event.wait()

    def _take_cut(self, path: str) -> Optional[int]:
        with self._lock:
            return self._cuts.pop(_any_revision(path), None)


def _any_revision(resolve_path: str) -> str:
    match = _RESOLVE.match(resolve_path)
    return f"{match.group(1)}/{match.group(3)}" if match else resolve_path


def _tree_entry(f: HubFile) -> dict:
    entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
    if f.lfs:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return entry


def _sibling(f: HubFile, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": f.path}
    sibling = {"rfilename": f.path, "size": f.size, "blobId": f.blob_id}
    if f.lfs:
        sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
    return sibling


class _Answer(Exception):
    """An error answer: status, X-Error-Code (or None) and message."""

    def __init__(self, status: int, code: Optional[str], message: str,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _handler_for(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects of the hub
        server_version = "kvpilot-stand-in-hub"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            if hub.verbose:
                super().log_message(format, *args)

        def do_GET(self):
            self._serve(body=True)

        def do_HEAD(self):
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            hub._record(Request(self.command, path, self.headers.get("Range"), token))
            hub._wait_for_holds(path)
            try:
                status = hub._injected_failure(self.command, path)
                if status is not None:
                    raise _Answer(status, None, "injected failure")
                if (m := _API.match(path)) is not None:
                    repo = self._repo(m.group(1), token)
                    if m.group(2) == "tree":
                        commit = self._commit(repo, m.group(3))
                        self._json(self._tree(repo, m.group(4) or "", query), body, commit)
                    else:
                        commit = self._commit(repo, m.group(3) or DEFAULT_BRANCH)
                        self._json(self._info(repo, commit, query), body, commit)
                elif (m := _RESOLVE.match(path)) is not None:
                    repo = self._repo(m.group(1), token)
                    commit = self._commit(repo, m.group(2))
                    self._file(repo, commit, m.group(3), path, body)
                else:
                    raise _Answer(404, None, f"no such endpoint: {path}")
            except _Answer as answer:
                self._error(answer, body)
            except (BrokenPipeError, ConnectionResetError):  # the client went away
                self.close_connection = True

        # --- checks --------------------------------------------------------------------

        def _repo(self, repo_id: str, token: Optional[str]) -> Repo:
            repo = hub.repo(repo_id)
            guard = hub._protected.get(repo_id)
            if repo is None or (guard is not None and not guard.gated and token != guard.token):
                raise _Answer(401 if token is None else 404, "RepoNotFound",
                              "Repository not found")
            if guard is not None and token != guard.token:
                if token is None:
                    raise _Answer(401, "GatedRepo",
                                  f"Access to model {repo_id} is restricted. You must have "
                                  "access to it and be authenticated to access it. Please log in.")
                raise _Answer(403, "GatedRepo",
                              f"Access to model {repo_id} is restricted and you are not in "
                              "the authorized list.")
            return repo

        def _commit(self, repo: Repo, revision: str) -> str:
            if revision in (DEFAULT_BRANCH, repo.commit):
                return repo.commit
            raise _Answer(404, "RevisionNotFound", f"Invalid rev id: {revision}")

        # --- answers -------------------------------------------------------------------

        def _info(self, repo: Repo, commit: str, query: dict) -> dict:
            blobs = query.get("blobs", "").lower() == "true"
            guard = hub._protected.get(repo.repo_id)
            return {
                "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit,
                "private": guard is not None and not guard.gated,
                "gated": "manual" if guard is not None and guard.gated else False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [_sibling(f, blobs) for f in repo.files.values()],
            }

        def _tree(self, repo: Repo, under: str, query: dict) -> list[dict]:
            recursive = query.get("recursive", "").lower() == "true"
            prefix = f"{under.strip('/')}/" if under.strip("/") else ""
            if prefix and not any(p.startswith(prefix) for p in repo.files):
                raise _Answer(404, "EntryNotFound", f"{under} does not exist on {DEFAULT_BRANCH}")
            entries, folders = [], set()
            for f in repo.files.values():
                if not f.path.startswith(prefix):
                    continue
                rest = f.path[len(prefix):].split("/")
                for depth in range(1, len(rest)):
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(rest[:depth]))
                if recursive or len(rest) == 1:
                    entries.append(_tree_entry(f))
            entries += [{"type": "directory", "path": d, "size": 0,
                         "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
            return entries

        def _file(self, repo: Repo, commit: str, rel: str, path: str, body: bool) -> None:
            f = repo.files.get(rel)
            if f is None:
                raise _Answer(404, "EntryNotFound", f"Entry not found: {rel}",
                              {"X-Repo-Commit": commit})
            start, end = self._range(f.size)
            headers = {"ETag": f'"{f.etag}"', "X-Repo-Commit": commit,
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                       "Content-Length": str(end - start)}
            if (start, end) != (0, f.size):
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
            self.send_response(206 if "Content-Range" in headers else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            cut = hub._take_cut(path)
            sent = 0
            with open(hub.root / repo.repo_id / rel, "rb") as src:
                src.seek(start)
                while sent < end - start:
                    n = min(CHUNK, end - start - sent)
                    if cut is not None:
                        n = min(n, cut - sent)
                        if n <= 0:  # the client gets a body shorter than announced
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                    self.wfile.write(src.read(n))
                    sent += n

        def _range(self, size: int) -> tuple[int, int]:
            """The half-open byte range asked for (the whole file without Range)."""
            header = self.headers.get("Range")
            if not header:
                return 0, size
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
            if m is None or int(m.group(1)) >= max(size, 1):
                raise _Answer(416, None, f"Range Not Satisfiable: {header}",
                              {"Content-Range": f"bytes */{size}"})
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            return int(m.group(1)), end

        def _json(self, payload, body: bool, commit: str) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, answer: _Answer, body: bool) -> None:
            data = json.dumps({"error": answer.message}).encode()
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if answer.code is not None and not hub.bare_errors:
                self.send_header("X-Error-Code", answer.code)
                self.send_header("X-Error-Message", answer.message)
            for k, v in answer.headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m e2e.hub",
                                 description="Serve ROOT/ORG/NAME/ as hub repositories.")
    ap.add_argument("root")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="do not log requests")
    args = ap.parse_args(argv)
    hub = Hub(args.root, args.host, args.port, verbose=not args.quiet)
    with hub:
        print(hub.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
