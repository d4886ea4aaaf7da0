"""Functions named by digest: the silo's store, the coordinator's knowledge of
it, and the wire format (fast, no broker; over real silos: tests/test_work_counts.py
and tests/test_function_names.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from tff_amqp import protocol as p
from tff_amqp.coordinator.stateful.known_functions import MIN_BYTES, KnownFunctions
from tff_amqp.silo.stateful.functions import FunctionStore, RefusedBatches


def _function(tag: int, size: int = 1000) -> bytes:
    """A serialized `Value` holding a computation of about `size` bytes."""
    from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2

    uri = f"fn{tag}-".ljust(size, "x")
    computation = computation_pb2.Computation(intrinsic=computation_pb2.Intrinsic(uri=uri))
    return executor_pb2.Value(computation=computation).SerializeToString()


def _digest(serialized: bytes) -> bytes:
    return hashlib.sha256(serialized).digest()


def _batch(*operations: p.Operation, seq: int = 0) -> p.Batch:
    return p.Batch(operations=tuple(operations), seq=seq)


TENSOR = b"2\x0c\x08\x01\x12\x00j\x06\n\x04\x00\x00\x80?"  # a float32 1.0, not a function


# ------------------------------------------------------------------ protocol


def test_a_known_function_round_trips_and_a_bad_digest_is_refused():
    op = p.CreateKnownFunction(target=7, digest=bytes(range(32)))
    batch = _batch(p.Open(clients=2), op, p.Compute(source=7))
    assert p.Batch.from_wire(batch.to_wire()) == batch
    with pytest.raises(p.ProtocolError, match="SHA-256") as refused:
        p.CreateKnownFunction.from_wire({"op": "known_function", "target": 7, "digest": b"x"})
    assert refused.value.code is p.ErrorCode.MALFORMED


def test_a_silo_status_says_whether_it_holds_functions():
    holds = p.SiloStatus(silo="a", clients=1, holds_functions=True)
    assert p.SiloStatus.from_wire(holds.to_wire()).holds_functions
    assert "hf" not in p.SiloStatus(silo="a", clients=1).to_wire()
    assert not p.SiloStatus.from_wire(p.SiloStatus(silo="a", clients=1).to_wire()).holds_functions


# ---------------------------------------------------------------- the silo


def test_a_function_sent_in_full_is_given_back_in_full_when_named():
    store = FunctionStore()
    fn = _function(1)
    first = _batch(p.CreateValue(target=1, value=fn), p.CreateValue(target=2, value=TENSOR))
    assert store.take(first) is first  # nothing named: the batch as it came
    assert _digest(fn) in store and len(store) == 1  # the tensor is not kept
    later = _batch(p.CreateKnownFunction(target=9, digest=_digest(fn)), p.Compute(source=9))
    taken = store.take(later)
    assert taken.operations == (p.CreateValue(target=9, value=fn), p.Compute(source=9))
    assert taken.seq == later.seq


def test_the_silo_keeps_only_functions_the_coordinator_may_name():
    # Below the protocol's size a function always travels in full: the silo
    # does not hash and keep it on every batch.
    store = FunctionStore()
    small = _function(1, size=p.NAMED_FUNCTION_MIN_BYTES // 2)
    large = _function(2, size=p.NAMED_FUNCTION_MIN_BYTES)
    assert len(small) < p.NAMED_FUNCTION_MIN_BYTES <= len(large)
    store.take(_batch(p.CreateValue(target=1, value=small), p.CreateValue(target=2, value=large)))
    assert _digest(large) in store and _digest(small) not in store and len(store) == 1
    assert MIN_BYTES == p.NAMED_FUNCTION_MIN_BYTES  # what the coordinator names


def test_a_batch_naming_a_function_the_silo_lacks_is_refused_whole():
    store = FunctionStore()
    missing = _digest(_function(2))
    carried = _function(3)
    batch = _batch(
        p.CreateValue(target=1, value=carried), p.CreateKnownFunction(target=2, digest=missing)
    )
    with pytest.raises(p.ProtocolError, match=missing.hex()[:16]) as refused:
        store.take(batch)
    assert refused.value.code is p.ErrorCode.MISSING_FUNCTIONS
    assert "sends them in full" in str(refused.value)
    assert len(store) == 0  # a refused batch leaves nothing behind


def test_after_a_refused_batch_the_invocations_later_batches_wait_for_it_again():
    refused = RefusedBatches()
    refused.refuse("inv", 3, deadline=100.0)
    assert refused.blocking("inv", 4) == 3
    assert refused.blocking("inv", 3) is None  # the refused batch itself may come again
    assert refused.blocking("inv", 2) is None  # an earlier one (a duplicate) as before
    assert refused.blocking("other", 9) is None
    refused.passed("inv", 2)
    assert refused.blocking("inv", 4) == 3
    refused.passed("inv", 3)
    assert refused.blocking("inv", 4) is None
    # Nothing is kept past the invocation's deadline plus the grace.
    refused.refuse("inv", 0, deadline=100.0)
    refused.expire(now=130.0, grace=60.0)
    assert len(refused) == 1
    refused.expire(now=161.0, grace=60.0)
    assert len(refused) == 0


def test_the_store_drops_the_least_recently_used_first_by_count_and_by_bytes():
    store = FunctionStore(max_functions=2, max_bytes=10_000)
    a, b, c = _function(1), _function(2), _function(3)
    store.take(_batch(p.CreateValue(target=1, value=a), p.CreateValue(target=2, value=b)))
    store.take(_batch(p.CreateKnownFunction(target=3, digest=_digest(a))))  # a used again
    store.take(_batch(p.CreateValue(target=4, value=c)))
    assert _digest(a) in store and _digest(c) in store and _digest(b) not in store
    big = FunctionStore(max_functions=10, max_bytes=2500)
    big.take(_batch(*(p.CreateValue(target=i, value=_function(i)) for i in range(1, 4))))
    assert len(big) == 2  # three of ~1 KB do not fit in 2.5 KB
    assert _digest(_function(1)) not in big


# --------------------------------------------------------- the coordinator


def test_the_coordinator_names_only_what_that_silo_process_answered_for():
    known = KnownFunctions()
    fn, small = _function(1), _function(2, size=MIN_BYTES // 2)
    ops = (
        p.CreateValue(target=1, value=fn),
        p.CreateValue(target=2, value=small),
        p.CreateValue(target=3, value=TENSOR),
        p.Compute(source=1),
    )
    first, carried = known.name_known("s1", "inst-a", ops)
    assert first == ops  # nothing known yet: everything in full
    assert carried == ((_digest(fn), len(fn)),)  # small ones and tensors are not tracked
    known.learn("s1", "inst-a", carried)
    named, again = known.name_known("s1", "inst-a", ops)
    assert named[0] == p.CreateKnownFunction(target=1, digest=_digest(fn))
    assert named[1:] == ops[1:] and again == ()
    # Another silo, or the same silo's next process, has not got it.
    assert known.name_known("s2", "inst-b", ops)[0] == ops
    assert known.name_known("s1", "inst-c", ops)[0] == ops
    assert known.held("s1") == 0  # a restarted silo's knowledge is dropped
    known.learn("s1", "inst-c", carried)
    known.forget("s1")
    assert known.name_known("s1", "inst-c", ops)[0] == ops


def test_an_answer_to_a_batch_sent_before_a_refusal_teaches_nothing():
    """A batch carrying `fn` went out, then another batch was refused (the
    silo holds less than promised): the first one's late answer must not
    make the coordinator name `fn`, which the silo may have dropped since."""
    known = KnownFunctions()
    fn = _function(1)
    ops = (p.CreateValue(target=1, value=fn), p.Compute(source=1))
    _, carried = known.name_known("s1", "inst-a", ops)
    before = known.epoch("s1")
    known.forget("s1")  # the refusal of a later batch
    known.learn("s1", "inst-a", carried, before)
    assert known.held("s1") == 0
    assert known.name_known("s1", "inst-a", ops)[0] == ops
    # Published after the refusal: its answer counts.
    known.learn("s1", "inst-a", carried, known.epoch("s1"))
    assert known.held("s1") == 1


def test_whatever_the_coordinator_names_the_silo_still_holds():
    """Both sides see the same batches in the same order (the silo's queue);
    the coordinator tracks a quarter of the store's bounds, so a digest it
    names is never one the store dropped, over many rounds of new and
    repeated functions of varied sizes."""
    rng = random.Random(7)
    known = KnownFunctions(max_functions=16, max_bytes=40_000)
    store = FunctionStore(max_functions=64, max_bytes=160_000)
    pool = [_function(i, size=rng.choice([300, 2000, 9000])) for i in range(200)]
    named_total = 0
    for _ in range(400):
        chosen = rng.sample(pool[: rng.randint(10, len(pool))], rng.randint(1, 12))
        ops = tuple(p.CreateValue(target=i, value=fn) for i, fn in enumerate(chosen))
        named, carried = known.name_known("s1", "inst", ops)
        named_total += sum(isinstance(op, p.CreateKnownFunction) for op in named)
        taken = store.take(_batch(*named))  # raises MISSING_FUNCTIONS if the rule broke
        assert taken.operations == ops
        known.learn("s1", "inst", carried)
    assert named_total > 200  # the rule was exercised, not vacuous


def test_a_function_held_in_a_view_or_bytearray_is_digested_alike():
    known = KnownFunctions()
    fn = _function(5)
    assert known.digest(memoryview(fn)) == known.digest(bytearray(fn)) == known.digest(fn)
    assert known.digest(fn) == _digest(fn)


async def test_a_refusal_is_taken_in_before_whoever_awaits_it_resumes():
    """The outbox sends a refused batch again as soon as it sees the refusal,
    even when the refusal came back before the publish returned (it then
    never waits): by then the link must have forgotten what that silo holds,
    or the batch names the same functions again and is refused again."""
    from tff_amqp.coordinator.intake import Pending
    from tff_amqp.coordinator.membership import Membership
    from tff_amqp.coordinator.stateful.link import CoordinatorLink, _NamedBatch
    from tff_amqp.topology import Topology

    link = CoordinatorLink("amqp://unused/", Topology("fed"), Membership())
    fn = _function(1)
    digest = _digest(fn)
    link.functions.learn("alpha", "inst", [(digest, len(fn))])
    future = asyncio.get_running_loop().create_future()
    link._pending["corr"] = Pending("alpha", "inv", future, "inst")
    link._named["corr"] = _NamedBatch("alpha", "inst", (), link.functions.epoch("alpha"))
    refusal = p.Envelope(
        kind=p.Kind.ERROR,
        body=p.ErrorReport(code=p.ErrorCode.MISSING_FUNCTIONS, message="does not hold"),
        sender="alpha",
        invocation_id="inv",
        correlation_id="corr",
    )
    link._deliver("corr", link._pending["corr"], refusal, "alpha")
    # No turn of the event loop yet: whoever awaits `future` would resume now.
    assert future.done()
    assert link.functions.held("alpha") == 0
    ops = (p.CreateValue(target=1, value=fn), p.Compute(source=1))
    assert link.functions.name_known("alpha", "inst", ops)[0] == ops
    assert link.stats["functions_missing"] == 1
