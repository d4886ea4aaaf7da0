"""docker-compose.yml, the Dockerfile and the provisioning script stay honest.

There is no Docker engine (nor the compose plugin) on the machines that run
these tests, so the files are checked as far as possible without one: the
YAML parses, every mounted or copied file exists, every `tff-amqp` command in
them parses with the real CLI parser, and the provisioning script, run with
a stand-in for `tff-amqp provision`, writes config files the silos and the
coordinator read. (`docker compose config -q` would add the compose
schema's own check; run it by hand where the plugin exists: no test here
skips for want of it.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from tff_amqp import config
from tff_amqp.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SILOS = ("clinic_north", "clinic_south", "clinic_east")
# `tff-amqp provision` is being added on another branch; until it is merged
# the script's calls to it cannot be checked against the parser.


def tff_services() -> dict[str, dict]:
    return {name: s for name, s in COMPOSE["services"].items() if s.get("build") == "."}


def test_compose_file_defines_a_healthy_local_broker():
    broker = COMPOSE["services"]["rabbitmq"]
    assert broker["image"].startswith("rabbitmq:3") and broker["image"].endswith("-management")
    assert "127.0.0.1:5672:5672" in broker["ports"]
    assert broker["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]


def test_the_broker_loads_the_federations_definitions():
    """broker/definitions.json is mounted where the mounted config loads it
    from, and describes the federation and vhost the services use."""
    import json

    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["rabbitmq"]["volumes"])
    conf_files = [
        ROOT / src for src, dst in mounts.items() if dst.startswith("/etc/rabbitmq/conf.d/")
    ]
    loads = [
        line.split("=", 1)[1].strip()
        for path in conf_files
        for line in path.read_text().splitlines()
        if line.strip().startswith("load_definitions")
    ]
    assert len(loads) == 1
    assert mounts["./broker/definitions.json"] == loads[0]
    definitions = json.loads((ROOT / "broker" / "definitions.json").read_text())
    federation = tff_services()["clinic_north"]["environment"]["TFF_AMQP_FEDERATION"]
    vhost = COMPOSE["services"]["provision"]["environment"]["AMQP_BASE"].rsplit("/", 1)[1]
    assert {v["name"] for v in definitions["vhosts"]} == {vhost}
    exchanges = {e["name"] for e in definitions["exchanges"]}
    from tff_amqp.topology import Topology

    topology = Topology(federation)
    assert {topology.requests_exchange, topology.replies_exchange} <= exchanges


def test_every_mounted_and_copied_file_exists():
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name}: {source} is mounted but missing"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} is not declared"
    assert (ROOT / "Dockerfile").is_file()
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert copied
    for line in copied:
        for source in line.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"


def test_image_installs_from_the_lock_file_with_the_jax_override():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml uv.lock README.md ./" in dockerfile
    assert dockerfile.count("uv sync --frozen") == 2
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'override-dependencies = ["jax==0.4.13", "jaxlib==0.4.13"]' in pyproject


def test_the_demo_runs_on_three_provisioned_silos_with_their_own_data():
    services = tff_services()
    assert set(SILOS) | {"provision", "coordinator"} <= set(services)
    assert COMPOSE["services"]["provision"]["depends_on"]["rabbitmq"]["condition"] == (
        "service_healthy"
    )
    parser = build_parser()
    for silo in SILOS:
        service = services[silo]
        assert service["depends_on"]["provision"]["condition"] == "service_completed_successfully"
        args = parser.parse_args(service["command"])
        assert args.command == "silo" and args.name == silo
        assert args.config == Path(f"/credentials/{silo}.toml")
        # Only its own data, and no right to declare: provisioning did that.
        assert args.data == [f"patients=/data/{silo}"] and args.no_declare
    coordinator = services["coordinator"]
    args = parser.parse_args(coordinator["command"])
    assert args.command == "demo" and args.silos.split(",") == list(SILOS)
    assert args.config == Path("/credentials/coordinator.toml")
    for silo in SILOS:
        assert coordinator["depends_on"][silo]["condition"] == "service_started"
    provision_args = COMPOSE["services"]["provision"]["command"]
    assert provision_args == [
        services["clinic_north"]["environment"]["TFF_AMQP_FEDERATION"],
        *SILOS,
    ]
    # The image writes the sample data the silos mount: `demo --write-data /data`.
    write = re.search(
        r"RUN tff-amqp (demo --write-data /data)$", (ROOT / "Dockerfile").read_text(), re.M
    )
    assert write and parser.parse_args(write.group(1).split()).write_data == Path("/data")


def test_every_tff_amqp_command_in_the_files_exists():
    """Subcommands and flags used in docker-compose.yml and docker/provision.sh
    are real (checked with the CLI's own parser)."""
    parser = build_parser()
    commands = config.subcommands(parser)
    script = (ROOT / "docker" / "provision.sh").read_text().replace("\\\n", " ")
    calls = [shlex.split(m) for m in re.findall(r"tff-amqp (provision [^|)\n]+)", script)]
    assert len(calls) == 2
    for call in calls:
        assert call[0] in commands, f"docker/provision.sh calls unknown {call[0]}"
        actions = config.subcommands(commands[call[0]])
        assert call[1] in actions, f"provision has no action {call[1]}"
        flags = {flag for action in actions[call[1]]._actions for flag in action.option_strings}
        for word in call[2:]:
            if word.startswith("--"):
                assert word in flags, f"provision {call[1]} has no flag {word}"
    for service in tff_services().values():
        if service.get("command") and "entrypoint" not in service:
            parser.parse_args(service["command"])  # exits (SystemExit) on an unknown flag


def test_provision_script_writes_config_files_the_parties_read(tmp_path):
    """Run docker/provision.sh with a stand-in `tff-amqp` that prints like
    `tff-amqp provision` (URL on the last line) and records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "tff-amqp"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'echo "summary line for $3"\n'
        'echo "amqp://user-$3:s3cret@rabbitmq:5672/"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "credentials"
    out.mkdir()
    done = subprocess.run(
        ["sh", str(ROOT / "docker" / "provision.sh"), *COMPOSE["services"]["provision"]["command"]],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "CREDENTIALS_DIR": str(out),
            "ADMIN_URL": "http://guest:guest@rabbitmq:15672/",
            "AMQP_BASE": "amqp://rabbitmq:5672/tff",
        },
    )
    assert done.returncode == 0, done.stderr
    recorded = calls.read_text().splitlines()
    assert recorded[0].startswith("provision add-coordinator --federation default")
    assert "--amqp-url amqp://rabbitmq:5672/" in recorded[0]
    assert [line.split()[2] for line in recorded[1:]] == list(SILOS)
    for silo in SILOS:
        path = out / f"{silo}.toml"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        args = config.parse_args(
            build_parser(), ["silo", "--config", str(path), "--name", silo], environ={}
        )
        assert args.broker == f"amqp://user-{silo}:s3cret@rabbitmq:5672/"
    args = config.parse_args(
        build_parser(), ["demo", "--config", str(out / "coordinator.toml")], environ={}
    )
    assert args.broker == "amqp://user---federation:s3cret@rabbitmq:5672/"


def test_broker_config_matches_the_protocol_limit():
    from tff_amqp.protocol import DEFAULT_MAX_MESSAGE_BYTES

    settings = {}
    for line in (ROOT / "broker" / "rabbitmq.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert int(settings["max_message_size"]) == DEFAULT_MAX_MESSAGE_BYTES
