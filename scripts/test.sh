#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (scripts/setup.sh, idempotent), then pytest
# over every marker. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${REFLECTUNE_VENV:-$ROOT/.venv}
cd "$ROOT"
# Nothing may download at run time: every model and dataset the tests use is local.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
exec "$VENV/bin/python" -m pytest "$@"
