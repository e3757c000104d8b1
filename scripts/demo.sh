#!/usr/bin/env bash
# Installs everything, then runs the demo: an embedded SQLite collector, a small
# GPT-style model training on the CPU and streaming into it, and the dashboard URL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/gradsentry demo "$@"
