"""Disposals that arrive while one is in flight go to the worker together
(WorkerExecutor.dispose): the sessions of concurrent invocations end at once.
A fake worker stub whose Dispose calls the test completes; over the real
broker, tests/test_bundling.py counts the silos' Dispose calls."""

from __future__ import annotations

import asyncio

from tensorflow_federated.proto.v0 import executor_pb2

from tff_amqp.tff_worker.client import WorkerError, WorkerExecutor


class _Stub:
    def __init__(self, bad: str | None = None) -> None:
        self.requests: list[list[str]] = []
        self.answers: list[asyncio.Future[None]] = []
        self.bad = bad

    def Dispose(self, request: executor_pb2.DisposeRequest):
        ids = [ref.id for ref in request.value_ref]
        self.requests.append(ids)
        answer = asyncio.get_running_loop().create_future()
        self.answers.append(answer)

        async def call() -> None:
            await answer
            if self.bad in ids:
                raise WorkerError(f"unknown value {self.bad}", "NOT_FOUND")

        return call()

    def answer_all(self) -> None:
        for answer in self.answers:
            if not answer.done():
                answer.set_result(None)


def _refs(*ids: str) -> list[executor_pb2.ValueRef]:
    return [executor_pb2.ValueRef(id=i) for i in ids]


async def _turns() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_disposals_waiting_behind_one_in_flight_go_in_one_call() -> None:
    stub = _Stub()
    executor = WorkerExecutor(stub, executor_pb2.ExecutorId(id="e"))  # type: ignore[arg-type]
    first = asyncio.create_task(executor.dispose(_refs("a")))
    await _turns()
    waiting = [asyncio.create_task(executor.dispose(_refs(x, x + "2"))) for x in "bcd"]
    await _turns()
    assert stub.requests == [["a"]]
    stub.answer_all()
    await _turns()
    assert stub.requests == [["a"], ["b", "b2", "c", "c2", "d", "d2"]]
    stub.answer_all()
    await asyncio.gather(first, *waiting)
    assert executor.calls["Dispose"] == 2
    # Idle again: the next disposal goes at once.
    later = asyncio.create_task(executor.dispose(_refs("e")))
    await _turns()
    assert stub.requests[-1] == ["e"]
    stub.answer_all()
    await later


async def test_a_bad_ref_fails_only_its_own_caller() -> None:
    stub = _Stub(bad="x")
    executor = WorkerExecutor(stub, executor_pb2.ExecutorId(id="e"))  # type: ignore[arg-type]
    first = asyncio.create_task(executor.dispose(_refs("a")))
    await _turns()
    good = asyncio.create_task(executor.dispose(_refs("b")))
    bad = asyncio.create_task(executor.dispose(_refs("x")))
    for _ in range(4):
        await _turns()
        stub.answer_all()
    await first
    await good
    try:
        await bad
    except WorkerError as e:
        assert "unknown value x" in str(e)
    else:
        raise AssertionError("the bad disposal did not fail")
    # Together first, then each group alone so the good one's values are freed.
    assert stub.requests == [["a"], ["b", "x"], ["b"], ["x"]]
