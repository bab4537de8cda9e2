"""The group-commit proposer against an in-memory fake of the Raft log: batching, bounds,
push-back, retries of commands that were definitely not applied, unknown outcomes, timeouts."""

from __future__ import annotations

import asyncio

import pytest
from pysyncobj.config import FAIL_REASON

from cluster.proposer import OutcomeUnknown, Overloaded, Proposer, ProposerLimits, ProposeTimeout
from coordinator import commands as cmd
from coordinator.commands import decode_entry
from coordinator.fsm import ApplyResult, CoordinatorFSM


class FakeRaftLog:
    """Stands in for cluster.raft.RaftLog: records proposed entries; the test decides when and how
    each one completes (on another thread, like pysyncobj's tick thread)."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, object]] = []
        self.fsm = CoordinatorFSM()
        self.index = 1

    def apply_entry(self, payload: bytes, callback) -> None:
        self.entries.append((payload, callback))

    def commit(self, position: int) -> None:
        payload, callback = self.entries[position]
        self.index += 1
        results = self.fsm.apply_entry(self.index, payload)
        callback(results, FAIL_REASON.SUCCESS)

    def fail(self, position: int, reason: int) -> None:
        _, callback = self.entries[position]
        callback(None, reason)


def submit(n: int) -> dict:
    return cmd.submit_tasks(1, [[f"t{n}", "", "echo", "", "null", 50, 0, [], 3, None]], f"k{n}")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def fake() -> FakeRaftLog:
    return FakeRaftLog()


async def test_commands_wait_while_entries_are_in_flight_then_go_in_one_entry(fake) -> None:
    proposer = Proposer(fake, asyncio.get_running_loop(), ProposerLimits(entries_in_flight_max=1))
    first = asyncio.ensure_future(proposer.propose(submit(0)))
    await settle()
    rest = [asyncio.ensure_future(proposer.propose(submit(n))) for n in range(1, 6)]
    await settle()
    assert len(fake.entries) == 1  # the window is full: the five others wait
    fake.commit(0)
    assert (await first).value["ids"] == ["t0"]
    await settle()
    assert len(fake.entries) == 2 and len(decode_entry(fake.entries[1][0])) == 5
    fake.commit(1)
    assert [(await r).value["ids"] for r in rest] == [[f"t{n}"] for n in range(1, 6)]


async def test_batches_are_bounded_in_commands_and_bytes(fake) -> None:
    proposer = Proposer(fake, asyncio.get_running_loop(),
                        ProposerLimits(entries_in_flight_max=1, batch_commands_max=3, batch_bytes_max=10**6))
    blocker = asyncio.ensure_future(proposer.propose(submit(0)))
    await settle()
    waiting = [asyncio.ensure_future(proposer.propose(submit(n))) for n in range(1, 8)]
    await settle()
    for position in range(3):
        fake.commit(position)
        await settle()
    sizes = [len(decode_entry(payload)) for payload, _ in fake.entries]
    assert sizes[:4] == [1, 3, 3, 1]
    fake.commit(3)
    await asyncio.gather(blocker, *waiting)


async def test_overload_is_pushed_back_not_queued(fake) -> None:
    proposer = Proposer(fake, asyncio.get_running_loop(), ProposerLimits(commands_in_flight_max=2))
    a = asyncio.ensure_future(proposer.propose(submit(0)))
    b = asyncio.ensure_future(proposer.propose(submit(1)))
    await settle()
    with pytest.raises(Overloaded, match="commands_in_flight_max=2"):
        await proposer.propose(submit(2))
    fake.commit(0)
    fake.commit(1)
    await asyncio.gather(a, b)
    assert proposer.commands_in_flight == 0
    assert (await asyncio.wait_for(asyncio.ensure_future(_commit_soon(fake, proposer, 3)), 5)).ok


async def _commit_soon(fake: FakeRaftLog, proposer: Proposer, n: int) -> ApplyResult:
    task = asyncio.ensure_future(proposer.propose(submit(n)))
    await settle()
    fake.commit(len(fake.entries) - 1)
    return await task


async def test_definitely_not_applied_is_proposed_again_with_the_same_ids(fake) -> None:
    proposer = Proposer(fake, asyncio.get_running_loop(), ProposerLimits(retry_backoff_s=0.01))
    result = asyncio.ensure_future(proposer.propose(submit(7)))
    await settle()
    fake.fail(0, FAIL_REASON.MISSING_LEADER)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(fake.entries) == 2:
            break
    assert fake.entries[0][0] == fake.entries[1][0]  # identical bytes: same stamped id and key
    fake.commit(1)
    assert (await result).value["ids"] == ["t7"]


async def test_unknown_outcome_is_reported_for_a_retry_with_the_key(fake) -> None:
    proposer = Proposer(fake, asyncio.get_running_loop())
    result = asyncio.ensure_future(proposer.propose(submit(1)))
    await settle()
    fake.fail(0, FAIL_REASON.LEADER_CHANGED)
    with pytest.raises(OutcomeUnknown, match="idempotency key"):
        await result
    assert proposer.commands_in_flight == 0


async def test_timeout_frees_the_command(fake) -> None:
    proposer = Proposer(fake, asyncio.get_running_loop(), ProposerLimits(propose_timeout_s=0.05))
    with pytest.raises(ProposeTimeout, match="outcome is unknown"):
        await proposer.propose(submit(1))
    assert proposer.commands_in_flight == 0 and proposer.bytes_in_flight == 0
    fake.commit(0)  # a late commit after the timeout is harmless
    await settle()
