#!/usr/bin/env bash
# The main job on a fresh machine, offline: the same set-up as the tests (scripts/setup.sh),
# then `reflectune recycle` on the bundled 40-row sample with the embedded SmolLM2-135M-Instruct
# as both the local oracle and the student. Writes ./reflectune-output/ (Arrow and Parquet data,
# README.md dataset card, plots, summary.json). Extra arguments go to `reflectune recycle`,
# e.g. `bash scripts/quickstart.sh --limit 8`.
#
# A 135M oracle left free rarely follows the reflection format; structured output (on by
# default: constrained decoding) keeps the format, but this model seldom ends a field by itself,
# so most rows come back `truncated` (a length bound ended the field; the row keeps its original
# pair) and few `ok`: the README gives the measured rates. Every row is kept with its status.
# Point at a real oracle for real data, e.g.
#   reflectune recycle --oracle_model gpt-4o-mini --data tatsu-lab/alpaca
#   reflectune recycle --oracle_model Qwen/Qwen2.5-7B-Instruct --base_url http://127.0.0.1:8000/v1 --data my.jsonl
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${REFLECTUNE_VENV:-$ROOT/.venv}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/reflectune" recycle \
  --data sample \
  --oracle_model local:smollm2-135m-instruct \
  --student_model smollm2-135m-instruct \
  --max_new_tokens 192 \
  --local_batch_size 16 \
  --output_dir "${REFLECTUNE_OUTPUT:-reflectune-output}" \
  "$@"
