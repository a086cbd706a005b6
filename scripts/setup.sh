#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine with Python 3.11: system packages, then a
# virtual environment in .venv with Tollgate and its test tools. `make demo` and `make test`
# both run this first, so each of them works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
apt_missing=()
command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)  # the scrape test and rule checks
# The ledger tests run a throwaway PostgreSQL (initdb + postgres from /usr/lib/postgresql/<ver>/bin).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_missing+=(postgresql)
for extra in ${TOLLGATE_APT_EXTRA:-}; do command -v "$extra" >/dev/null 2>&1 || apt_missing+=("$extra"); done
if ((${#apt_missing[@]})); then
  echo "setup: installing ${apt_missing[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Tollgate needs Python 3.11 or newer")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.tollgate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Tollgate and its test tools into .venv"
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
