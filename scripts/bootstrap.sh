# Sourced by the other scripts: a virtual environment in .venv with kvpilot installed
# (editable, with the worker and dev extras). Wheels are cached under ~/.cache/kvpilot.
set -euo pipefail
KVPILOT_CACHE="${KVPILOT_CACHE:-$HOME/.cache/kvpilot}"
export KVPILOT_CACHE
export PIP_CACHE_DIR="$KVPILOT_CACHE/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  echo "[kvpilot] creating .venv" >&2
  python3 -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=".venv/.kvpilot-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[kvpilot] installing kvpilot[worker,dev] (first run downloads torch and triton)" >&2
  .venv/bin/python -m pip install --progress-bar off -q -e '.[worker,dev]'
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
