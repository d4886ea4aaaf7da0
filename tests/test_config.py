"""The configuration layers of the command line: flags > environment > config
file > defaults, for every option of every subcommand, with clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tff_amqp import config
from tff_amqp.cli import DEFAULT_BROKER, build_parser
from tff_amqp.processes import die_with_parent


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return config.parse_args(build_parser(), argv, environ or {})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_apply_when_no_layer_sets_an_option():
    args = parse(["silo", "--name", "a"])
    assert args.broker == DEFAULT_BROKER
    assert args.federation == "default"
    assert args.heartbeat_interval == 1.0
    assert args.metrics_port is None
    assert args.data == []


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path):
    file = write(
        tmp_path / "tff.toml",
        'federation = "from-file"\nbroker = "amqp://f:f@file-host/"\n'
        '[silo]\nname = "north"\nheartbeat-interval = 4.5\nmetrics_port = 9100\n',
    )
    env = {"TFF_AMQP_FEDERATION": "from-env", "TFF_AMQP_METRICS_PORT": "9200"}
    args = parse(["silo", "--config", str(file), "--metrics-port", "9300"], env)
    assert args.metrics_port == 9300  # flag beats env and file
    assert args.federation == "from-env"  # env beats file
    assert args.broker == "amqp://f:f@file-host/"  # top-level file key
    assert args.name == "north"  # [silo] table; no longer required as a flag
    assert args.heartbeat_interval == 4.5  # typed by the option's type
    assert args.allow_raw_client_values is False  # default


def test_command_table_beats_top_level_keys_and_config_comes_from_the_environment(tmp_path):
    file = write(tmp_path / "c.toml", 'federation = "top"\n[status]\nfederation = "mine"\n')
    args = parse(["status"], {"TFF_AMQP_CONFIG": str(file)})
    assert args.federation == "mine"


def test_amqp_url_is_read_below_tff_amqp_broker():
    assert parse(["status"], {"AMQP_URL": "amqp://a@h/"}).broker == "amqp://a@h/"
    both = {"AMQP_URL": "amqp://a@h/", "TFF_AMQP_BROKER": "amqp://b@h/"}
    assert parse(["status"], both).broker == "amqp://b@h/"


def test_booleans_and_repeatable_options_from_env_and_file(tmp_path):
    env = {"TFF_AMQP_ALLOW_RAW_CLIENT_VALUES": "yes", "TFF_AMQP_DATA": "a=/x, b=/y"}
    args = parse(["silo", "--name", "n"], env)
    assert args.allow_raw_client_values is True
    assert args.data == ["a=/x", "b=/y"]
    file = write(tmp_path / "c.toml", '[silo]\ndata = ["k=/from/file"]\nno-declare = true\n')
    args = parse(["silo", "--name", "n", "--config", str(file)])
    assert args.data == ["k=/from/file"] and args.no_declare is True
    # Flags replace a layer's list; they do not extend it.
    args = parse(["silo", "--name", "n", "--config", str(file), "--data", "k=/flag"])
    assert args.data == ["k=/flag"]


@pytest.mark.parametrize(
    ("env", "file_text", "words"),
    [
        ({"TFF_AMQP_METRICS_PORT": "nine"}, None, "TFF_AMQP_METRICS_PORT (for --metrics-port)"),
        ({"TFF_AMQP_LOG_LEVEL": "loud"}, None, "'loud' is not one of debug, info"),
        ({"TFF_AMQP_NO_DECLARE": "maybe"}, None, "expected true or false"),
        ({}, "[silo]\nnmae = 'x'\n", "[silo] has unknown option(s) nmae"),
        ({}, "colour = 'red'\n", "unknown option 'colour'"),
        ({}, "[clinic]\nname = 'x'\n", "[clinic] is not a tff-amqp command"),
        ({}, "[silo\n", "is not valid TOML"),
    ],
)
def test_bad_layer_values_name_the_variable_or_file_key(tmp_path, capsys, env, file_text, words):
    argv = ["silo", "--name", "n"]
    if file_text is not None:
        argv += ["--config", str(write(tmp_path / "bad.toml", file_text))]
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, env)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_missing_config_file_is_named(capsys):
    with pytest.raises(SystemExit):
        parse(["status", "--config", "/no/such/tff.toml"])
    assert "config file /no/such/tff.toml does not exist" in capsys.readouterr().err


def test_every_option_of_every_command_has_an_environment_variable():
    parser = build_parser()
    for name, sub in config.subcommands(parser).items():
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "config"):
                env = {config.env_name(action.dest): _sample(action)}
                resolved = config.layered_defaults(sub, name, env, {})
                assert action.dest in resolved, (name, action.dest)


def _sample(action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type in (int, float):
        return "3"
    if action.nargs == 0:
        return "true"
    return "x=/y" if action.dest == "data" else "value"


def test_help_documents_the_precedence():
    result = subprocess.run(
        [sys.executable, "-m", "tff_amqp", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=die_with_parent,
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Precedence: flags > environment > file > defaults" in text
    assert "TFF_AMQP_BROKER" in text


def test_silo_process_takes_its_settings_from_file_and_environment(tmp_path):
    """End to end: the silo's broker comes from the file, its name from the
    environment; the unreachable broker in the file is what it reports."""
    file = write(
        tmp_path / "silo.toml",
        'broker = "amqp://guest:guest@127.0.0.1:1/"\n[silo]\nconnect-timeout = 2\n',
    )
    result = subprocess.run(
        [sys.executable, "-m", "tff_amqp", "silo", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env={**os.environ, "TFF_AMQP_NAME": "from_env", "AMQP_URL": "", "TFF_AMQP_BROKER": ""},
    )
    assert result.returncode == 1, result.stderr
    assert "cannot reach the RabbitMQ broker at amqp://guest:***@127.0.0.1:1/" in result.stderr
