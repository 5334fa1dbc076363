#!/usr/bin/env bash
# The GPU check: train 30 steps, evaluate, generate and serve 16 concurrent requests on an accelerator, each
# compared with the CPU (same seed): greedy float32 tokens identical, losses within float32 / bf16 tolerance,
# and tokens/s of E2P against the plain backbone. Usage: scripts/gpu_check.sh [--device cuda:1] [--out DIR]
# Figures go to docs/performance.md ("On a GPU"). Needs a CUDA build of torch in the environment it runs in
# (PY=/path/to/python to pick one; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__ + ': run this on a GPU machine with a CUDA build of torch')"
exec "$PY" scripts/gpu_check.py "$@"
