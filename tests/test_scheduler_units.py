"""Unit tests for the scheduler's pieces: registry errors, graph validation, allocator bounds,
re-validation of assignments, ranks and bounds used by the benchmark."""

from __future__ import annotations

import pytest

from scheduler.errors import (
    CapacityExceeded,
    DependencyCycle,
    InvalidPolicyConfig,
    InvalidTransition,
    SchedulerError,
    UnknownExecutor,
    UnknownPolicy,
)
from scheduler.graph import DependencyGraph, TaskState, upward_ranks
from scheduler.policies import DEFAULT_POLICY, POLICIES, SchedulingPolicy, get_policy
from scheduler.resources import ResourceAllocator
from scheduler.simulate import SimTask, energetic_lower_bound_ms, lower_bound_ms, simulate_workload, Workload
from scheduler.state import SchedulerState
from scheduler.view import Assignment, ExecutorView, TaskView


def test_registry_names_and_default() -> None:
    assert DEFAULT_POLICY == "deadline_aware"
    assert set(POLICIES) == {"deadline_aware", "fifo", "cost_optimized", "resource_optimized", "critical_path"}
    for name in POLICIES:
        assert isinstance(get_policy(name), SchedulingPolicy)


def test_unknown_policy_names_the_valid_ones() -> None:
    with pytest.raises(UnknownPolicy) as info:
        get_policy("round_robin")
    assert "'round_robin'" in str(info.value) and "critical_path" in str(info.value) and "fifo" in str(info.value)
    assert isinstance(info.value, SchedulerError) and info.value.code == "INVALID_ARGUMENT"


def test_bad_policy_config_is_a_clear_error() -> None:
    with pytest.raises(InvalidPolicyConfig, match="alpha"):
        get_policy("fifo", alpha=3)
    with pytest.raises(InvalidPolicyConfig, match="beta_per_s"):
        get_policy("deadline_aware", beta_per_s=0)
    with pytest.raises(InvalidPolicyConfig, match="candidates_window_max"):
        get_policy("deadline_aware", candidates_window_max=0)
    with pytest.raises(InvalidPolicyConfig, match="cost"):
        get_policy("deadline_aware", weights={"cost": -1})


def test_cycle_detected_on_add_and_nothing_added() -> None:
    graph = DependencyGraph()
    graph.add_task("base")
    with pytest.raises(DependencyCycle, match="x -> y -> x|y -> x -> y"):
        graph.add_tasks([("x", ["y", "base"]), ("y", ["x"])])
    assert graph.task_ids() == ["base"]


def test_completion_releases_in_o_degree_and_only_once() -> None:
    graph = DependencyGraph()
    update = graph.add_tasks([("a", []), ("b", ["a"]), ("c", ["a", "b"]), ("d", ["a", "a"])])
    assert update.ready == ("a",)
    assert graph.mark_completed("a") == ["b", "d"]
    assert graph.mark_completed("b") == ["c"]
    with pytest.raises(InvalidTransition):
        graph.mark_completed("a")


def test_adding_onto_completed_and_failed_tasks() -> None:
    graph = DependencyGraph()
    graph.add_tasks([("ok", []), ("bad", [])])
    graph.mark_completed("ok")
    graph.mark_failed("bad")
    update = graph.add_tasks([("child", ["ok"]), ("grandchild", ["child", "bad"]), ("next", ["grandchild"])])
    assert update.ready == ("child",)
    assert [(f.task_id, f.cause) for f in update.failed] == [("grandchild", "upstream_failed:bad"), ("next", "upstream_failed:bad")]
    assert graph.state("child") is TaskState.READY


def test_upward_ranks_and_bounds() -> None:
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    ranks = upward_ranks(deps, {"a": 1, "b": 5, "c": 2, "d": 1})
    assert ranks == {"a": 7, "b": 6, "c": 3, "d": 1}
    tasks = [SimTask(k, int(ranks[k] * 0) + w, tuple(v)) for (k, v), w in zip(deps.items(), (1000, 5000, 2000, 1000))]
    bound, critical_path, work = lower_bound_ms(tasks, 2)
    assert (bound, critical_path, work) == (7000, 7000, 9000)
    assert energetic_lower_bound_ms(tasks, 2) >= bound
    result = simulate_workload(Workload("diamond", tuple(tasks)), 2, get_policy())
    assert result.sim.makespan_ms == 7000 and result.sim.deadline_hit_rate == 1.0


def test_allocator_capacity_and_placement() -> None:
    allocator = ResourceAllocator()
    allocator.add_executor(ExecutorView("e", "algorithmic", frozenset({"a"}), capacity=1))
    allocator.assign("t1", "e")
    with pytest.raises(CapacityExceeded):
        allocator.assign("t2", "e")
    with pytest.raises(UnknownExecutor):
        allocator.assign("t2", "nope")
    # Re-registering keeps the load the allocator counted, whatever the caller says.
    allocator.add_executor(ExecutorView("e", "algorithmic", frozenset({"a"}), capacity=3, load=0))
    assert allocator.load("e") == 1 and allocator.free_slots("e") == 2
    assert allocator.release("t1") == "e" and allocator.load("e") == 0


def test_apply_assignment_revalidates_a_stale_plan() -> None:
    state = SchedulerState()
    state.add_executor(ExecutorView("e", "algorithmic", frozenset({"a"}), capacity=1))
    state.submit([TaskView("t1", "a"), TaskView("t2", "a", created_seq=1), TaskView("t3", "b", created_seq=2)])
    plan = get_policy().select(state.view(), 0, 5)
    assert [a.task_id for a in plan.assignments] == ["t1"]
    state.apply_assignment(plan.assignments[0])
    with pytest.raises(InvalidTransition):  # the same plan again: t1 is no longer queued
        state.apply_assignment(plan.assignments[0])
    with pytest.raises(CapacityExceeded):
        state.apply_assignment(Assignment("t2", "e", 0.0))
    with pytest.raises(InvalidTransition):  # the executor does not support type b
        state.apply_assignment(Assignment("t3", "e", 0.0))
    assert state.state("t2") is TaskState.READY and "t2" in state.queue


def test_select_is_pure() -> None:
    state = SchedulerState()
    state.add_executor(ExecutorView("e", "algorithmic", frozenset({"a"}), capacity=2))
    state.submit([TaskView(f"t{i}", "a", created_seq=i) for i in range(5)])
    view = state.view()
    before = (state.queue.tasks(), view.executors)
    first = get_policy().select(view, 0, 2)
    assert get_policy().select(view, 0, 2) == first
    assert (state.queue.tasks(), view.executors) == before
