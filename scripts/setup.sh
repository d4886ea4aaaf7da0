#!/usr/bin/env bash
# Set up everything tff-amqp needs on this machine; idempotent.
#   - uv (installed with pip if missing)
#   - .venv at the repository root, exactly as uv.lock says
#   - a reachable RabbitMQ: AMQP_URL if set, else the local service (started if
#     installed), else a Docker engine for testcontainers. SKIP_BROKER=1 skips this.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

# uv: on PATH, or as a module of python3 (pip --user may not put it on PATH).
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  UV=(python3 -m uv)
else
  say "installing uv with pip"
  python3 -m pip install --quiet uv \
    || python3 -m pip install --quiet --user uv \
    || python3 -m pip install --quiet --user --break-system-packages uv
  UV=(python3 -m uv)
fi
say "syncing .venv from uv.lock"
"${UV[@]}" sync --frozen --extra test --extra bench --quiet

if [ "${SKIP_BROKER:-0}" = "1" ]; then
  say "SKIP_BROKER=1: not checking for a broker"
  exit 0
fi

broker_up() { timeout 10 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

if [ -n "${AMQP_URL:-}" ]; then
  say "using AMQP_URL (${AMQP_URL%%@*}@...)"
elif command -v rabbitmq-server >/dev/null 2>&1; then
  if ! broker_up; then
    say "starting the local RabbitMQ (rabbitmq-server -detached)"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    deadline=$((SECONDS + 60))
    until broker_up; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        say "RabbitMQ did not answer a ping within 60 s; see /var/log/rabbitmq/"
        exit 1
      fi
      sleep 1
    done
  fi
  say "local RabbitMQ is up"
  # `tff-amqp provision` (and its tests) use the management HTTP API. Enabling
  # a plugin does not restart the broker; already enabled is a no-op.
  if ! rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_management; then
    say "enabling the rabbitmq_management plugin (for tff-amqp provision)"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
  fi
elif timeout 10 docker info >/dev/null 2>&1; then
  say "no local RabbitMQ; tests will start one with testcontainers (Docker)"
else
  say "no broker: install rabbitmq-server (apt-get install rabbitmq-server), or run"
  say "'docker compose up -d rabbitmq', or set AMQP_URL=amqp://user:pass@host:5672/"
  exit 1
fi
