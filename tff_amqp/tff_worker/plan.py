"""Phase plans: a batch's client-side work as one TFF computation.

Used by silos (a batch of the coordinator's operations) and by the
coordinator itself (the SERVER part of a phase, recorded in its LocalExecutor).

A batch is the silo's part of one phase of an invocation, written as a dataflow
graph of worker operations (embed this function, call it on that value, build
a struct, select a member). Applied one operation at a time it costs its
dependency depth in worker round trips, one after another: 11 for a federated
mean. A plan is the same graph as one computation,

    (inputs) -> let v0 = <function>, v1 = v0(inputs[0]), ... in <v1, v3, ...>

which the worker evaluates with a single `CreateCall`; every value the batch
created is then a member of that call's result. Functions are inlined in the
plan (each is the coordinator's own computation, verbatim); values that exist
before the plan runs (argument values, client data, values of earlier phases)
are its inputs.

A plan depends only on the batch's shape: which operations, on which
functions (by SHA-256), in what order, on which inputs. The same phase of the
same computation has the same shape every round, so plans are cached by it
and the worker embeds each plan once (by its digest, like any computation).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from tff_amqp import protocol as p

if TYPE_CHECKING:
    from tff_amqp.inprocess.plans import HostPlan
    from tff_amqp.tff_worker.client import WorkerExecutor

# What a plan can express: the value-creating operations of a batch.
PLANNED_OPERATIONS = (p.CreateCall, p.CreateStruct, p.CreateSelection)

_PARAMETER = "plan_inputs"


@dataclass(frozen=True)
class Earlier:
    """A value that exists before the plan runs: one of the plan's inputs.

    `source` identifies the worker value to pass (a value id, or a key naming
    an earlier plan's result); `index`, when set, selects a member of it
    inside the plan, so a value produced by an earlier plan is used without a
    worker call to select it first."""

    source: Hashable
    index: int | None = None


@dataclass(frozen=True)
class Inline:
    """A function known by its digest, inlined in the plan."""

    digest: bytes


# How the session names what an id outside the batch's own operations is.
Resolver = Callable[[int], Earlier | Inline]
# The parsed `Computation` proto of a function, by digest.
ComputationOf = Callable[[bytes], Any]


def resolver(
    functions: Mapping[int, tuple[bytes, Any]],
    members: Mapping[int, tuple[Any, int]],
    check: Callable[[int], object],
) -> Resolver:
    """How a plan reaches a value its own operations do not create: a
    function (id -> (digest, ...)) is inlined; a member of an earlier plan's
    result (id -> (its call, with a `key`; index)) is that result's member;
    any other value, after `check` (which raises for an unknown id), is an
    input as itself."""

    def where(value_id: int) -> Earlier | Inline:
        function = functions.get(value_id)
        if function is not None:
            return Inline(function[0])
        member = members.get(value_id)
        if member is not None:
            call, index = member
            return Earlier(("plan", call.key), index)
        check(value_id)
        return Earlier(value_id)

    return where


@dataclass(frozen=True)
class PlannedBatch:
    """One batch as a plan: what to call, with what, and where each value is."""

    digest: bytes
    serialized: bytes
    # Worker values to pass, in parameter order (the keys of `Earlier.source`).
    inputs: tuple[Hashable, ...]
    # Value id -> index of the member of the plan's result that holds it
    # (every value the batch created).
    outputs: dict[int, int]
    # Released value id -> index in the result's last member, which gathers
    # them (at `released_at`; None when the batch releases none of them).
    released: dict[int, int] = field(default_factory=dict)
    released_at: int | None = None
    # The batch's argument struct in the order the plan takes it: the plan's
    # member k is the batch's member arguments_order[k]; members not listed
    # follow in batch order (see `PlanCache.plan`).
    arguments_order: tuple[int, ...] = ()
    # The plan as a graph of host functions, when this process can run it
    # without the worker (inprocess/plans.py; only for a cache made with
    # `in_process=True`).
    host: HostPlan | None = None


@dataclass(frozen=True)
class _Built:
    digest: bytes
    serialized: bytes
    host: HostPlan | None = None


@dataclass(frozen=True)
class _Canonical:
    """A batch order's canonical shape: its plan inputs as first-appearance
    numbers of the batch's sources, its result members as batch nodes."""

    shape: Hashable
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    released: tuple[int, ...]
    arguments_order: tuple[int, ...]


class PlanCache:
    """Plans by batch shape, bounded in number and in bytes (a plan holds
    its functions' graphs; least recently used goes first). An evicted plan
    is built again from the next batch of its shape."""

    MAX = 256
    MAX_BYTES = 64 * 1024 * 1024
    # Batch orders remembered (a shape can arrive in a few orders).
    MAX_ORDERS = 1024

    def __init__(self, *, in_process: bool = False) -> None:
        # Also compile each plan for evaluation in this process, where it can be.
        self._in_process = in_process
        self._plans: OrderedDict[Hashable, _Built] = OrderedDict()
        self._canonical: OrderedDict[Hashable, _Canonical] = OrderedDict()
        self._bytes = 0
        self.built = 0

    def plan(
        self,
        operations: Sequence[p.Operation],
        resolve: Resolver,
        computation_of: ComputationOf,
        released: Collection[int] = (),
        arguments: Hashable | None = None,
    ) -> PlannedBatch:
        """The plan of `operations` (value-creating operations in batch
        order; CreateValue ops are functions, given by `resolve` as Inline).
        `released`: ids of values the batch computes; those the result holds
        are also gathered in its last member, so that one `Compute` of that
        member releases them all. `arguments`: the source (an `Earlier.source`)
        of a struct the caller builds for this batch and may put in any order:
        the coordinator ships a phase's argument values concurrently, so they
        arrive in varying orders, and the plan takes them in its own order
        (`PlannedBatch.arguments_order`) instead of one plan per order."""
        raw, targets = _raw_graph(operations, resolve)
        releasing = tuple(node for node, value_id in targets.items() if value_id in released)
        # Batches of a phase arrive in the same order nearly every time: the
        # batch-order graph (inputs numbered by first appearance) finds the
        # canonical shape without ordering and hashing the nodes again.
        sources: dict[Hashable, int] = {}
        key = (
            tuple(
                ("in", sources.setdefault(n[1], len(sources)), n[2]) if n[0] == "in" else n
                for n in raw
            ),
            releasing,
            sources.get(arguments) if arguments is not None else None,
        )
        known = self._canonical.get(key)
        nodes: list[_Node] | None = None
        if known is None:
            ordering = _canonical(raw, targets, releasing, arguments)
            nodes = ordering.nodes
            inputs, outputs = ordering.inputs, ordering.outputs
            gathered = ordering.gathered
            where = {value_id: i for i, value_id in targets.items()}
            known = _Canonical(
                ordering.shape,
                tuple(sources[source] for source in inputs),
                tuple(where[value_id] for value_id in outputs),
                tuple(where[value_id] for value_id in gathered),
                ordering.arguments_order,
            )
            self._canonical[key] = known
            if len(self._canonical) > self.MAX_ORDERS:
                self._canonical.popitem(last=False)
        else:
            self._canonical.move_to_end(key)
            by_number = list(sources)
            inputs = tuple(by_number[i] for i in known.inputs)
            outputs = [targets[i] for i in known.outputs]
            gathered = [targets[i] for i in known.released]
        shape = known.shape
        built = self._plans.get(shape)
        if built is None:
            if nodes is None:
                nodes = _canonical(raw, targets, releasing, arguments).nodes
            built = _build(nodes, len(inputs), computation_of)
            if self._in_process:
                from tff_amqp.inprocess.plans import compile_plan

                built = _Built(built.digest, built.serialized, compile_plan(nodes, computation_of))
            self.built += 1
            self._plans[shape] = built
            self._bytes += len(built.serialized)
            while len(self._plans) > 1 and (
                len(self._plans) > self.MAX or self._bytes > self.MAX_BYTES
            ):
                _, evicted = self._plans.popitem(last=False)
                self._bytes -= len(evicted.serialized)
        else:
            self._plans.move_to_end(shape)
        return PlannedBatch(
            digest=built.digest,
            serialized=built.serialized,
            inputs=inputs,
            outputs={target: i for i, target in enumerate(outputs)},
            released={target: i for i, target in enumerate(gathered)},
            released_at=len(outputs) if gathered else None,
            arguments_order=known.arguments_order,
            host=built.host,
        )


# A node of the plan: ("fn", digest) | ("in", input position, index | None)
# | ("call", fn node, arg node | None) | ("struct", ((name, node), ...))
# | ("select", node, index); nodes refer to earlier nodes by position.
_Node = tuple[Any, ...]


def _raw_graph(
    operations: Sequence[p.Operation], resolve: Resolver
) -> tuple[list[_Node], dict[int, int]]:
    """The batch's graph in batch order, ("in", source, index) for inputs,
    and which nodes create which value ids."""
    raw: list[_Node] = []
    local: dict[int, int] = {}
    interned: dict[Hashable, int] = {}
    targets: dict[int, int] = {}  # raw node -> the value id it creates

    def intern(node: _Node) -> int:
        known = interned.get(node)
        if known is None:
            known = interned[node] = len(raw)
            raw.append(node)
        return known

    def node_of(value_id: int) -> int:
        found = local.get(value_id)
        if found is not None:
            return found
        where = resolve(value_id)
        if isinstance(where, Inline):
            return intern(("fn", where.digest))
        return intern(("in", where.source, where.index))

    for op in operations:
        match op:
            case p.CreateValue():
                # A function: inlined where it is used.
                local[op.target] = node_of(op.target)
                continue
            case p.CreateCall():
                node: _Node = (
                    "call",
                    node_of(op.fn),
                    node_of(op.arg) if op.arg is not None else None,
                )
            case p.CreateStruct():
                node = ("struct", tuple((name, node_of(ref)) for name, ref in op.elements))
            case p.CreateSelection():
                node = ("select", node_of(op.source), op.index)
            case _:
                raise TypeError(f"a plan cannot express {op.op!r}")
        # Every value the batch creates is kept as its own node (the same
        # struct built twice is two values, as op by op).
        local[op.target] = len(raw)
        targets[len(raw)] = op.target
        raw.append(node)
    return raw, targets


class _Ordering(NamedTuple):
    shape: Hashable
    inputs: tuple[Hashable, ...]  # sources, in parameter order
    outputs: list[int]  # value ids, in result order
    gathered: list[int]  # released value ids, in the gathering member's order
    arguments_order: tuple[int, ...]  # see `PlannedBatch.arguments_order`
    nodes: list[_Node]


def _canonical(
    raw: list[_Node],
    targets: dict[int, int],
    releasing: tuple[int, ...] = (),
    arguments: Hashable | None = None,
) -> _Ordering:
    """The nodes in a canonical order: the coordinator evaluates independent
    parts of a computation concurrently, so the same phase can arrive with
    its operations in another order; nodes are therefore ordered by depth,
    then by a hash of their place in the graph, so that such a batch has the
    same shape (and reuses the same plan) as before."""
    # Depth and hash of each node: its structure (children come first),
    # refined by how it is used, so that inputs and values that arrive in
    # another order are still numbered alike.
    depth = _depths(raw)
    # Members of the reorderable argument struct are told apart by use only.
    signature = _refined(
        raw,
        _signatures(
            raw,
            lambda i, index: _hash(("in", None if raw[i][1] == arguments else index)),
        ),
    )
    order = sorted(range(len(raw)), key=lambda i: (depth[i], signature[i], i))
    position = {old: new for new, old in enumerate(order)}

    # Renumbered: children by canonical position, inputs by first use.
    nodes: list[_Node] = []
    inputs: list[Hashable] = []
    input_position: dict[Hashable, int] = {}
    argument_position: dict[int, int] = {}  # batch member -> plan member
    for old in order:
        match raw[old]:
            case ("in", source, index):
                if source not in input_position:
                    input_position[source] = len(inputs)
                    inputs.append(source)
                if source == arguments and arguments is not None and index is not None:
                    index = argument_position.setdefault(index, len(argument_position))
                nodes.append(("in", input_position[source], index))
            case ("call", fn, arg):
                nodes.append(("call", position[fn], None if arg is None else position[arg]))
            case ("struct", elements):
                nodes.append(("struct", tuple((n, position[c]) for n, c in elements)))
            case ("select", source, index):
                nodes.append(("select", position[source], index))
            case node:
                nodes.append(node)
    members = [old for old in order if old in targets]
    outputs = [targets[old] for old in members]
    result = tuple(position[old] for old in members)
    gathered = sorted(releasing, key=position.__getitem__)
    released = tuple(position[old] for old in gathered)
    shape = (tuple(nodes), len(inputs), result, released)
    return _Ordering(
        shape,
        tuple(inputs),
        outputs,
        [targets[old] for old in gathered],
        tuple(argument_position),
        [*nodes, ("result", result, released)],
    )


def _refined(raw: list[_Node], signature: list[int]) -> list[int]:
    """Signatures from below (structure) refined by the graph around each
    node until no more nodes are told apart: two calls of one function on
    inputs used alike differ only by what uses them, and ordering such ties
    by batch position would give another plan for another batch order."""
    parents: list[list[tuple[int, int]]] = [[] for _ in raw]
    for i, node in enumerate(raw):
        for slot, child in enumerate(_children(node)):
            parents[child].append((i, slot))
    classes = len(set(signature))
    for _ in range(len(raw)):
        signature = [
            _hash(
                (
                    signature[i],
                    tuple(signature[child] for child in _children(node)),
                    tuple(sorted((signature[parent], slot) for parent, slot in parents[i])),
                )
            )
            for i, node in enumerate(raw)
        ]
        told_apart = len(set(signature))
        if told_apart == classes:
            break
        classes = told_apart
    return signature


def _children(node: _Node) -> list[int]:
    match node:
        case ("call", fn, arg):
            return [fn] if arg is None else [fn, arg]
        case ("struct", elements):
            return [child for _, child in elements]
        case ("select", source, _):
            return [source]
    return []


def _depths(raw: list[_Node]) -> list[int]:
    depth: list[int] = []
    for node in raw:
        depth.append(1 + max((depth[c] for c in _children(node)), default=-1))
    return depth


def _signatures(raw: list[_Node], of_input: Callable[[int, int | None], int]) -> list[int]:
    signature: list[int] = []
    for i, node in enumerate(raw):
        match node:
            case ("fn", digest):
                signature.append(_hash(("fn", digest)))
            case ("in", _, index):
                signature.append(of_input(i, index))
            case ("call", fn, arg):
                signature.append(
                    _hash(("call", signature[fn], None if arg is None else signature[arg]))
                )
            case ("struct", elements):
                signature.append(_hash(("struct", tuple((n, signature[c]) for n, c in elements))))
            case ("select", source, index):
                signature.append(_hash(("select", signature[source], index)))
    return signature


def _hash(node: tuple[Any, ...]) -> int:
    """A structural hash that is the same in every process (Python's own
    hash of str and bytes is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(node).encode(), digest_size=8).digest(), "big")


def _build(nodes: list[_Node], inputs: int, computation_of: ComputationOf) -> _Built:
    from tensorflow_federated.proto.v0 import computation_pb2 as pb
    from tensorflow_federated.proto.v0 import executor_pb2

    def ref(position: int) -> Any:
        return pb.Computation(reference=pb.Reference(name=f"v{position}"))

    parameter = pb.Computation(reference=pb.Reference(name=_PARAMETER))
    locals_ = []
    for position, node in enumerate(nodes[:-1]):
        match node:
            case ("fn", digest):
                value = computation_of(digest)
            case ("in", index, member):
                # One input is passed as itself, several as a struct.
                value = (
                    parameter
                    if inputs == 1
                    else pb.Computation(selection=pb.Selection(source=parameter, index=index))
                )
                if member is not None:
                    value = pb.Computation(selection=pb.Selection(source=value, index=member))
            case ("call", fn, arg):
                call = pb.Call(function=ref(fn))
                if arg is not None:
                    call.argument.CopyFrom(ref(arg))
                value = pb.Computation(call=call)
            case ("struct", elements):
                value = pb.Computation(
                    struct=pb.Struct(
                        element=[
                            pb.Struct.Element(name=name or "", value=ref(element))
                            for name, element in elements
                        ]
                    )
                )
            case ("select", source, index):
                value = pb.Computation(selection=pb.Selection(source=ref(source), index=index))
            case _:
                raise AssertionError(node)
        locals_.append(pb.Block.Local(name=f"v{position}", value=value))
    _, result, released = nodes[-1]

    def struct(positions: tuple[int, ...]) -> Any:
        return pb.Computation(
            struct=pb.Struct(element=[pb.Struct.Element(value=ref(i)) for i in positions])
        )

    members = [pb.Struct.Element(value=ref(i)) for i in result]
    if released:
        members.append(pb.Struct.Element(value=struct(released)))
    body = pb.Computation(
        block=pb.Block(local=locals_, result=pb.Computation(struct=pb.Struct(element=members)))
    )
    lambda_ = pb.Lambda(result=body)
    if inputs:
        lambda_.parameter_name = _PARAMETER
    computation = pb.Computation(**{"lambda": lambda_})
    serialized = executor_pb2.Value(computation=computation).SerializeToString()
    return _Built(digest=hashlib.sha256(serialized).digest(), serialized=serialized)


def parse_value(serialized: bytes) -> Any:
    """A serialized TFF `Value`, parsed."""
    from tensorflow_federated.proto.v0 import executor_pb2

    return executor_pb2.Value.FromString(serialized)


async def call_plan(
    executor: WorkerExecutor,
    plan: PlannedBatch,
    inputs: Sequence[Awaitable[Any]],
    owned: list[Any],
) -> Any:
    """Run `plan` with one worker call: the plan is embedded once per
    executor (by its digest), its inputs passed as one value (one input as
    itself, several as a struct of them). Worker values made for the call
    (an uncached plan, the inputs' struct) are appended to `owned` as they
    are made; the result (every value the plan created, as a struct) is
    returned, and belongs to the caller."""
    fn, shared = await executor.create_computation(
        plan.serialized, lambda: parse_value(plan.serialized), digest=plan.digest
    )
    if not shared:
        owned.append(fn)
    args = [await future for future in inputs]
    arg: Any | None = None
    if len(args) == 1:
        arg = args[0]
    elif args:
        arg = await executor.create_struct([(None, a) for a in args])
        owned.append(arg)
    return await executor.create_call(fn, arg)
