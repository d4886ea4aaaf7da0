"""The README's and the tutorial's shell blocks stay true to the code.

- every `tff-amqp ...` command in a ```bash block parses with the real
  command-line parser (so no flag or command in the docs is misspelt or gone);
- every shell variable a doc uses is defined in that doc (or is the
  environment's), so no step depends on an undefined `$COORDINATOR_URL`;
- the commands that can run on one machine without changing anything (help,
  read-only `status`, `federation list`, `setup.sh`) are run against the broker
  on 127.0.0.1 (the doc's placeholders replaced) and finish without a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tff_amqp.cli import build_parser
from tff_amqp.processes import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "tutorial.md", ROOT / "docs" / "operations.md"]
ENVIRONMENT = {"HOME", "PATH", "USER", "PWD"}
ASSIGNMENT = re.compile(r"(?:^|[\s;(])(?:export\s+)?([A-Z_][A-Z0-9_]*)=")
FOR_LOOP = re.compile(r"\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b")
USE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def shell_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)


def commands(block: str) -> list[str]:
    """Logical lines (continuations joined), comments and heredoc bodies dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines, heredoc = [], None
    for line in joined.splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        match = re.search(r"<<'?(\w+)'?", line)
        if match:
            heredoc = match.group(1)
        code = line.split(" #", 1)[0].strip()
        if code and not code.startswith("#"):
            lines.append(code)
    return lines


def tff_amqp_invocations(path: Path) -> list[list[str]]:
    found = []
    for block in shell_blocks(path):
        for line in commands(block):
            for part in re.split(r"\||&&|;|\$\(", line):
                words = shlex.split(part.replace("$(", ""), posix=True)
                for i, word in enumerate(words):
                    if word.endswith("tff-amqp") and i + 1 < len(words):
                        found.append(words[i + 1 :])
                        break
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_tff_amqp_command_in_the_docs_parses(doc: Path) -> None:
    invocations = tff_amqp_invocations(doc)
    assert invocations, f"no tff-amqp command found in {doc.name}"
    parser = build_parser()
    for args in invocations:
        if "--help" in args or "--config" in args:
            continue  # (required options then come from a file the doc only shows)
        # Placeholders stand for values; the parser checks names and arity.
        args = [a.replace("$", "X") for a in args]
        try:
            parser.parse_args(args)
        except SystemExit as e:
            pytest.fail(f"{doc.name}: `tff-amqp {' '.join(args)}` does not parse ({e})")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_shell_variable_a_doc_uses_is_defined_in_it(doc: Path) -> None:
    defined = set(ENVIRONMENT)
    used: list[tuple[str, str]] = []
    for block in shell_blocks(doc):
        for line in commands(block):
            defined |= set(ASSIGNMENT.findall(line)) | set(FOR_LOOP.findall(line))
            used += [(name, line) for name in USE.findall(line)]
    missing = [(name, line) for name, line in used if name not in defined]
    assert not missing, f"{doc.name} uses undefined variables: {missing}"


def _local(line: str, amqp_url: str) -> str:
    """The doc's placeholders, on this machine."""
    admin = "http://guest:guest@127.0.0.1:15672/"
    line = line.replace('"$COORDINATOR_URL"', amqp_url).replace("$COORDINATOR_URL", amqp_url)
    line = line.replace('"$ADMIN"', admin).replace("$ADMIN", admin)
    return line.replace("broker.example", "127.0.0.1")


SAFE = re.compile(
    r"tff-amqp (--help|\w+ --help|status\b|federation list\b)|^SKIP_BROKER=1 bash scripts/setup\.sh"
)


def test_the_read_only_commands_of_the_docs_run_here(amqp_url: str) -> None:
    ran = []
    for doc in DOCS:
        for block in shell_blocks(doc):
            for line in commands(block):
                if not SAFE.search(line) or "|" in line:
                    continue
                line = _local(line, amqp_url)
                if "tff-amqp status" in line and "--window" not in line:
                    line += " --window 1"
                done = subprocess.run(
                    ["bash", "-c", line],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                    env={**os.environ, "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"},
                )
                # status of a federation nobody started here answers 1, in one line.
                assert done.returncode in (0, 1), (doc.name, line, done.stdout, done.stderr)
                assert "Traceback" not in done.stderr, (doc.name, line, done.stderr)
                ran.append(line)
    assert any("status" in line for line in ran), ran
    assert any("federation list" in line for line in ran), ran
    assert sys.executable  # the venv's tff-amqp ran, not another one
