"""AMQP plumbing: connections, publishing and consuming for both roles."""

from tff_amqp.transport.connection import connect, redact_url

__all__ = ["connect", "redact_url"]
