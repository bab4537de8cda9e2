"""Pure, deterministic scheduling logic over a read-only view (DESIGN.md §6). See README.md."""

from scheduler.graph import DependencyGraph, GraphUpdate, TaskState, UpstreamFailed, upward_ranks
from scheduler.policies import DEFAULT_POLICY, POLICIES, SchedulingPolicy, get_policy
from scheduler.queue import EffectivePriority, Fifo, ReadyQueue, StaticPriority, UpwardRank, effective_priority
from scheduler.resources import ResourceAllocator
from scheduler.state import SchedulerState
from scheduler.view import Assignment, ExecutorView, Plan, SchedulerView, TaskView, Unschedulable

__all__ = [
    "DEFAULT_POLICY", "POLICIES", "Assignment", "DependencyGraph", "EffectivePriority", "ExecutorView", "Fifo",
    "GraphUpdate", "Plan", "ReadyQueue", "ResourceAllocator", "SchedulerState", "SchedulerView", "SchedulingPolicy",
    "StaticPriority", "TaskState", "TaskView", "Unschedulable", "UpstreamFailed", "UpwardRank", "effective_priority",
    "get_policy", "upward_ranks",
]
