#!/usr/bin/env bash
# Build .venv-bench: the separate venv for scripts/bench_data.py.
#
# Why separate: the reference pipeline (qwen-vl-utils + transformers' Qwen2-VL video
# processor) needs torchvision and decord, which do not fit the main venv's pinned torch.
# The torch/torchvision wheels come from this machine's local wheel index (see pip config);
# decord 0.6.0 and qwen-vl-utils come from PyPI.
#
# Usage: bash scripts/make_bench_venv.sh   (from anywhere; builds <repo>/.venv-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=${VENV:-.venv-bench}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 decord==0.6.0 qwen-vl-utils
"$VENV/bin/pip" install -q -e .
"$VENV/bin/python" - <<'PY'
import decord, qwen_vl_utils, torch, torchvision, transformers  # noqa: F401
print("bench venv ok: torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "decord", decord.__version__)
PY
