"""Is an AMQP broker answering? Probe it the way a client does, bounded.

    python3 scripts/broker_probe.py [URL] [--timeout SECONDS]

URL defaults to $AMQP_URL, else amqp://127.0.0.1:5672/. The probe opens a TCP
connection, sends the AMQP 0-9-1 protocol header (b"AMQP\\x00\\x00\\x09\\x01")
and waits for the broker's first frame: a method frame (type 1) carrying
Connection.Start. It then closes the socket: no credentials are sent, so it
works for any user on any machine (unlike `rabbitmq-diagnostics`, which needs
root or the rabbitmq user and reads the Erlang cookie).

Exit codes: 0 the broker answered; 1 it did not (one line on stderr says why);
2 bad arguments. Standard library only, so setup can run it before the
virtual environment exists. amqps:// URLs are probed with TCP only (a TLS
handshake would need the broker's CA): port open counts as up.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.parse

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD = 1


def host_port(url: str) -> tuple[str, int, bool]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an amqp:// or amqps:// URL: {parsed.scheme}://...")
    tls = parsed.scheme == "amqps"
    return parsed.hostname or "127.0.0.1", parsed.port or (5671 if tls else 5672), tls


def probe(url: str, timeout: float) -> str | None:
    """None if the broker answered, else why not."""
    host, port, tls = host_port(url)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if tls:
                return None
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(PROTOCOL_HEADER)
            first = sock.recv(1)
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e.strerror or e}"
    if not first:
        return f"{host}:{port} closed the connection without an AMQP greeting"
    if first[0] != FRAME_METHOD:
        return f"{host}:{port} answered, but not as an AMQP 0-9-1 broker"
    return None


def main(argv: list[str]) -> int:
    timeout = 3.0
    url = os.environ.get("AMQP_URL") or "amqp://127.0.0.1:5672/"
    args = list(argv)
    try:
        while args:
            arg = args.pop(0)
            if arg == "--timeout":
                timeout = float(args.pop(0))
            else:
                url = arg
        why = probe(url, timeout)
    except (ValueError, IndexError) as e:
        print(f"broker_probe: {e}", file=sys.stderr)
        return 2
    if why is not None:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
