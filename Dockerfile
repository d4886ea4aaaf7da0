# tff-amqp: one image for the coordinator, the silos and provisioning.
# Installs exactly what uv.lock says (TFF 0.87.0 with the jax 0.4.13 override
# from pyproject.toml), like scripts/setup.sh does on a machine.
# TFF 0.87's wheels are for x86_64 Linux: build on (or for) linux/amd64.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    PATH=/app/.venv/bin:$PATH

RUN pip install --no-cache-dir uv

WORKDIR /app
# Dependencies first (a cached layer while only the code changes).
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project
COPY tff_amqp ./tff_amqp
RUN uv sync --frozen \
    && tff-amqp --help >/dev/null

# The demo's sample spreadsheets, one folder per clinic. Each silo service is
# given only its own folder (docker-compose.yml); in a real deployment each
# silo mounts its own data instead.
RUN tff-amqp demo --write-data /data

COPY docker/provision.sh /app/docker/provision.sh

# Silos and the coordinator run unprivileged.
RUN useradd --create-home --uid 10001 tff \
    && mkdir /credentials && chown tff /credentials
USER tff
ENTRYPOINT ["tff-amqp"]
CMD ["--help"]
