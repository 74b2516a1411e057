"""The Gateway API Inference Extension's CRDs, as a published release ships them.

kvpilot makes an InferencePool per Model where the cluster serves the extension's
InferencePool CRD. To test that against the real schema, the e2e tests install the CRDs
of a release: the extension's Go module, ``sigs.k8s.io/gateway-api-inference-extension``,
carries them under ``config/crd/bases``. It is fetched with ``go mod download`` from the
module proxy (checked against the checksum database, as e2e.build fetches the control
plane's modules), and its CRD files are copied to
``~/.cache/kvpilot/crds/gateway-api-inference-extension-<version>/``, once.

``python -m e2e.inference_extension`` fetches them and prints where they are.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from e2e import build

MODULE = "sigs.k8s.io/gateway-api-inference-extension"
# The newest release when this was written (`go list -m -versions` on MODULE). It serves
# InferencePool at inference.networking.k8s.io/v1 only, with endpointPickerRef optional
# (required before v1.5).
VERSION = "v1.6.2"
POOL_CRD_FILE = "inference.networking.k8s.io_inferencepools.yaml"


def crd_dir(version: str = VERSION) -> Path:
    """The release's CRD files, fetched when they are not cached yet."""
    target = build.cache_root() / "crds" / f"gateway-api-inference-extension-{version}"
    if (target / POOL_CRD_FILE).exists():
        return target
    if shutil.which("go") is None:
        raise RuntimeError(f"the go command is required to fetch {MODULE}@{version}")
    work = build.cache_root() / "src" / f"gateway-api-inference-extension-{version}"
    work.mkdir(parents=True, exist_ok=True)  # no go.mod: `go mod download` needs none
    build.log(f"fetch {MODULE}@{version}")
    source = build.module_dir(MODULE, version, work) / "config" / "crd" / "bases"
    found = sorted(source.glob("*.yaml"))
    if not any(f.name == POOL_CRD_FILE for f in found):
        raise RuntimeError(f"{MODULE}@{version} has no {POOL_CRD_FILE} in {source}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    partial.chmod(0o755)
    try:
        for f in found:
            shutil.copyfile(f, partial / f.name)  # the module cache's copies are read-only
        partial.rename(target)  # whole or not at all; a concurrent fetch may win the race
    except OSError:
        if not (target / POOL_CRD_FILE).exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def pool_crd(version: str = VERSION) -> Path:
    """The InferencePool CRD file of that release."""
    return crd_dir(version) / POOL_CRD_FILE


if __name__ == "__main__":
    print(pool_crd())
    sys.exit(0)
