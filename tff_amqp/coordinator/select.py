"""`federated_select` and the sequence intrinsics (see docs/intrinsics.md).

What TFF 0.87's native compiler leaves of them, checked on this machine:

- `federated_select(<keys@CLIENTS, max_key@SERVER, server_val@SERVER, fn>)`
  reaches the executor unchanged; `fn` is a lambda around the compiled
  `select_fn`. worker_binary runs it: for each client, a sequence of
  `select_fn(server_val, key)` in key order.
- `federated_secure_select` reaches the executor too, but worker_binary cannot
  run it ("Cannot embed a federated value").
- `sequence_reduce` and `sequence_map` reach the executor (usually inside a
  lambda shipped with a map or apply) and worker_binary runs them;
  `sequence_sum` it never runs ("TensorFlow Executor does not support
  intrinsic URI: sequence_sum").

tff-amqp runs a select at the silos: the server value and `max_key` are
shipped to every cohort silo once (a large value is one publish the broker
fans out), and each silo's worker runs `federated_select` over its clients.
Client keys never leave the silo.
"""

from __future__ import annotations

from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs

from tff_amqp.errors import UnsupportedIntrinsicError

# Sequence intrinsics TFF's native runtime cannot run, and what to use instead.
NOT_RUN_BY_NATIVE_TFF = {
    "sequence_sum": (
        "TFF's native runtime cannot run it either (worker_binary: 'TensorFlow Executor does "
        "not support intrinsic URI: sequence_sum'). Use tff.sequence_reduce with a TensorFlow "
        "add, or reduce the dataset inside a tff.tensorflow.computation (ds.reduce(...))"
    ),
}


def unsupported_sequence_intrinsic(uri: str) -> UnsupportedIntrinsicError:
    return UnsupportedIntrinsicError(
        f"intrinsic {uri!r} is not supported: {NOT_RUN_BY_NATIVE_TFF[uri]}"
    )


def check_runnable(bb: building_blocks.ComputationBuildingBlock) -> None:
    """Refuse a function that calls an intrinsic no worker_binary runs, before
    it is shipped anywhere: a clear error instead of a worker's failure that
    a silo would report later, wrapped in its own context."""
    stack = [bb]
    while stack:
        node = stack.pop()
        if isinstance(node, building_blocks.Intrinsic) and node.uri in NOT_RUN_BY_NATIVE_TFF:
            raise unsupported_sequence_intrinsic(node.uri)
        if not isinstance(node, building_blocks.CompiledComputation):
            stack.extend(node.children())


def check_select(intrinsic: building_blocks.Intrinsic) -> None:
    """Refuse zero keys per client (`int32[0]`) before anything is shipped:
    worker_binary, native TFF's included, cannot build an empty sequence
    ("args_into_sequence cannot be used to create zero-length datasets")."""
    keys_type = intrinsic.type_signature.parameter[0]  # type: ignore[attr-defined,index]
    if keys_type.member.shape == (0,):
        raise UnsupportedIntrinsicError(
            f"{intrinsic.uri} with zero keys per client ({keys_type}) is not supported: TFF's "
            "native runtime cannot run it either (its worker cannot create zero-length "
            "sequences). Skip the select when there are no keys"
        )


def as_plain_select(intrinsic: building_blocks.Intrinsic) -> building_blocks.Intrinsic:
    """A `federated_secure_select` as the `federated_select` silos run.

    Secure select promises that the server does not learn which keys clients
    asked for. Selecting at the silo from the whole server value keeps that
    promise (the keys never leave the silo), so the silo's worker may run the
    plain intrinsic. (Secure select's `max_key` is exclusive, plain select's
    inclusive; worker_binary checks neither, so results are the same.)
    """
    return building_blocks.Intrinsic(intrinsic_defs.FEDERATED_SELECT.uri, intrinsic.type_signature)
