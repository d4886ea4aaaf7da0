#!/usr/bin/env bash
# The test command: set up, then run pytest against the real broker.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${AMQP_URL:-}" ] && timeout 10 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/"
fi
if [ "$#" -eq 0 ]; then
  set -- -q -ra
fi
status=0
timeout --kill-after=60 80m .venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
