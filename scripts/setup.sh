#!/usr/bin/env bash
# Set up everything tff-amqp needs on this machine; idempotent.
#   - uv (installed with pip if missing)
#   - .venv at the repository root, exactly as uv.lock says
#   - a reachable RabbitMQ: AMQP_URL if set, else the local service (started if
#     installed and really down), else a Docker engine for testcontainers.
#     SKIP_BROKER=1 skips this.
# Never hangs: every external call is bounded with `timeout --foreground` (so
# Ctrl-C and the terminal keep working), stdin is /dev/null, and the broker is
# probed the way a client does (scripts/broker_probe.py: a TCP connection and
# the AMQP protocol header, 3 s), which works for any user. `rabbitmq-*`
# commands are used only to start a local broker that is really down.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }
# bounded SECONDS CMD...: run CMD with a time limit, in the foreground process
# group (a background job reading the tty would be stopped, state T, forever).
bounded() { local limit=$1; shift; timeout --foreground --kill-after=5 "$limit" "$@" </dev/null; }

venv_ok=1
if [ -e .venv ] && [ ! -w .venv ]; then
  # Another user's checkout (e.g. set up by root): use its .venv as it is.
  if bounded 30 .venv/bin/python -c '' 2>/dev/null; then
    say ".venv belongs to another user: using it as it is (not synced)"
  else
    say ".venv belongs to another user and its Python is not usable by $(id -un);"
    say "  run scripts/setup.sh as its owner, or in a checkout of your own"
    venv_ok=0
  fi
else
  # uv: on PATH, or as a module of python3 (pip --user may not put it on PATH).
  if command -v uv >/dev/null 2>&1; then
    UV=(uv)
  elif bounded 30 python3 -m uv --version >/dev/null 2>&1; then
    UV=(python3 -m uv)
  else
    say "installing uv with pip"
    bounded 300 python3 -m pip install --quiet uv \
      || bounded 300 python3 -m pip install --quiet --user uv \
      || bounded 300 python3 -m pip install --quiet --user --break-system-packages uv
    UV=(python3 -m uv)
  fi
  say "syncing .venv from uv.lock"
  bounded 900 "${UV[@]}" sync --frozen --extra test --extra bench --quiet
fi
finish() { [ "$venv_ok" = 1 ] || exit 1; exit 0; }

if [ "${SKIP_BROKER:-0}" = "1" ]; then
  say "SKIP_BROKER=1: not checking for a broker"
  finish
fi

url="${AMQP_URL:-amqp://127.0.0.1:5672/}"
shown="${url#*://}"; shown="${shown#*@}"
broker_up() { bounded 10 python3 scripts/broker_probe.py "$url" --timeout 3 2>/dev/null; }

say "checking the broker at ${shown} (an AMQP connection attempt, 3 s)"
if broker_up; then
  say "the broker at ${shown} answers"
elif [ -n "${AMQP_URL:-}" ]; then
  say "AMQP_URL is set but its broker does not answer: $(python3 scripts/broker_probe.py "$url" 2>&1)"
  exit 1
elif command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" != "0" ]; then
    say "no broker answers at ${shown}, and starting the local RabbitMQ needs root:"
    say "  sudo rabbitmq-server -detached   (or set AMQP_URL=amqp://user:pass@host:5672/)"
    exit 1
  fi
  say "starting the local RabbitMQ (rabbitmq-server -detached)"
  bounded 30 rabbitmq-server -detached >/dev/null 2>&1 || true
  deadline=$((SECONDS + 60))
  until broker_up; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "RabbitMQ did not accept an AMQP connection within 60 s; see /var/log/rabbitmq/"
      exit 1
    fi
    sleep 1
  done
  say "local RabbitMQ is up"
elif bounded 10 docker info >/dev/null 2>&1; then
  say "no local RabbitMQ; tests will start one with testcontainers (Docker)"
  finish
else
  say "no broker: install rabbitmq-server (apt-get install rabbitmq-server), or run"
  say "'docker compose up -d rabbitmq', or set AMQP_URL=amqp://user:pass@host:5672/"
  exit 1
fi

# `tff-amqp provision` (and its tests) use the management HTTP API (port 15672).
# Only root can enable the plugin here; enabling does not restart the broker.
if [ -z "${AMQP_URL:-}" ] && [ "$(id -u)" = "0" ] && command -v rabbitmq-plugins >/dev/null 2>&1 \
  && ! bounded 10 python3 -c 'import socket; socket.create_connection(("127.0.0.1", 15672), 2)' \
    2>/dev/null; then
  say "enabling the rabbitmq_management plugin (for tff-amqp provision)"
  bounded 60 rabbitmq-plugins enable rabbitmq_management >/dev/null || say "could not enable it"
fi
finish
