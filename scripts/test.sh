#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine and runs it.
# Used by .ci/run. Needs root (or sudo) for apt-get and for starting PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  if [ ! -d /etc/postgresql ] || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    echo "==> installing PostgreSQL"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
  fi
  echo "==> starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return
    sleep 1
  done
  echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2
  exit 1
}

bash scripts/bootstrap.sh
ensure_postgres
echo "==> running the test suite"
exec .venv/bin/python -m pytest -q "$@"
