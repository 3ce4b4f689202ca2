#!/usr/bin/env bash
# The project's Python environment for the PyTorch binding (bindings/python) and its tests
# (tests/python): .venv (ignored by git) with torch from PyPI, numpy, safetensors and pytest.
# Idempotent: a complete environment is left as it is. torch is pinned to the version the reference
# measurements and golden vectors were made with. `--check` only says whether it is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=2.15.0

complete() {
    [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, numpy, safetensors, pytest, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" >/dev/null 2>&1
}
if [ "${1:-}" = --check ]; then
    complete
    exit
fi
complete && exit 0

if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
        rm -rf .venv
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==$torch_version" numpy safetensors pytest
