#!/usr/bin/env bash
# Creates .venv with torch (CPU) and gradsentry with its server and dev extras.
# Idempotent: re-running after a change of pyproject.toml reinstalls the project only.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "==> creating .venv"
  # A half-made venv (interrupted, or ensurepip failing once) is removed and made again.
  rm -rf .venv
  "$PY" -m venv .venv || { echo "venv failed; retrying once" >&2; rm -rf .venv; sleep 2; "$PY" -m venv .venv; }
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "==> installing torch (CPU build)"
  # 2.13.0 is the local CPU build on these machines; an unpinned torch pulls a multi-GB CUDA build.
  "$VPY" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp=.venv/.gradsentry-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing gradsentry[dev] (editable)"
  "$VPY" -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
