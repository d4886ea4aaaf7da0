"""Provisioning a federation on a broker: users, permissions, exchanges, queues.

`tff-amqp provision` talks to RabbitMQ's **management HTTP API** (plugin
``rabbitmq_management``, port 15672). It works from any machine that can reach
that port with an administrator's credentials, which is where federation
operators sit; ``rabbitmqctl`` would only work on the broker host itself.

The permission model (checked on RabbitMQ 3.10.8; see docs/security.md):

- a silo's user may configure nothing, write only the federation's reply
  exchange, and only with the routing keys ``reply.<silo>`` and ``bulk.<silo>``
  (a topic permission), and read only its own request, bulk and work queues
  and its broadcast stream.
  It never gets write on the default exchange, which would let it publish into
  any queue, another silo's or the coordinator's.
- the coordinator's user may configure, write and read everything under
  ``tff.<federation>.``.

Because a silo cannot declare anything, provisioning declares the federation's
exchanges and the silo's queues and bindings, with exactly the arguments the
agents use, and the silo runs with ``--no-declare``.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import yarl

from tff_amqp.errors import TffAmqpError
from tff_amqp.topology import Topology, add_queue_type_option, check_silo_name


class ProvisionError(TffAmqpError):
    """The broker refused or could not be reached; the message says which call."""


@dataclass(frozen=True)
class Permissions:
    """Regular expressions (RabbitMQ, anchored) of one user on one vhost."""

    configure: str
    write: str
    read: str
    # Topic permissions on one exchange (None: no topic restriction).
    topic_exchange: str | None = None
    topic_write: str = "^$"
    topic_read: str = "^$"


def silo_user(federation: str, silo: str) -> str:
    """The broker user provisioning creates for a silo (password auth)."""
    return f"silo.{federation}.{check_silo_name(silo)}"


def coordinator_user(federation: str) -> str:
    return f"coordinator.{Topology(federation).federation}"


def silo_permissions(topology: Topology, silo: str) -> Permissions:
    """Exactly what a silo needs: nothing to configure, write on the reply
    exchange with its own keys only, read of its own three queues and its
    broadcast stream (stateless pool workers)."""
    fed = re.escape(topology.federation)
    name = re.escape(check_silo_name(silo))
    return Permissions(
        # Only its lock queue (a quorum federation's refusal of a second
        # process under its name; docs/cluster.md).
        configure=f"^{re.escape(topology.lock_queue(silo))}$",
        write=f"^{re.escape(topology.replies_exchange)}$",
        read=rf"^tff\.{fed}\.(req|bulk|work|broadcast)\.{name}$",
        topic_exchange=topology.replies_exchange,
        topic_write=rf"^(reply|bulk)\.{name}$",
        topic_read="^$",
    )


def coordinator_permissions(topology: Topology) -> Permissions:
    everything = rf"^tff\.{re.escape(topology.federation)}\..*$"
    return Permissions(configure=everything, write=everything, read=everything)


def federation_exchanges(topology: Topology) -> dict[str, str]:
    """Every exchange of a federation and its type (all durable): the schema's."""
    return topology.exchanges()


def generate_password() -> str:
    # 32 bytes of entropy, URL-safe (goes into the AMQP URL unescaped).
    return secrets.token_urlsafe(32)


class ManagementApi:
    """A small synchronous client of RabbitMQ's management HTTP API.

    `admin_url` is ``http(s)://user:password@host:15672/`` (a path prefix is
    kept, for a management API behind a reverse proxy)."""

    def __init__(self, admin_url: str, *, timeout: float = 15.0) -> None:
        parsed = yarl.URL(admin_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ProvisionError(
                f"--broker must be the management API URL, http(s)://admin:password@host:15672/,"
                f" got {parsed.with_password('***') if parsed.password else parsed}"
            )
        if not parsed.user:
            raise ProvisionError(
                "the management URL needs an administrator's credentials: "
                "http://admin:password@host:15672/"
            )
        self.display_url = str(parsed.with_user(None).with_password(None))
        self.host = parsed.host
        self._base = str(parsed.with_user(None).with_password(None).with_query(None)).rstrip("/")
        token = f"{parsed.user}:{parsed.password or ''}".encode()
        self._auth = "Basic " + base64.b64encode(token).decode()
        self._timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call; raise ProvisionError naming the call and the broker's answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self._base}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise ProvisionError(
                f"{method} /api/{urllib.parse.unquote(path)} on {self.display_url} failed "
                f"with HTTP {e.code}: {detail}"
            ) from e
        except (urllib.error.URLError, OSError) as e:
            raise ProvisionError(
                f"cannot reach the RabbitMQ management API at {self.display_url} ({e}). Is the "
                "rabbitmq_management plugin enabled (`rabbitmq-plugins enable "
                "rabbitmq_management`) and port 15672 reachable?"
            ) from e
        return json.loads(text) if text.strip() else None

    def delete(self, path: str) -> bool:
        """DELETE; False if it did not exist."""
        try:
            self.call("DELETE", path)
        except ProvisionError as e:
            if "HTTP 404" in str(e):
                return False
            raise
        return True


def _q(name: str) -> str:
    """A path segment (vhost '/' becomes %2F)."""
    return urllib.parse.quote(name, safe="")


class Provisioner:
    """Creates and removes the broker objects of one federation in one vhost."""

    def __init__(
        self, api: ManagementApi, federation: str, vhost: str = "/", queue_type: str = "classic"
    ) -> None:
        self.api = api
        self.topology = Topology(federation, queue_type)
        self.vhost = vhost

    # ------------------------------------------------------------ topology

    def ensure_vhost(self) -> None:
        self.api.call("PUT", f"vhosts/{_q(self.vhost)}", {})

    def declare_exchanges(self) -> None:
        for name, kind in federation_exchanges(self.topology).items():
            self.api.call(
                "PUT",
                f"exchanges/{_q(self.vhost)}/{_q(name)}",
                {"type": kind, "durable": True, "auto_delete": False, "arguments": {}},
            )

    def declare_silo_queues(self, silo: str) -> None:
        """One silo's queues, exactly as the schema (`Topology`) says: the
        agents declare the same specs themselves in guest mode."""
        for spec in self.topology.silo_queue_specs(silo):
            self.api.call(
                "PUT",
                f"queues/{_q(self.vhost)}/{_q(spec.name)}",
                {"durable": spec.durable, "auto_delete": False, "arguments": spec.arguments},
            )
            self.api.call(
                "POST",
                f"bindings/{_q(self.vhost)}/e/{_q(spec.exchange)}/q/{_q(spec.name)}",
                {"routing_key": spec.routing_key, "arguments": {}},
            )

    # --------------------------------------------------------------- users

    def create_user(self, user: str, password: str | None) -> None:
        """A user with a password, or (None) none: it can then only log in
        with EXTERNAL (a client certificate whose CN is the user name)."""
        body = {"password": password, "tags": ""} if password else {"password_hash": "", "tags": ""}
        self.api.call("PUT", f"users/{_q(user)}", body)

    def grant(self, user: str, permissions: Permissions) -> None:
        self.api.call(
            "PUT",
            f"permissions/{_q(self.vhost)}/{_q(user)}",
            {
                "configure": permissions.configure,
                "write": permissions.write,
                "read": permissions.read,
            },
        )
        if permissions.topic_exchange is not None:
            self.api.call(
                "PUT",
                f"topic-permissions/{_q(self.vhost)}/{_q(user)}",
                {
                    "exchange": permissions.topic_exchange,
                    "write": permissions.topic_write,
                    "read": permissions.topic_read,
                },
            )

    # ------------------------------------------------------------ commands

    def add_silo(self, silo: str, *, user: str, password: str | None) -> None:
        check_silo_name(silo)
        self.ensure_vhost()
        self.declare_exchanges()
        self.declare_silo_queues(silo)
        self.create_user(user, password)
        self.grant(user, silo_permissions(self.topology, silo))

    def remove_silo(self, silo: str, *, user: str) -> list[str]:
        """Delete the silo's user and queues (with any messages in them)."""
        removed = [f"user {user}"] if self.api.delete(f"users/{_q(user)}") else []
        for queue in (spec.name for spec in self.topology.silo_queue_specs(silo)):
            if self.api.delete(f"queues/{_q(self.vhost)}/{_q(queue)}"):
                removed.append(f"queue {queue}")
        return removed

    def add_coordinator(self, *, user: str, password: str | None) -> None:
        self.ensure_vhost()
        self.declare_exchanges()
        self.create_user(user, password)
        self.grant(user, coordinator_permissions(self.topology))

    def remove_coordinator(self, *, user: str) -> list[str]:
        return [f"user {user}"] if self.api.delete(f"users/{_q(user)}") else []


def amqp_url_for(base_url: str, user: str, password: str | None, *, external: bool = False) -> str:
    """The AMQP URL a silo (or coordinator) connects with: `base_url`'s scheme,
    host, port and vhost, with the credentials filled in. With EXTERNAL auth
    the user name stays in the URL (it becomes the messages' user_id)."""
    base = yarl.URL(base_url)
    url = base.with_user(user).with_password(password)
    if external:
        url = url.update_query(auth="external")
    return str(url)


def vhost_of(amqp_url: str) -> str:
    path = yarl.URL(amqp_url).path
    return path[1:] if len(path) > 1 else "/"


# ----------------------------------------------------------------- command line


def add_provision_parser(sub: Any, common: Any) -> None:
    """Register `tff-amqp provision ...` on the CLI's subparsers."""
    import argparse

    parser = sub.add_parser(
        "provision",
        parents=[common],
        help="create or remove broker users, permissions and queues of a federation",
        description="Provision a federation on a RabbitMQ broker through its management HTTP "
        "API (plugin rabbitmq_management, port 15672). The last line printed by add-silo / "
        "add-coordinator is the AMQP URL to give that party.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--federation", required=True, help="federation name")
    shared.add_argument(
        "--broker",
        required=True,
        metavar="ADMIN_URL",
        help="management API URL with an administrator's credentials, "
        "http(s)://admin:password@host:15672/",
    )
    shared.add_argument(
        "--amqp-url",
        default=None,
        help="AMQP URL the parties connect to, without credentials; its path is the vhost "
        "(default amqp://<management host>:5672/, vhost /; use amqps://host:5671/vhost for TLS)",
    )
    shared.add_argument(
        "--user", default=None, help="broker user name (default silo.<F>.<NAME> / coordinator.<F>)"
    )
    add_queue_type_option(shared)
    for action, what in (("add-silo", "create"), ("remove-silo", "remove")):
        cmd = actions.add_parser(
            action,
            parents=[shared],
            help=f"{what} a silo's user, permissions and queues",
        )
        cmd.add_argument("name", metavar="NAME", help="silo name")
        if action == "add-silo":
            cmd.add_argument(
                "--cert-cn",
                default=None,
                metavar="CN",
                help="authenticate the silo by client certificate (EXTERNAL): the user is CN "
                "and has no password",
            )
    for action, what in (("add-coordinator", "create"), ("remove-coordinator", "remove")):
        cmd = actions.add_parser(
            action, parents=[shared], help=f"{what} the coordinator's user and permissions"
        )
        if action == "add-coordinator":
            cmd.add_argument(
                "--cert-cn", default=None, metavar="CN", help="EXTERNAL auth, see add-silo"
            )


def run_provision(args: Any) -> int:
    import sys

    try:
        topology = Topology(args.federation, args.queue_type)
        api = ManagementApi(args.broker)
        base = args.amqp_url or f"amqp://{api.host}:5672/"
        provisioner = Provisioner(api, topology.federation, vhost_of(base), topology.queue_type)
        cert_cn = getattr(args, "cert_cn", None)
        password = None if cert_cn else generate_password()
        if args.action in ("add-silo", "remove-silo"):
            user = cert_cn or args.user or silo_user(topology.federation, args.name)
            if args.action == "remove-silo":
                removed = provisioner.remove_silo(args.name, user=user)
                print(f"removed: {', '.join(removed) or 'nothing (already gone)'}")
                return 0
            provisioner.add_silo(args.name, user=user, password=password)
            perms = silo_permissions(topology, args.name)
            print(
                f"silo {args.name!r} of federation {topology.federation!r} on vhost "
                f"{provisioner.vhost!r}: user {user!r}"
            )
            specs = provisioner.topology.silo_queue_specs(args.name)
            print(f"  queues: {', '.join(spec.name for spec in specs)}")
            print(
                f"  permissions: configure {perms.configure}  write {perms.write}  "
                f"read {perms.read}"
            )
            print(f"  topic permission on {perms.topic_exchange}: write {perms.topic_write}")
            print("  run it with: tff-amqp silo --no-declare --broker <URL below> ...")
        else:
            user = cert_cn or args.user or coordinator_user(topology.federation)
            if args.action == "remove-coordinator":
                removed = provisioner.remove_coordinator(user=user)
                print(f"removed: {', '.join(removed) or 'nothing (already gone)'}")
                return 0
            provisioner.add_coordinator(user=user, password=password)
            perms = coordinator_permissions(topology)
            print(
                f"coordinator of federation {topology.federation!r} on vhost "
                f"{provisioner.vhost!r}: user {user!r}, configure/write/read {perms.read}"
            )
        print(amqp_url_for(base, user, password, external=cert_cn is not None))
        return 0
    except (ProvisionError, ValueError) as e:
        print(f"tff-amqp provision: {e}", file=sys.stderr)
        return 1
