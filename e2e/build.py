"""Build the control-plane binaries from the Go module proxy, once, into a cache.

Release downloads are not an option for kvpilot's test machines, so every binary the
local cluster needs is compiled from its Go module:

- kube-apiserver, kube-scheduler, kube-controller-manager and kubectl come from
  ``k8s.io/kubernetes``. That module requires its staging modules (``k8s.io/api``,
  ``k8s.io/client-go``...) at ``v0.0.0`` and replaces them with ``./staging`` paths,
  which a dependent module cannot see. We therefore write a small local module that
  replaces each staging module by its published ``v0.N.M`` and build from there
  (``go install pkg@version`` refuses modules with replace directives).
- etcd's server module is ``package main``; it is built from a local module too.
- kwok and helm install with ``go install``.

Binaries land in ``~/.cache/kvpilot/bin/<name>-<version>`` and are rebuilt only when
missing. A cold build on two cores takes a long while, so progress is printed as it goes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"

KUBE_COMMANDS = ("kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubectl")


def cache_root() -> Path:
    return Path(os.environ.get("KVPILOT_CACHE", Path.home() / ".cache" / "kvpilot"))


def bin_dir() -> Path:
    return cache_root() / "bin"


@dataclass(frozen=True)
class Binary:
    name: str
    version: str

    @property
    def path(self) -> Path:
        return bin_dir() / f"{self.name}-{self.version}"


BINARIES = {
    **{name: Binary(name, KUBERNETES_VERSION) for name in KUBE_COMMANDS},
    "etcd": Binary("etcd", ETCD_VERSION),
    "kwok": Binary("kwok", KWOK_VERSION),
    "helm": Binary("helm", HELM_VERSION),
}


def binary(name: str) -> Path:
    """Path of a built binary; raises with the command to run if it is missing."""
    path = BINARIES[name].path
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run: python -m e2e.build")
    return path


def log(message: str) -> None:
    print(f"[kvpilot build] {message}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-buildvcs=false")
    env["CGO_ENABLED"] = "0"
    return env


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a (long) go command, printing a heartbeat so a cold build shows progress."""
    log(f"{what}: {' '.join(cmd[:3])} ...")
    start = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(30):
            log(f"{what}: still running, {time.monotonic() - start:.0f}s elapsed")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=_go_env(), capture_output=True, text=True)
    finally:
        done.set()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    log(f"{what}: done in {time.monotonic() - start:.0f}s")


def module_dir(module: str, version: str, workdir: Path) -> Path:
    """The source of a published Go module, downloaded into Go's module cache from the
    module proxy and checked against the checksum database (``go mod download``)."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir, env=_go_env(), capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r'"Dir":\s*"([^"]+)"', out)
    if not match:
        raise RuntimeError(f"go mod download gave no directory for {module}@{version}: {out}")
    return Path(match.group(1))


def staging_replacements(kubernetes_go_mod: str, version: str) -> list[str]:
    """Turn k8s.io/kubernetes' ``./staging`` replaces into published-version replaces.

    ``k8s.io/api => ./staging/src/k8s.io/api`` becomes ``k8s.io/api => k8s.io/api v0.36.3``
    for Kubernetes ``v1.36.3``: staging modules are published as ``v0.<minor>.<patch>``.
    """
    staging_version = "v0." + version.removeprefix("v").split(".", 1)[1]
    modules = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", kubernetes_go_mod, re.M)
    if not modules:
        raise RuntimeError("no staging replace directives found in k8s.io/kubernetes go.mod")
    return [f"{m} => {m} {staging_version}" for m in modules]


def _work_module(name: str) -> Path:
    path = cache_root() / "src" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_kubernetes() -> None:
    missing = [n for n in KUBE_COMMANDS if not BINARIES[n].path.exists()]
    if not missing:
        return
    version = KUBERNETES_VERSION
    work = _work_module(f"kubernetes-{version}")
    k8s_dir = module_dir("k8s.io/kubernetes", version, work)
    replaces = staging_replacements((k8s_dir / "go.mod").read_text(), version)
    go_version = re.search(r"^go (\S+)", (k8s_dir / "go.mod").read_text(), re.M).group(1)
    (work / "go.mod").write_text(
        "module kvpilot.local/kubernetes\n\n"
        f"go {go_version}\n\n"
        f"require k8s.io/kubernetes {version}\n\n"
        "replace (\n" + "".join(f"\t{r}\n" for r in replaces) + ")\n"
    )
    packages = [f"k8s.io/kubernetes/cmd/{n}" for n in missing]
    _run(["go", "get", *[f"{p}@{version}" for p in packages]], work, "resolve kubernetes modules")
    minor = version.removeprefix("v").split(".")[1]
    pkg = "k8s.io/component-base/version"
    ldflags = " ".join([
        "-s -w",
        f"-X {pkg}.gitVersion={version}",
        f"-X {pkg}.gitMajor=1",
        f"-X {pkg}.gitMinor={minor}",
        f"-X {pkg}.gitTreeState=clean",
        f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        f"-X k8s.io/client-go/pkg/version.gitVersion={version}",
    ])
    out = Path(tempfile.mkdtemp(dir=bin_dir()))
    try:
        _run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out) + "/", *packages],
             work, f"build {', '.join(missing)} {version} (about 7 min on 2 cores when cold)")
        for n in missing:
            (out / n).rename(BINARIES[n].path)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def build_etcd() -> None:
    target = BINARIES["etcd"]
    if target.path.exists():
        return
    work = _work_module(f"etcd-{target.version}")
    (work / "go.mod").write_text("module kvpilot.local/etcd\n\ngo 1.24\n")
    _run(["go", "get", f"go.etcd.io/etcd/server/v3@{target.version}"], work, "resolve etcd modules")
    tmp = target.path.with_suffix(".partial")
    _run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(tmp), "go.etcd.io/etcd/server/v3"],
         work, f"build etcd {target.version}")
    tmp.rename(target.path)


def go_install(name: str, package: str, ldflags: str = "") -> None:
    target = BINARIES[name]
    if target.path.exists():
        return
    gobin = Path(tempfile.mkdtemp(dir=bin_dir()))
    try:
        env_cmd = ["env", f"GOBIN={gobin}", "go", "install", "-trimpath",
                   "-ldflags", f"-s -w {ldflags}".strip(), f"{package}@{target.version}"]
        _run(env_cmd, bin_dir(), f"install {name} {target.version}")
        (gobin / name).rename(target.path)
    finally:
        shutil.rmtree(gobin, ignore_errors=True)


def build_all() -> dict[str, Path]:
    bin_dir().mkdir(parents=True, exist_ok=True)
    if shutil.which("go") is None:
        raise RuntimeError("the go command is required to build the control plane")
    start = time.monotonic()
    build_etcd()
    go_install("kwok", "sigs.k8s.io/kwok/cmd/kwok")
    go_install("helm", "helm.sh/helm/v3/cmd/helm",
               ldflags=f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}")
    build_kubernetes()
    log(f"all binaries present in {bin_dir()} ({time.monotonic() - start:.0f}s)")
    return {name: b.path for name, b in BINARIES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.build", description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="only print where each binary is")
    args = parser.parse_args(argv)
    if args.print:
        for name, b in BINARIES.items():
            print(f"{name}\t{b.path}\t{'present' if b.path.exists() else 'missing'}")
        return 0
    try:
        build_all()
    except (RuntimeError, subprocess.CalledProcessError) as err:
        log(str(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
