"""Records tests/replay/core-v1.jsonl: a command log of today's FSM with the state hash it must
reach. Run it only to add a new recording (never to refresh an old one: an old log whose hash
changed means a change broke determinism or old logs)."""

from __future__ import annotations

import json
import pathlib
import random

from coordinator import commands as cmd
from coordinator.commands import encode_entry
from coordinator.fsm import CoordinatorFSM

OUT = pathlib.Path(__file__).with_name("core-v1.jsonl")


def main() -> None:
    rng = random.Random(20261122)
    fsm = CoordinatorFSM()
    lines = []
    ids: list[str] = []
    for index in range(2, 202):
        now = 1_795_000_000_000 + index * 17
        batch = []
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.55:
                new = [f"t-{index}-{k}" for k in range(rng.randint(1, 5))]
                rows = []
                for k, task_id in enumerate(new):
                    deps = rng.sample(ids, min(len(ids), rng.randint(0, 2))) + new[:k][-1:]
                    rows.append([task_id, f"n{k}", rng.choice(["echo", "sleep", "code_analysis"]), "",
                                 json.dumps({"i": index, "k": k}), rng.randint(0, 100),
                                 now + rng.randint(0, 10**6) if rng.random() < 0.3 else 0, deps, 3,
                                 {"lane": str(k)} if k else None])
                key = f"key-{rng.randint(0, 60)}" if rng.random() < 0.5 else None
                result = fsm.apply(index, cmd.submit_tasks(now, rows, key))
                if result.ok and not result.value["duplicate"]:
                    ids.extend(new)
                batch.append(cmd.submit_tasks(now, rows, key))
            elif roll < 0.75 and ids:
                command = cmd.cancel_task(now, rng.choice(ids), "replay")
                fsm.apply(index, command)
                batch.append(command)
            elif roll < 0.9:
                executor = {"id": f"x{rng.randint(0, 4)}", "name": "w", "type": "algorithmic", "task_types": ["echo"],
                            "capacity": 2, "input_schema_json": "null", "output_schema_json": "null",
                            "performance_profile_json": "null", "context_window_size": 0, "metadata": None}
                command = cmd.register_executor(now, executor)
                fsm.apply(index, command)
                batch.append(command)
            else:
                command = cmd.unregister_executor(now, f"x{rng.randint(0, 4)}")
                fsm.apply(index, command)
                batch.append(command)
        lines.append(json.dumps({"index": index, "entry": encode_entry(batch).decode("utf-8")}))
    # apply() above ran per command; the replay applies whole entries, which must agree.
    replay = CoordinatorFSM()
    for line in lines:
        item = json.loads(line)
        replay.apply_entry(item["index"], item["entry"].encode())
    assert replay.state_hash() == fsm.state_hash()
    header = json.dumps({"format": "coordinator-replay-v1", "state_hash": replay.state_hash(),
                         "tasks": len(replay.tasks)})
    OUT.write_text("\n".join([header, *lines]) + "\n")
    print(f"wrote {OUT} ({len(lines)} entries, {len(replay.tasks)} tasks)")


if __name__ == "__main__":
    main()
