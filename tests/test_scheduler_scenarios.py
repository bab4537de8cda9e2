"""Scenario files for the scheduler (STYLE §11): tests/scenarios/*.txt.

Each file lists commands, then a line `----`, then the expected trace. The trace echoes every
command (`> ...`) followed by what it produced. To regenerate the expected traces after an
intended change, run

    SCENARIO_REWRITE=1 .venv/bin/python -m pytest -q tests/test_scheduler_scenarios.py
    # or: .venv/bin/python tests/test_scheduler_scenarios.py --rewrite

and review the diff. Commands (times like 30s, 500ms, 2m; a fake clock starts at t=0):

    policy NAME [key=value ...]               default: deadline_aware
    executor ID types=a,b [capacity=N] [cost=X] [latency=S] [success=R]
    task ID [type=T] [priority=P] [deadline=+DUR] [runtime=DUR] [deps=a,b]
    advance DUR                               move the fake clock
    peek [N]                                  top N of the queue under the policy's ordering
    schedule [slots=N]                        select() and apply the plan
    complete ID | fail ID [retry] | cancel ID | lose EXECUTOR
    state                                     every task's state (and cause)
    # comment lines and blank lines are ignored
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scheduler.policies import get_policy  # noqa: E402
from scheduler.queue import EffectivePriority, StaticPriority, effective_priority_of  # noqa: E402
from scheduler.state import SchedulerState  # noqa: E402
from scheduler.view import ExecutorView, TaskView  # noqa: E402

SCENARIOS = ROOT / "tests" / "scenarios"
SEPARATOR = "----"


def parse_duration_ms(text: str) -> int:
    text = text.lstrip("+")
    for suffix, scale in (("ms", 1), ("s", 1000), ("m", 60_000)):
        if text.endswith(suffix):
            return round(float(text[: -len(suffix)]) * scale)
    raise ValueError(f"duration {text!r} needs a unit: ms, s or m")


def fmt_ms(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class Runner:
    def __init__(self) -> None:
        self.state = SchedulerState()
        self.policy = get_policy("deadline_aware")
        self.now_ms = 0
        self.seq = 0

    def run(self, line: str) -> list[str]:
        words = line.split()
        command, args = words[0], words[1:]
        options = dict(a.split("=", 1) for a in args if "=" in a)
        positional = [a for a in args if "=" not in a]
        return getattr(self, "do_" + command)(positional, options)

    def do_policy(self, positional: list[str], options: dict[str, str]) -> list[str]:
        config = {k: (int(v) if k == "candidates_window_max" else float(v)) for k, v in options.items()}
        self.policy = get_policy(positional[0], **config)
        return []

    def do_executor(self, positional: list[str], options: dict[str, str]) -> list[str]:
        self.state.add_executor(ExecutorView(
            positional[0], "algorithmic", frozenset(options.get("types", "").split(",")) - {""},
            int(options.get("capacity", 1)), 0, float(options.get("cost", 0)), float(options.get("latency", 0)),
            float(options.get("success", 1)),
        ))
        return []

    def do_task(self, positional: list[str], options: dict[str, str]) -> list[str]:
        deadline_ms = self.now_ms + parse_duration_ms(options["deadline"]) if "deadline" in options else 0
        runtime = parse_duration_ms(options["runtime"]) / 1000 if "runtime" in options else None
        deps = tuple(d for d in options.get("deps", "").split(",") if d)
        task = TaskView(positional[0], options.get("type", "a"), int(options.get("priority", 50)), deadline_ms,
                        self.seq, deps, runtime)
        self.seq += 1
        update = self.state.submit([task])
        return [f"ready {t}" for t in update.ready] + [f"failed {f.task_id} ({f.cause})" for f in update.failed]

    def do_advance(self, positional: list[str], options: dict[str, str]) -> list[str]:
        self.now_ms += parse_duration_ms(positional[0])
        return [f"t={fmt_ms(self.now_ms)}"]

    def do_peek(self, positional: list[str], options: dict[str, str]) -> list[str]:
        count = int(positional[0]) if positional else len(self.state.queue)
        ordering = self.policy.ordering
        out = []
        for task in self.state.queue.top(self.now_ms, ordering, count):
            line = f"{task.id} priority={task.priority}"
            if isinstance(ordering, (EffectivePriority, StaticPriority)):
                eff = effective_priority_of(task, self.now_ms, ordering.alpha, ordering.beta_per_s)
                line += f" effective={eff:.3f}"
            if task.deadline_ms:
                line += f" deadline=t+{fmt_ms(task.deadline_ms - self.now_ms)}" if task.deadline_ms >= self.now_ms \
                    else f" deadline=missed by {fmt_ms(self.now_ms - task.deadline_ms)}"
            out.append(line)
        return out or ["(empty)"]

    def do_schedule(self, positional: list[str], options: dict[str, str]) -> list[str]:
        slots = int(options.get("slots", 1_000_000))
        plan = self.policy.select(self.state.view(), self.now_ms, slots)
        out = []
        for item in plan.unschedulable:
            out.append(f"unschedulable {item.task_id}: {item.reason}")
            for failed in self.state.mark_unschedulable(item.task_id, item.reason):
                out.append(f"failed {failed.task_id} ({failed.cause})")
        for a in plan.assignments:
            self.state.apply_assignment(a)
            out.append(f"assign {a.task_id} -> {a.executor_id} score={a.score:.3f}")
        return out or ["(nothing to do)"]

    def do_complete(self, positional: list[str], options: dict[str, str]) -> list[str]:
        return [f"ready {t}" for t in self.state.complete(positional[0])] or ["(nothing released)"]

    def do_fail(self, positional: list[str], options: dict[str, str]) -> list[str]:
        retry = "retry" in positional[1:]
        failed = self.state.fail(positional[0], permanent=not retry)
        if retry:
            return [f"requeued {positional[0]}"]
        return [f"failed {f.task_id} ({f.cause})" for f in failed] or ["(no dependents)"]

    def do_cancel(self, positional: list[str], options: dict[str, str]) -> list[str]:
        return [f"failed {f.task_id} ({f.cause})" for f in self.state.cancel(positional[0])] or ["(no dependents)"]

    def do_lose(self, positional: list[str], options: dict[str, str]) -> list[str]:
        return [f"requeued {t}" for t in self.state.remove_executor(positional[0])] or ["(no tasks on it)"]

    def do_state(self, positional: list[str], options: dict[str, str]) -> list[str]:
        graph = self.state.graph
        out = []
        for task_id in graph.task_ids():
            cause = graph.cause(task_id)
            out.append(f"{task_id}: {graph.state(task_id).value}" + (f" ({cause})" if cause else ""))
        return out


def run_scenario(commands: str) -> str:
    runner = Runner()
    out: list[str] = []
    for raw in commands.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append(f"> {line}")
        try:
            out.extend("  " + r for r in runner.run(line))
        except Exception as exc:  # an expected error is part of the trace
            out.append(f"  error {type(exc).__name__}: {exc}")
    return "\n".join(out) + "\n"


def split(text: str) -> tuple[str, str]:
    commands, sep, expected = text.partition("\n" + SEPARATOR + "\n")
    assert sep, f"scenario file needs a line {SEPARATOR!r} between commands and expected trace"
    return commands, expected


def rewriting() -> bool:
    return os.environ.get("SCENARIO_REWRITE") == "1"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.txt")), ids=lambda p: p.stem)
def test_scenario(path: pathlib.Path) -> None:
    commands, expected = split(path.read_text())
    actual = run_scenario(commands)
    if rewriting():
        path.write_text(commands + "\n" + SEPARATOR + "\n" + actual)
        return
    assert actual == expected, f"{path.name}: trace differs (SCENARIO_REWRITE=1 regenerates it; review the diff)"


def test_scenarios_exist() -> None:
    assert len(list(SCENARIOS.glob("*.txt"))) >= 5


if __name__ == "__main__":
    if "--rewrite" in sys.argv:
        os.environ["SCENARIO_REWRITE"] = "1"
    sys.exit(pytest.main(["-q", __file__]))
