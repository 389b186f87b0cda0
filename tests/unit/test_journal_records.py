"""The journal's typed records (``tolaria.journal``): every kind reads its payload and writes it back key for key
(same keys, same order, same values), whether the daemon wrote it today (the simulation's worlds) or before the
house was split (tests/fixtures/journal-716a6d2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.simulation.harness import World, draw_schedule
from tolaria.controller import RunFinished
from tolaria.controller.events import event_from_proto
from tolaria.governor.v1 import control_service_pb2
from tolaria.journal import (
    RECORDS,
    EntryKind,
    Finish,
    Notice,
    Stale,
    ValidationDetails,
    Vitals,
    record_of,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/journal-716a6d2/journal-00000001.jsonl"
EFFECTS = {"policy": {"state": "healthy"}, "ranks": {"0": {"last_seq": 3}}}
COMMAND = {"command_id": 1, "kind": "rollback", "reason": "divergence", "timeline": 0, "step": 20}
SOURCE = {"rank": 0, "incarnation_id": "d1g35t", "seq": 7}
DETAILS = {"seq": 7, "timeline": 0, "step": 30, "epoch": 3, "loss": "nan", "accuracy": 0.5, "seeds": []}
NOTICE = {"kind": "command_failed", "reason": "restore failed", "command": COMMAND}
TRAIN = {"first_step": 1, "last_step": 4, "loss_mean": 2.5, "loss_max": "nan", "grad_norm_max": None}

# One payload per kind, with its conditional keys, in the order the daemon writes them.
SAMPLES: dict[EntryKind, dict[str, Any]] = {
    EntryKind.CHECKPOINT: {"runs": {"r": {"last_cursor": 9}}, "lives": 1},
    EntryKind.DAEMON_START: {"runs_restored": 1, "entries_applied": 2, "moved_aside": ["x.jsonl"]},
    EntryKind.DAEMON_STOP: {"reason": "SIGTERM"},
    EntryKind.RUN_CREATED: {
        "task": "cifar",
        "world_size": 2,
        "timeline": 0,
        "overrides": {"sensitivity": 5.0},
        "ignored_policy_fields": [],
        "effective_policy": {"sensitivity": 5.0},
        "trainer_version": "1.0",
        "effects": EFFECTS,
    },
    EntryKind.RUN_EVICTED: {"effects": {"forget": True}},
    EntryKind.RUN_FORGOTTEN: {"reason": "done", "caller": "ops", "state": "finished", "effects": {"forget": True}},
    EntryKind.RUN_EXPIRED: {"idle_s": 3600.25, "state": "halted", "effects": {"forget": True}},
    EntryKind.ATTACH: {
        "rank": 0,
        "incarnation_id": "d1g35t",
        "new_incarnation": True,
        "generation": 2,
        "last_durable_seq": 0,
        "peer": "ipv4:1.2.3.4:5",
        "caller": "trainer",
        "run_timeline": [0, 2],
        "superseded_steps": [[0, 10]],
        "effects": EFFECTS,
    },
    EntryKind.DETACH: {"rank": 1, "generation": 2},
    EntryKind.VITALS: {
        **SOURCE,
        "first_seq": 4,
        "num_records": 4,
        "num_gaps": 0,
        "num_dropped": 1,
        "max_step": 4,
        "timeline": 0,
        "records": {"encoding": "base64-le8", "step": "AQ=="},
        "train": {**TRAIN, "num_non_finite": 1},
        "decision": {"verdict": "panic", "command": COMMAND},
        "effects": EFFECTS,
    },
    EntryKind.REPORT: {**SOURCE, **DETAILS, "effects": EFFECTS},
    EntryKind.LATE: {**SOURCE, **DETAILS, "effects": EFFECTS},
    EntryKind.DUPLICATE: {**SOURCE, **DETAILS, "effects": EFFECTS},
    EntryKind.STALE: {
        "what": "validation_record",
        **SOURCE,
        "first_seq": 7,
        "timeline": 0,
        "current_timeline": 1,
        "resync": True,
        **DETAILS,
        "effects": EFFECTS,
    },
    EntryKind.SUPERSEDED: {"timeline": 0, "step": 30, "current_timeline": 1, "effects": EFFECTS},
    EntryKind.DECISION: {
        **SOURCE,
        "record": DETAILS,
        "seqs": {"0": 7},
        "decision": {"verdict": "healthy"},
        "effects": {},
    },
    EntryKind.COMMAND: {"cause": "decision", "command": COMMAND},
    EntryKind.COMMAND_RESULT: {
        **SOURCE,
        "command_id": 1,
        "succeeded": True,
        "new_timeline": 1,
        "restored_step": 20,
        "duration_ms": 12.5,
        "error": "",
        "num_culled_seeds": 0,
        "lr_after_restore": 0.01,
        "command_kind": "rollback",
        "notices": [{"kind": "punishment_charged", "reason": "executed", "command": None, "charged": -10.0}],
        "superseded_steps": [],
        "effects": EFFECTS,
    },
    EntryKind.COMMAND_TIMEOUT: {**NOTICE, "effects": EFFECTS},
    EntryKind.SNAPSHOT: {
        **SOURCE,
        "timeline": 0,
        "step": 20,
        "snapshot_bytes": 1024,
        "duration_ms": 3.0,
        "location": "/tmp/s",
        "digest": "",
        "detector_state": "pinned",
        "effects": EFFECTS,
    },
    EntryKind.SNAPSHOT_ADOPTED: {
        **SOURCE,
        "timeline": 1,
        "new_timeline": 2,
        "snapshot": {"timeline": 1, "step": 20, "digest": "abc"},
        "duration_ms": 4.0,
        "run_timeline": 2,
        "superseded_steps": [],
        "effects": EFFECTS,
    },
    EntryKind.FINISH: {
        **SOURCE,
        "status": "FINISH_STATUS_COMPLETED",
        "epochs_completed": 3,
        "num_rollbacks": 1,
        "message": "",
        "duration_s": 60.0,
        "notices": [NOTICE],
        "final_validation_loss": "inf",
        "final_validation_accuracy": 0.75,
        "effects": EFFECTS,
    },
    EntryKind.RANK_DEADLINE: {"step": 30, "timeline": 0, "missing_ranks": [1], "rank_deadline_s": 5.0},
    EntryKind.STALL: {
        "rank": 1,
        "latest_step": 30,
        "latest_timeline": 0,
        "seconds_without_progress": 61.5,
        "threshold_s": 60.0,
        "end_process": False,
        "effects": EFFECTS,
    },
    EntryKind.STALL_CLEARED: {"rank": 1, "timeline": 0, "step": 31, "effects": EFFECTS},
    EntryKind.CONTROLLER_REQUEST: {
        "action": "rollback",
        "reason": "by hand",
        "caller": "ops",
        "command": COMMAND,
        "effects": EFFECTS,
    },
    EntryKind.POLICY_CHANGE: {
        "caller": "ops",
        "changes": {"sensitivity": 4.0},
        "before": {"sensitivity": 6.0},
        "effective_policy": {"sensitivity": 4.0},
        "effects": EFFECTS,
    },
    EntryKind.AUTH_FAILURE: {
        "code": "UNAUTHENTICATED",
        "window_s": 60.0,
        "not_journaled_before": 3,
        "method": "/x/Attach",
        "peer": "ipv4:1.2.3.4:5",
        "reason": "no token",
    },
}


def _same(written: dict[str, Any], payload: dict[str, Any]) -> None:
    """The same keys in the same order, the same values of the same JSON types."""
    assert json.dumps(written) == json.dumps(payload)


def test_every_kind_has_a_record_and_a_sample() -> None:
    assert set(RECORDS) == set(EntryKind) == set(SAMPLES)
    assert all(cls.KIND is kind for kind, cls in RECORDS.items())


@pytest.mark.parametrize("kind", list(EntryKind))
def test_a_payload_reads_and_writes_back_key_for_key(kind: EntryKind) -> None:
    record = record_of(kind, SAMPLES[kind])
    assert type(record) is RECORDS[kind]
    assert not record.extra
    _same(record.to_payload(), SAMPLES[kind])
    assert type(record).from_payload(record.to_payload()) == record


def test_conditional_keys_stay_absent() -> None:
    shed = {**SOURCE, "first_seq": 1, "num_records": 0, "num_gaps": 0, "num_dropped": 0, "max_step": 9}
    shed |= {"timeline": 0, "num_shed": 4, "effects": EFFECTS}
    record = Vitals.from_payload(shed)
    assert (record.num_shed, record.train, record.records, record.decision) == (4, None, None, None)
    _same(record.to_payload(), shed)
    finish = {k: v for k, v in SAMPLES[EntryKind.FINISH].items() if not k.startswith("final_")}
    assert Finish.from_payload(finish).final_validation_loss is None
    _same(Finish.from_payload(finish).to_payload(), finish)


def test_a_stale_batch_has_no_validation_record_and_a_stale_record_has_one() -> None:
    batch = {"what": "vitals_batch", **SOURCE, "first_seq": 4, "timeline": 0, "current_timeline": 1}
    batch |= {"resync": False, "num_records": 4, "effects": EFFECTS}
    assert Stale.from_payload(batch).record is None
    _same(Stale.from_payload(batch).to_payload(), batch)
    stale = Stale.from_payload(SAMPLES[EntryKind.STALE])
    assert stale.record == ValidationDetails.from_payload(DETAILS)
    assert stale.record.loss == "nan"


def test_nested_parts_are_typed() -> None:
    finish = Finish.from_payload(SAMPLES[EntryKind.FINISH])
    assert finish.notices == (Notice(kind="command_failed", reason="restore failed", command=COMMAND),)


def test_unknown_keys_and_the_journals_more_are_kept() -> None:
    payload = {"rank": 0, "generation": 1, "from_the_future": [1], "more": 2}
    record = record_of("detach", payload)
    assert (record.more, dict(record.extra)) == (2, {"from_the_future": [1]})
    _same(record.to_payload(), payload)


def test_a_missing_key_or_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError, match="generation"):
        record_of("detach", {"rank": 0})
    with pytest.raises(ValueError, match="no_such_kind"):
        record_of("no_such_kind", {})


def test_every_entry_of_the_old_journal_reads_and_writes_back() -> None:
    lines = FIXTURE.read_text().splitlines()
    assert len(lines) == 61
    for line in lines:
        entry = json.loads(line)
        record = record_of(entry["kind"], entry["payload"])
        assert not record.extra, (entry["kind"], record.extra)
        # The file's keys are sorted (canonical JSON); the record writes them in the daemon's order.
        assert record.to_payload() == entry["payload"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_entry_the_core_writes_reads_and_writes_back(seed: int) -> None:
    world = World(seed)
    for action in draw_schedule(seed, 120):
        world.apply(action)
    world.settle()
    for entry in world.entries:
        record = record_of(entry.kind, entry.payload)
        assert not record.extra, (entry.kind, record.extra)
        assert record.to_payload() == entry.payload


def test_a_watched_event_reads_its_record() -> None:
    command = {**COMMAND, "punishment_reward": -10.0, "recovery_skip_batches": 0, "recovery_lr_scale": 1.0}
    payload = {**SAMPLES[EntryKind.FINISH], "notices": [{**NOTICE, "command": command}]}
    response = control_service_pb2.WatchEventsResponse(
        cursor=5,
        ts="2026-12-07T00:00:00.000000Z",
        run_id="r",
        kind="finish",
        hash="h",
        payload_json=json.dumps(payload),
    )
    event = event_from_proto(response, "localhost:1")
    assert isinstance(event, RunFinished)
    assert (event.status, event.final_validation_loss, event.notices[0].command.step) == ("COMPLETED", math.inf, 20)
    assert event.record == Finish.from_payload(payload)
