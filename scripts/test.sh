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

# Browser tests drive Debian's Chromium through Playwright's Python package (never a
# downloaded browser); the compose test runs Debian's docker-compose.
ensure_test_tools() {
  local pkgs=()
  [ -x /usr/bin/chromium ] || pkgs+=(chromium chromium-driver)
  command -v docker-compose >/dev/null 2>&1 || pkgs+=(docker-compose)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "==> installing ${pkgs[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
}

bash scripts/bootstrap.sh
ensure_test_tools
ensure_postgres
echo "==> running the test suite"
exec .venv/bin/python -m pytest -q "$@"
