"""Provisioned (non-guest) federations for tests, made with the real CLI.

    with ProvisionedFederation(amqp_url, admin_url, ["alpha", "bravo"]) as fed:
        fed.silo_urls["alpha"]     # amqp://silo.<F>.alpha:<password>@host:5672/
        fed.coordinator_url
    # users removed (`tff-amqp provision remove-*`), queues and exchanges deleted

The management API must be enabled on the broker (scripts/setup.sh does it for
the local one). Its URL comes from AMQP_ADMIN_URL, else the AMQP URL's host and
credentials on port 15672.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import yarl

from tests.support.broker import delete_federation_entities, new_federation_name


def admin_url_for(amqp_url: str) -> str:
    explicit = os.environ.get("AMQP_ADMIN_URL")
    if explicit:
        return explicit
    url = yarl.URL(amqp_url)
    user, password = url.user or "guest", url.password or "guest"
    return f"http://{user}:{password}@{url.host}:15672/"


def provision(*args: str, timeout: float = 120.0) -> list[str]:
    """Run `tff-amqp provision ARGS`; return its output lines (raise on failure)."""
    done = subprocess.run(
        [sys.executable, "-m", "tff_amqp", "provision", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tff-amqp provision {args[0]} failed: {done.stderr}{done.stdout}")
    return done.stdout.strip().splitlines()


class ProvisionedFederation:
    """A federation whose silos and coordinator have their own broker users."""

    def __init__(self, amqp_url: str, admin_url: str, silos: Sequence[str]) -> None:
        self.amqp_url = amqp_url
        self.admin_url = admin_url
        self.name = new_federation_name()
        self.silos = list(silos)
        base = yarl.URL(amqp_url).with_user(None).with_password(None)
        self._common = ["--federation", self.name, "--broker", admin_url, "--amqp-url", str(base)]
        self.silo_urls: dict[str, str] = {}
        self.coordinator_url = ""

    def __enter__(self) -> ProvisionedFederation:
        try:
            for silo in self.silos:
                self.silo_urls[silo] = provision("add-silo", silo, *self._common)[-1]
            self.coordinator_url = provision("add-coordinator", *self._common)[-1]
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for silo in self.silos:
            provision("remove-silo", silo, *self._common)
        provision("remove-coordinator", *self._common)
        delete_federation_entities(self.amqp_url, self.name)

    def user(self, silo: str) -> str:
        return yarl.URL(self.silo_urls[silo]).user or ""
