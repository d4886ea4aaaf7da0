#!/bin/sh
# One-shot provisioning for docker compose: creates the federation's
# exchanges and queues, a broker user per silo and one for the coordinator
# (through the management HTTP API), and writes each party's AMQP URL into a
# TOML config file on the shared credentials volume:
#   /credentials/<silo>.toml and /credentials/coordinator.toml  (broker = "amqp://...")
# which the silo and coordinator services read with --config (see tff_amqp/config.py).
#   usage: provision.sh FEDERATION SILO...
# Env: ADMIN_URL (management API, admin credentials), AMQP_BASE (amqp://host:5672/).
set -eu
federation="$1"
shift
out="${CREDENTIALS_DIR:-/credentials}"
umask 077

write_config() { # NAME URL
  printf '# written by docker/provision.sh\nbroker = "%s"\n' "$2" > "$out/$1.toml.tmp"
  mv "$out/$1.toml.tmp" "$out/$1.toml"
}

# The last line add-silo / add-coordinator print is the party's AMQP URL.
url=$(tff-amqp provision add-coordinator --federation "$federation" \
  --broker "$ADMIN_URL" --amqp-url "$AMQP_BASE" | tail -n 1)
write_config coordinator "$url"
for silo in "$@"; do
  url=$(tff-amqp provision add-silo "$silo" --federation "$federation" \
    --broker "$ADMIN_URL" --amqp-url "$AMQP_BASE" | tail -n 1)
  write_config "$silo" "$url"
  echo "provisioned silo $silo"
done
echo "provisioned federation $federation: coordinator and $# silo(s)"
