#!/usr/bin/env bash
# The test command: set up, then run pytest against the real broker.
#   bash scripts/test.sh [pytest args...]      (default: -q -ra)
# Exit code is pytest's; "no tests collected" (5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${AMQP_URL:-}" ] && [ "${SKIP_BROKER:-0}" != "1" ] \
  && timeout 10 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/"
fi
if [ "$#" -eq 0 ]; then
  set -- -q -ra
fi
# Never hang: pytest gets 80 minutes, then SIGTERM, then SIGKILL a minute later.
# At a terminal, --foreground keeps Ctrl-C and the tty working.
limit=(timeout --kill-after=60 80m)
if [ -t 0 ]; then
  limit=(timeout --foreground --kill-after=60 80m)
fi
status=0
"${limit[@]}" .venv/bin/python -m pytest "$@" || status=$?
case "$status" in
  5) echo "[test] pytest collected no tests: that is a failure" >&2; exit 1 ;;
  124 | 137) echo "[test] pytest was stopped (80 minute limit, exit $status)" >&2 ;;
esac
exit "$status"
