"""tff-amqp: run TensorFlow Federated computations across silos that open only
outbound AMQP connections to a RabbitMQ broker.

    import tff_amqp
    ctx = tff_amqp.set_sync_amqp_execution_context("amqp://guest:guest@localhost/")
    result = my_federated_computation(tff_amqp.silo_data("patients"))

Names are imported lazily: importing TensorFlow Federated takes seconds, and
the CLI should answer `--help` at once.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# tff-amqp forks only to exec (worker_binary, silo processes). gRPC's fork
# handlers are meant for fork-without-exec, are unsupported with its asyncio
# API, and were seen to crash a process that started workers while another
# worker's channel was busy. gRPC itself recommends turning them off for
# fork+exec programs. Set before gRPC initializes; an explicit setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

_EXPORTS = {
    "create_sync_amqp_execution_context": "tff_amqp.coordinator.stateful.context",
    "create_async_amqp_execution_context": "tff_amqp.coordinator.stateful.context",
    "set_sync_amqp_execution_context": "tff_amqp.coordinator.stateful.context",
    "set_async_amqp_execution_context": "tff_amqp.coordinator.stateful.context",
    "AmqpSyncExecutionContext": "tff_amqp.coordinator.stateful.context",
    "AmqpAsyncExecutionContext": "tff_amqp.coordinator.stateful.context",
    "create_sync_amqp_mapreduce_context": "tff_amqp.coordinator.mapreduce.context",
    "create_async_amqp_mapreduce_context": "tff_amqp.coordinator.mapreduce.context",
    "set_sync_amqp_mapreduce_context": "tff_amqp.coordinator.mapreduce.context",
    "set_async_amqp_mapreduce_context": "tff_amqp.coordinator.mapreduce.context",
    "AmqpSyncMapReduceContext": "tff_amqp.coordinator.mapreduce.context",
    "AmqpAsyncMapReduceContext": "tff_amqp.coordinator.mapreduce.context",
    "NotMapReduceFormError": "tff_amqp.coordinator.mapreduce.context",
    "silo_data": "tff_amqp.data_reference",
    "SiloDataReference": "tff_amqp.data_reference",
    "TffAmqpError": "tff_amqp.errors",
    "BrokerUnreachableError": "tff_amqp.errors",
    "BrokerAuthError": "tff_amqp.errors",
    "BrokerPermissionError": "tff_amqp.errors",
    "QuorumError": "tff_amqp.errors",
    "PartialResultError": "tff_amqp.errors",
    "PartialResultWarning": "tff_amqp.errors",
    "CohortError": "tff_amqp.errors",
    "SiloError": "tff_amqp.errors",
    "SiloWorkerError": "tff_amqp.errors",
    "SiloUnreachableError": "tff_amqp.errors",
    "InvocationTimeoutError": "tff_amqp.errors",
    "UnsupportedIntrinsicError": "tff_amqp.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tff_amqp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
