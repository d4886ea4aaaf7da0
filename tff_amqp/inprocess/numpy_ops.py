"""Small TensorFlow computations run in this process with NumPy.

Folding a few partial aggregates with `merge`, and dividing a mean's sum by
its weight, cost the coordinator's TFF worker a round trip per operation
(create the values, the struct, the call, compute); in NumPy they take
microseconds. Only computations whose TensorFlow graph is nothing but
element-wise arithmetic between its parameters are taken (`AddV2`, `Sub`,
`Mul`, `RealDiv` of floats, `Maximum`, `Minimum`, `SquaredDifference`,
`Square`, `Neg`, `Abs`, `Identity`), with small constants (`Const`): those
ops broadcast and keep dtypes exactly as NumPy's ufuncs do on arrays of one
dtype.
Anything else returns None and runs on the worker as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.types import computation_types

from tff_amqp.inprocess.structs import struct_of, unnamed

log = logging.getLogger(__name__)

HostFn = Callable[[Any], Any]

_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "AddV2": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "RealDiv": np.divide,
    "Maximum": np.maximum,
    "Minimum": np.minimum,
    # TF's kernel: d = x - y; d * d (what grappler makes of `(x - y) * (x - y)`).
    "SquaredDifference": lambda x, y: np.square(np.subtract(x, y)),
}
_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Square": np.square,
    "Neg": np.negative,
    "Abs": np.abs,
}
_PLAIN = ("Identity", "Placeholder")
# TF's RealDiv of integers truncates; np.divide would not.
_FLOAT_ONLY = {"RealDiv"}


def host_function(bb: building_blocks.ComputationBuildingBlock) -> HostFn | None:
    """`bb` as a Python function over host values (NumPy leaves in TFF
    structures), or None if it is not one this module runs."""
    if isinstance(bb, building_blocks.Lambda):
        if isinstance(bb.result, building_blocks.Reference) and (
            bb.result.name == bb.parameter_name
        ):
            return _identity
        return None
    if isinstance(bb, building_blocks.CompiledComputation):
        try:
            return _compiled(bb)
        except _Unsupported as e:
            log.debug("numpy_ops.fallback", extra={"reason": str(e)})
            return None
    return None


# A constant above this size stays a worker value that silos compute themselves
# (a model-sized zero is a few bytes of graph, not a model's worth of bytes).
MAX_CONSTANT_BYTES = 64 * 1024


def constant_value(bb: building_blocks.ComputationBuildingBlock) -> tuple[bool, Any]:
    """(True, value) if `bb` is a no-argument TensorFlow computation whose
    graph is only constants (`Const`, `Identity`) of at most
    MAX_CONSTANT_BYTES in all: its value, computed here. (False, None) else."""
    if not isinstance(bb, building_blocks.CompiledComputation):
        return False, None
    fn_type = bb.type_signature
    if not isinstance(fn_type, computation_types.FunctionType) or fn_type.parameter is not None:
        return False, None
    try:
        return True, _constant(bb, fn_type)
    except _Unsupported as e:
        log.debug("numpy_ops.not_constant", extra={"reason": str(e)})
        return False, None


def _constant(bb: building_blocks.CompiledComputation, fn_type: Any) -> Any:
    from tensorflow.core.framework import graph_pb2
    from tensorflow.python.framework import tensor_util

    proto = bb.proto
    if proto.WhichOneof("computation") != "tensorflow" or proto.tensorflow.initialize_op:
        raise _Unsupported("not a plain TensorFlow computation")
    graph = graph_pb2.GraphDef()
    if not proto.tensorflow.graph_def.Unpack(graph):
        raise _Unsupported("graph_def is not a GraphDef")
    nodes = {node.name: node for node in graph.node}
    token = _node_name(proto.tensorflow.session_token_tensor_name)
    env: dict[str, Any] = {}
    for node in graph.node:
        if node.op == "Placeholder" and node.name == token:
            continue
        if node.op not in ("Const", "Identity"):
            raise _Unsupported(f"op {node.op}")
        for edge in node.input:
            if edge.startswith("^") or (":" in edge and not edge.endswith(":0")):
                raise _Unsupported("control or multi-output edge")
        if node.op == "Const":
            env[node.name] = tensor_util.MakeNdarray(node.attr["value"].tensor)
    if sum(v.nbytes for v in env.values()) > MAX_CONSTANT_BYTES:
        raise _Unsupported("large constant")
    results = _tensor_names(proto.tensorflow.result, fn_type.result)
    out = []
    for name in results:
        node_name = _node_name(name)
        while node_name not in env:
            node = nodes.get(node_name)
            if node is None or node.op != "Identity" or len(node.input) != 1:
                raise _Unsupported(f"result {name} is not a constant")
            node_name = _node_name(node.input[0])
        out.append(_as_leaf(env[node_name]))
    return _packer(fn_type.result)(out)


def _identity(value: Any) -> Any:
    return value


class _Unsupported(Exception):
    pass


def _compiled(bb: building_blocks.CompiledComputation) -> HostFn:
    from tensorflow.core.framework import graph_pb2

    proto = bb.proto
    if proto.WhichOneof("computation") != "tensorflow":
        raise _Unsupported("not a TensorFlow computation")
    tf_proto = proto.tensorflow
    if tf_proto.initialize_op:
        raise _Unsupported("has an initializer")
    fn_type = bb.type_signature
    assert isinstance(fn_type, computation_types.FunctionType)
    graph = graph_pb2.GraphDef()
    if not tf_proto.graph_def.Unpack(graph):
        raise _Unsupported("graph_def is not a GraphDef")
    nodes = {node.name: node for node in graph.node}
    params = (
        _tensor_names(tf_proto.parameter, fn_type.parameter)
        if tf_proto.HasField("parameter")
        else []
    )
    results = _tensor_names(tf_proto.result, fn_type.result)
    placeholders = [_node_name(t) for t in params]
    # The session token (TFF adds one to every computation) may exist but is
    # never an input here: a result depending on it fails the dtype check.
    # A graph rewritten by TFF's compiler may no longer name it; a
    # placeholder nothing reads is not an input either way.
    token = _node_name(tf_proto.session_token_tensor_name)
    read = {_node_name(edge.lstrip("^")) for node in graph.node for edge in node.input}
    read.update(_node_name(r) for r in results)
    others = sorted(
        n for n, node in nodes.items() if node.op == "Placeholder" and n != token and n in read
    )
    if not set(others) <= set(placeholders):
        raise _Unsupported("placeholders other than the parameters")
    dtypes = {name: _dtype(nodes[name]) for name in placeholders}
    # Validate the whole graph up front: every node an op we run, every input
    # a plain data edge to output 0.
    constants: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op == "Const":
            constants[node.name] = _const(node)
            dtypes[node.name] = constants[node.name].dtype
        elif node.op not in _BINARY and node.op not in _UNARY and node.op not in _PLAIN:
            raise _Unsupported(f"op {node.op}")
        for edge in node.input:
            if edge.startswith("^") or (":" in edge and not edge.endswith(":0")):
                raise _Unsupported("control or multi-output edge")
    if sum(c.nbytes for c in constants.values()) > MAX_CONSTANT_BYTES:
        raise _Unsupported("large constants")
    for name in results:
        if _node_name(name) not in nodes:
            raise _Unsupported(f"result {name} not in graph")
    outputs = [_node_name(r) for r in results]
    _check_dtypes(nodes, outputs, dtypes)
    pack = _packer(fn_type.result)
    # TensorFlow (grappler's constant folding, in every session) computes a
    # float division by a constant as a multiplication by its reciprocal:
    # so do we, for the same bits.
    with np.errstate(all="ignore"):  # 1 / 0 is inf, as in TF
        reciprocals = {
            node.name: np.divide(np.ones((), constants[divisor].dtype), constants[divisor])
            for node in graph.node
            if node.op == "RealDiv" and (divisor := _node_name(node.input[1])) in constants
        }

    program = _program(nodes, outputs, {*constants, *placeholders})

    def run(arg: Any) -> Any:
        leaves = _leaves(arg, len(placeholders))
        env: dict[str, Any] = dict(constants)
        for name, leaf in zip(placeholders, leaves, strict=True):
            env[name] = np.asarray(leaf, dtype=dtypes[name])
        with np.errstate(all="ignore"):  # overflow, 0/0: TF's results, no warnings
            for name, op, inputs in program:
                if op is None:
                    env[name] = env[inputs[0]]
                elif name in reciprocals:
                    env[name] = np.multiply(env[inputs[0]], reciprocals[name])
                else:
                    env[name] = op(*[env[i] for i in inputs])
        return pack([_as_leaf(env[name]) for name in outputs])

    return run


def _const(node: Any) -> np.ndarray:
    """A `Const` node's value (of a dtype `_dtype` takes)."""
    from tensorflow.python.framework import tensor_util

    value = np.asarray(tensor_util.MakeNdarray(node.attr["value"].tensor))
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise _Unsupported(f"constant of dtype {value.dtype}")
    return value


def _tensor_names(binding: Any, type_spec: computation_types.Type) -> list[str]:
    kind = binding.WhichOneof("binding")
    if kind == "tensor":
        if not isinstance(type_spec, computation_types.TensorType):
            raise _Unsupported("tensor binding of a non-tensor")
        return [binding.tensor.tensor_name]
    if kind == "struct":
        if not isinstance(type_spec, computation_types.StructType):
            raise _Unsupported("struct binding of a non-struct")
        types = [t for _, t in structure.iter_elements(type_spec)]
        if len(types) != len(binding.struct.element):
            raise _Unsupported("struct binding does not match its type")
        names: list[str] = []
        for element, element_type in zip(binding.struct.element, types, strict=True):
            names.extend(_tensor_names(element, element_type))
        return names
    raise _Unsupported(f"{kind} binding")


def _node_name(tensor: str) -> str:
    return tensor.split(":", 1)[0]


def _dtype(node: Any) -> np.dtype:
    from tensorflow.python.framework import dtypes

    dtype = dtypes.as_dtype(node.attr["dtype"].type).as_numpy_dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise _Unsupported(f"dtype {dtype}")
    return np.dtype(dtype)


def _check_dtypes(nodes: dict[str, Any], outputs: list[str], known: dict[str, np.dtype]) -> None:
    """Every op's inputs share one dtype (as TF requires) and RealDiv sees
    floats only; fills `known` with each node's dtype."""

    def dtype_of(name: str) -> np.dtype:
        if name in known:
            return known[name]
        node = nodes.get(name)
        if node is None:
            raise _Unsupported(f"input {name} not in graph")
        inputs = [dtype_of(_node_name(edge)) for edge in node.input]
        if node.op == "Identity" or node.op in _UNARY:
            if len(inputs) != 1:
                raise _Unsupported(f"{node.op} with several inputs")
        elif len(inputs) != 2 or inputs[0] != inputs[1]:
            raise _Unsupported(f"{node.op} of mixed or missing inputs")
        if node.op in _FLOAT_ONLY and not np.issubdtype(inputs[0], np.floating):
            raise _Unsupported(f"{node.op} of {inputs[0]}")
        known[name] = inputs[0]
        return inputs[0]

    for name in outputs:
        dtype_of(name)


def _program(
    nodes: dict[str, Any], outputs: list[str], given: set[str]
) -> list[tuple[str, Callable[..., np.ndarray] | None, tuple[str, ...]]]:
    """The nodes `outputs` need, in an order that computes each one's inputs
    first: (name, its NumPy function or None for Identity, input names)."""
    program: list[tuple[str, Callable[..., np.ndarray] | None, tuple[str, ...]]] = []
    done = set(given)

    def visit(name: str) -> None:
        if name in done:
            return
        node = nodes[name]
        inputs = tuple(_node_name(edge) for edge in node.input)
        for edge in inputs:
            visit(edge)
        if node.op == "Identity":
            op = None
        else:
            op = _UNARY.get(node.op) or _BINARY[node.op]
        program.append((name, op, inputs))
        done.add(name)

    for name in outputs:
        visit(name)
    return program


def _leaves(value: Any, count: int) -> list[Any]:
    leaves: list[Any] = []
    _flatten(value, leaves)
    if len(leaves) != count:
        raise ValueError(f"expected {count} tensors, got {len(leaves)}")
    return leaves


def _as_leaf(value: Any) -> Any:
    """What TFF's deserialization gives for a tensor: a NumPy scalar for
    rank 0, else an array."""
    array = np.asarray(value)
    return array[()] if array.ndim == 0 else array


def _flatten(value: Any, out: list[Any]) -> None:
    """`structure.flatten` (the leaves of nested structs, in order) without
    its checks, which cost more than the arithmetic of a small value."""
    if isinstance(value, structure.Struct):
        for i in range(len(value)):
            _flatten(value[i], out)
    else:
        out.append(value)


# A struct type's layout: None for a tensor, else its elements' (name, layout).
_Layout = list[tuple[str | None, "_Layout | None"]] | None


def _layout(type_spec: computation_types.Type) -> _Layout:
    if not isinstance(type_spec, computation_types.StructType):
        return None
    return [(name, _layout(element)) for name, element in structure.iter_elements(type_spec)]


def _packer(type_spec: computation_types.Type) -> Callable[[list[Any]], Any]:
    """`structure.pack_sequence_as(type_spec, leaves)` as a function of the
    leaves, the type read once rather than at every call."""
    layout = _layout(type_spec)
    count = _leaf_count(layout)

    def pack(leaves: list[Any]) -> Any:
        if len(leaves) != count:
            raise ValueError(f"{len(leaves)} tensors for {count} results")
        if layout is None:
            return leaves[0]
        return _pack(layout, iter(leaves))

    return pack


def _leaf_count(layout: _Layout) -> int:
    if layout is None:
        return 1
    return sum(_leaf_count(element) for _, element in layout)


def _pack(layout: list[tuple[str | None, _Layout]], leaves: Any) -> Any:
    return struct_of(
        [
            (name, next(leaves) if element is None else _pack(element, leaves))
            for name, element in layout
        ]
    )


def fold(merge: HostFn, report: HostFn, partials: list[Any]) -> Any:
    """`report(merge(...merge(p0, p1)..., pn))`, in the order given."""
    total = partials[0]
    for partial in partials[1:]:
        total = merge(unnamed(total, partial))
    return report(total)
