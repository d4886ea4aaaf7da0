"""The end-of-session leak check's finder: processes carrying our marker.

Starting, stopping and reaping processes is the package's (`tff_amqp/local.py`,
`tff_amqp/processes.py`); this only finds what a test or the session left
behind. Children inherit our environment, so they carry the session marker
TFF_AMQP_TEST_SESSION that conftest.py's leak check looks for.
"""

from __future__ import annotations

import os
from pathlib import Path

from tff_amqp.processes import proc_stat


def marked_processes(marker_name: str, marker_value: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of live processes other than us whose environment, as
    they were started, has ``marker_name=marker_value``."""
    wanted = f"{marker_name}={marker_value}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        stat = proc_stat(int(entry.name))
        if stat is None or stat[1] == "Z":
            continue
        if wanted in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry.name), command or f"[{stat[0]}]"))
    return found
