"""docker-compose.yml stays honest. There is no Docker engine on the machines
that run these tests, so the file is checked as far as possible without one:
it parses, the broker service has the healthcheck and ports the README relies
on, and every file it mounts exists."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_defines_a_healthy_local_broker():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broker = compose["services"]["rabbitmq"]
    assert broker["image"].startswith("rabbitmq:3")
    assert "127.0.0.1:5672:5672" in broker["ports"]
    assert broker["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    for volume in broker["volumes"]:
        source = volume.split(":", 1)[0]
        assert (ROOT / source).is_file(), f"{source} is mounted but missing"


def test_broker_config_matches_the_protocol_limit():
    from tff_amqp.protocol import DEFAULT_MAX_MESSAGE_BYTES

    settings = {}
    for line in (ROOT / "broker" / "rabbitmq.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert int(settings["max_message_size"]) == DEFAULT_MAX_MESSAGE_BYTES

