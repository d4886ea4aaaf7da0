#!/usr/bin/env bash
# The main job: set up, then run a local 3-silo federation demo on the local broker.
#   bash scripts/demo.sh [--rounds N] [--keep-data DIR] [--broker URL]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# TensorFlow's C++ start-up chatter (cuDNN/cuFFT factory messages) is not for a new user.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec .venv/bin/tff-amqp demo --log-level warning "$@"
