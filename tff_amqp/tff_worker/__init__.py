"""The local TFF worker_binary: process lifecycle and async gRPC client."""

from tff_amqp.tff_worker.client import WorkerClient, WorkerError, WorkerExecutor
from tff_amqp.tff_worker.process import WorkerBinary, find_worker_binary

__all__ = ["WorkerBinary", "WorkerClient", "WorkerError", "WorkerExecutor", "find_worker_binary"]
