"""Configuration layers for the `tff-amqp` command line.

Every option of every subcommand can be given, from strongest to weakest, as

1. a flag: ``--metrics-port 9101``;
2. an environment variable ``TFF_AMQP_<OPTION>``: ``TFF_AMQP_METRICS_PORT=9101``
   (``AMQP_URL`` is also read for ``--broker``, below ``TFF_AMQP_BROKER``);
3. a TOML file (``--config FILE`` or ``TFF_AMQP_CONFIG=FILE``): keys at the top
   level apply to every command that has the option, keys in a ``[command]``
   table only to that command (and win over top-level keys);
4. the option's built-in default.

The layer works on the argparse parser itself (each option's ``dest``, type,
choices and action), so a new option or subcommand is configurable from the
environment and the file without any code here.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ENV_PREFIX = "TFF_AMQP_"
CONFIG_ENV = "TFF_AMQP_CONFIG"
# Older or conventional names read after TFF_AMQP_<OPTION>.
ENV_ALIASES: dict[str, tuple[str, ...]] = {"broker": ("AMQP_URL",)}
# Options the layers never set: the file itself, and help.
_NOT_LAYERED = frozenset({"config", "help", "command"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """A configuration value (environment or file) that cannot be used."""


def env_name(dest: str) -> str:
    """The environment variable of an option: ``metrics_port`` -> ``TFF_AMQP_METRICS_PORT``."""
    return ENV_PREFIX + dest.upper()


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"TOML file of option values (env {CONFIG_ENV}); precedence: "
        f"flags > {ENV_PREFIX}<OPTION> environment variables > file > defaults",
    )


def load_file(path: Path) -> dict[str, Any]:
    """The TOML table in `path`, with errors that name the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _layered_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        action.dest: action
        for action in parser._actions  # argparse exposes no public list of actions
        if action.option_strings and action.dest not in _NOT_LAYERED
    }


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _normalize_keys(table: Mapping[str, Any]) -> dict[str, Any]:
    return {key.replace("-", "_"): value for key, value in table.items()}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _convert(action: argparse.Action, raw: Any, source: str) -> Any:
    """A raw value from the environment (str) or the file (TOML types) as the
    option's type, checked against its choices."""
    where = f"{source} (for {_flag(action)})"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            value = raw.strip().lower() in _TRUE
        else:
            raise ConfigError(f"{where}: expected true or false, got {raw!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        if isinstance(raw, str):
            items: list[Any] = [part.strip() for part in raw.split(",") if part.strip()]
        elif isinstance(raw, list):
            items = raw
        else:
            raise ConfigError(f"{where}: expected a list or a comma-separated string, got {raw!r}")
        return [_convert_one(action, item, where) for item in items]
    return _convert_one(action, raw, where)


def _convert_one(action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(raw, dict | list):
        raise ConfigError(f"{where}: expected a single value, got {raw!r}")
    convert = action.type if callable(action.type) else str
    try:
        value = convert(raw if isinstance(raw, str) else str(raw))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{where}: {raw!r} is not a valid value ({e})") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {raw!r} is not one of {choices}")
    return value


def layered_defaults(
    command_parser: argparse.ArgumentParser,
    command: str,
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    file_name: str = "config file",
) -> dict[str, Any]:
    """The defaults of `command`'s options from the environment and the file
    (only options set in either appear)."""
    actions = _layered_actions(command_parser)
    top = _normalize_keys({k: v for k, v in file_values.items() if not isinstance(v, dict)})
    section = file_values.get(command, {})
    section = _normalize_keys(section if isinstance(section, dict) else {})
    unknown = sorted(set(section) - set(actions))
    if unknown:
        known = ", ".join(sorted(actions))
        raise ConfigError(
            f"{file_name}: [{command}] has unknown option(s) {', '.join(unknown)}; "
            f"`tff-amqp {command}` knows: {known}"
        )
    resolved: dict[str, Any] = {}
    for dest, action in actions.items():
        for name in (env_name(dest), *ENV_ALIASES.get(dest, ())):
            if environ.get(name):
                resolved[dest] = _convert(action, environ[name], f"environment variable {name}")
                break
        else:
            if dest in section:
                resolved[dest] = _convert(action, section[dest], f"{file_name} [{command}] {dest}")
            elif dest in top:
                resolved[dest] = _convert(action, top[dest], f"{file_name} {dest}")
    return resolved


def check_file_keys(
    parser: argparse.ArgumentParser, file_values: Mapping[str, Any], file_name: str
) -> None:
    """Top-level keys must be an option of some command, tables must be commands."""
    commands = subcommands(parser)
    known = {dest for sub in commands.values() for dest in _layered_actions(sub)}
    for key, value in _normalize_keys(file_values).items():
        if isinstance(value, dict):
            if key not in commands:
                raise ConfigError(
                    f"{file_name}: [{key}] is not a tff-amqp command "
                    f"(commands: {', '.join(sorted(commands))})"
                )
        elif key not in known:
            raise ConfigError(
                f"{file_name}: unknown option {key!r} (options: {', '.join(sorted(known))})"
            )


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse `argv` with flags > environment > config file > defaults.

    The subcommand named in `argv` gets its defaults from the environment and
    the file; options made required by argparse stop being required when a
    layer supplies them. Repeatable options (``--data``) are replaced, not
    extended, by flags. Bad layer values exit like argparse errors (status 2),
    naming the variable or file key."""
    environ = os.environ if environ is None else environ
    argv = list(argv)
    commands = subcommands(parser)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in commands:
        return parser.parse_args(argv)  # argparse reports it (or prints help)
    command_parser = commands[command]
    try:
        resolved = _resolve(parser, command_parser, command, argv, environ)
    except ConfigError as e:
        command_parser.error(str(e))
    actions = _layered_actions(command_parser)
    appended = {}
    for dest, value in resolved.items():
        actions[dest].required = False
        if isinstance(actions[dest], argparse._AppendAction):
            appended[dest] = value
        else:
            command_parser.set_defaults(**{dest: value})
    args = parser.parse_args(argv)
    for dest, value in appended.items():
        if not getattr(args, dest):
            setattr(args, dest, value)
    return args


def _resolve(
    parser: argparse.ArgumentParser,
    command_parser: argparse.ArgumentParser,
    command: str,
    argv: list[str],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    path = known.config or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    if path is None:
        return layered_defaults(command_parser, command, environ, {})
    file_values = load_file(path)
    file_name = f"config file {path}"
    check_file_keys(parser, file_values, file_name)
    return layered_defaults(command_parser, command, environ, file_values, file_name)


def describe() -> str:
    """The precedence rules, for --help epilogs."""
    return (
        "configuration: every option can also be set as an environment variable "
        f"{ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}BROKER, {ENV_PREFIX}FEDERATION, "
        f"{ENV_PREFIX}METRICS_PORT) or in a TOML file given by --config FILE or "
        f"{CONFIG_ENV} (top-level keys for every command, [silo]/[status]/... tables "
        "for one). Precedence: flags > environment > file > defaults."
    )
