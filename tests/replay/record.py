"""Records tests/replay/core-v<FSM_STATE_VERSION>.jsonl: a command log of today's FSM with the
state hash and the semantic digest it must reach. Run it only to add a recording for a new
FSM_STATE_VERSION — never to refresh an old one: an old log whose digest changed means a change
broke determinism or the meaning of old logs."""

from __future__ import annotations

import json
import pathlib
import random

from coordinator import commands as cmd
from coordinator.checkpoints import make_checkpoint
from coordinator.commands import encode_entry
from coordinator.fsm import FSM_STATE_VERSION, CoordinatorFSM

OUT = pathlib.Path(__file__).with_name(f"core-v{FSM_STATE_VERSION}.jsonl")


def _stamp(rng: random.Random, command: dict) -> None:
    """What a secure node's proposer adds (version 6): who, roles, sometimes "own", and the audit
    stamp (the signature is a placeholder: apply never verifies it)."""
    if rng.random() < 0.3:
        return
    command["p"] = rng.choice(["alice", "executor:x1", "node:n1"])
    command["r"] = ["admin"] if command["p"] == "alice" else ["agent:executor"]
    if command["p"] == "executor:x1" and rng.random() < 0.5:
        command["own"] = "executor:x1"
    command["a"] = {"n": "n1", "d": "0" * 64, "s": "sig"}


def main() -> None:
    rng = random.Random(20261122)
    fsm = CoordinatorFSM()
    lines = []
    ids: list[str] = []
    dags: list[str] = []
    def apply(index: int, command: dict):
        _stamp(rng, command)  # before apply, as a secure node's proposer does
        return fsm.apply(index, command)

    for index in range(2, 202):
        # From version 4 on, time jumps past checkpoint_retention_after_final_ms once, so the
        # checkpoints of tasks that ended early are dropped.
        now = 1_795_000_000_000 + index * 17 + (20 * 60_000 if index >= 150 else 0)
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
                dag_id = f"d-{index}-{len(batch)}" if len(new) > 1 else ""
                # version 7: the submitter's traceparent, stored with each task
                trace_parent = (f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"
                                if rng.random() < 0.5 else "")
                command = cmd.submit_tasks(now, rows, key, dag_id, trace_parent=trace_parent)
                result = apply(index, command)
                if result.ok and not result.value["duplicate"]:
                    ids.extend(new)
                    if dag_id:
                        dags.append(dag_id)
                batch.append(command)
            elif roll < 0.62 and ids:
                command = cmd.cancel_task(now, rng.choice(ids), "replay")
                apply(index, command)
                batch.append(command)
            elif roll < 0.75 and fsm.ready and fsm.executors:
                task_id = rng.choice(sorted(fsm.ready))
                executor_id = rng.choice(sorted(fsm.executors))
                command = cmd.assign_tasks(now, 30_000, [[task_id, executor_id, fsm.tasks[task_id].attempt + 1]])
                apply(index, command)
                batch.append(command)
                record = fsm.tasks[task_id]
                if record.status == "assigned":
                    for _ in range(rng.randint(0, 3)):  # checkpoints (SAVE_CHECKPOINT, version 4)
                        follow = _checkpoint(fsm, rng, now, task_id, record.attempt, executor_id)
                        apply(index, follow)
                        batch.append(follow)
                    if rng.random() < 0.3:  # REPORT_PROGRESS (version 5)
                        follow = cmd.report_progress(now, task_id, record.attempt, executor_id,
                                                     rng.choice([0.0, 0.25, 1.0]), "replay")
                        apply(index, follow)
                        batch.append(follow)
                    implied = rng.random() < 0.5  # a terminal report standing for `started` (version 5)
                    outcome = rng.random()
                    if outcome < 0.6:
                        follow = cmd.complete_task(now, task_id, record.attempt, executor_id, '{"ok":true}', implied)
                    elif outcome < 0.85:
                        follow = cmd.fail_task(now, task_id, record.attempt, executor_id, "boom", rng.random() < 0.7,
                                               rng.randint(0, 5000), implied)
                    else:
                        follow = cmd.executor_lost(now, executor_id, "replay")
                    apply(index, follow)
                    batch.append(follow)
            elif roll < 0.78 and ids:
                command = cmd.requeue_task(now, rng.choice(ids), 2)
                apply(index, command)
                batch.append(command)
            elif roll < 0.8 and dags:
                command = cmd.cancel_dag(now, rng.choice(dags), "replay")
                apply(index, command)
                batch.append(command)
            elif roll < 0.9:
                executor = {"id": f"x{rng.randint(0, 4)}", "name": "w", "type": "algorithmic", "task_types": ["echo"],
                            "capacity": 2, "input_schema_json": "null", "output_schema_json": "null",
                            "performance_profile_json": "null", "context_window_size": 0, "metadata": None}
                if rng.random() < 0.5:
                    executor["resumable"] = True  # version 5
                command = cmd.register_executor(now, executor)
                apply(index, command)
                batch.append(command)
            else:
                command = cmd.unregister_executor(now, f"x{rng.randint(0, 4)}")
                apply(index, command)
                batch.append(command)
        # Version 6: principals, ownership, audit stamps, decisions, signed heads, secrets.
        extra = []
        if rng.random() < 0.2:
            extra.append(cmd.audit_decisions("n1", [
                {"p": "alice", "r": ["user"], "act": "access:GetTask", "res": "", "o": rng.choice(["allowed", "denied:X x3"]),
                 "now": now, "d": f"decision:{index}", "s": f"sig-d{index}"}]))
        if rng.random() < 0.1 and fsm.audit.last_seq:
            extra.append(cmd.audit_head(now, "n1", fsm.audit.last_seq, fsm.audit.last_hash, f"sig-h{index}"))
        if rng.random() < 0.1:
            name = f"s{rng.randint(0, 3)}"
            envelope = {"kek_id": "k1", "key_nonce": "kn", "wrapped_key": f"wk{index}", "nonce": "n",
                        "ciphertext": f"c{index}"}
            extra.append(cmd.put_secret(now, name, envelope) if rng.random() < 0.7 else cmd.delete_secret(now, name))
        for command in extra:
            fsm.apply(index, command)
        batch.extend(extra)
        lines.append(json.dumps({"index": index, "entry": encode_entry(batch).decode("utf-8")}))
    # apply() above ran per command; the replay applies whole entries, which must agree.
    replay = CoordinatorFSM()
    for line in lines:
        item = json.loads(line)
        replay.apply_entry(item["index"], item["entry"].encode())
    assert replay.state_hash() == fsm.state_hash()
    header = json.dumps({"format": "coordinator-replay-v1", "fsm_state_version": FSM_STATE_VERSION,
                         "state_hash": replay.state_hash(), "semantic_digest": replay.semantic_digest(),
                         "tasks": len(replay.tasks),
                         "statuses": {s: n for s, n in sorted(replay.status_counts.items()) if n}})
    OUT.write_text("\n".join([header, *lines]) + "\n")
    print(f"wrote {OUT} ({len(lines)} entries, {len(replay.tasks)} tasks)")


def _checkpoint(fsm: CoordinatorFSM, rng: random.Random, now: int, task_id: str, attempt: int,
                executor_id: str) -> dict:
    recovery = fsm.recover_task(task_id)
    document = recovery.restored.document or {"state_snapshot": {}, "executed_actions": [], "remaining_plan": [1, 2, 3]}
    document["executed_actions"].append({"id": f"a{len(document['executed_actions'])}", "r": rng.randint(0, 99)})
    document["state_snapshot"]["n"] = rng.randint(0, 9)
    limits = fsm.limits.checkpoints
    base = recovery.base_document
    record = make_checkpoint(base, recovery.last_sequence, document, task_id=task_id, timestamp_ms=now,
                             full_every=limits.full_every, delta_chain_bytes_max=limits.delta_chain_bytes_max,
                             chain_deltas_so_far=recovery.chain.deltas if base else 0,
                             chain_bytes_so_far=recovery.chain.delta_bytes if base else 0,
                             model_versions={"planner": f"p{rng.randint(1, 3)}"})
    fields = {k: v for k, v in record.as_dict().items() if k != "task_id"}
    if rng.random() < 0.1:
        attempt += 1  # a stale attempt: rejected, recorded as such
    return cmd.save_checkpoint(now, task_id, attempt, executor_id, fields)


if __name__ == "__main__":
    main()
