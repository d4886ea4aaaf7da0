#!/usr/bin/env bash
# The test command: set up, then run pytest against the real broker.
#   bash scripts/test.sh [pytest args...]      (default: -q -ra, the full suite)
#   bash scripts/test.sh -q -m "not slow"      (the fast subset)
# Exit code is pytest's; "no tests collected" (5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# setup.sh checked (or started) the broker; the local one is the default.
if [ -z "${AMQP_URL:-}" ] && [ "${SKIP_BROKER:-0}" != "1" ] \
  && timeout --foreground 10 python3 scripts/broker_probe.py amqp://127.0.0.1:5672/ \
    </dev/null 2>/dev/null; then
  export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/"
fi
if [ "$#" -eq 0 ]; then
  set -- -q -ra
fi
# Never hang: pytest gets 80 minutes, then SIGTERM, then SIGKILL a minute later.
# --foreground keeps Ctrl-C and the tty working at a terminal (without it,
# anything reading the terminal is stopped and `timeout` never returns).
status=0
timeout --foreground --kill-after=60 80m .venv/bin/python -m pytest "$@" || status=$?
case "$status" in
  5) echo "[test] pytest collected no tests: that is a failure" >&2; exit 1 ;;
  124 | 137) echo "[test] pytest was stopped (80 minute limit, exit $status)" >&2 ;;
esac
exit "$status"
