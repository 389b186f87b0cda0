"""Snapshots in shared memory (tolaria_trainer/shm.py): the manifest, adoption by a new LastKnownGood,
refusals (tampered bytes, another digest, another model), locks and the clean-up of gone runs. Real files
under /dev/shm (a directory of its own per test), real training on the synthetic task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.unit.trainer.helpers import assert_bitwise_equal, make_state, snapshot_of, train_one_epoch
from tolaria_trainer.shm import AdoptionRefused, ShmStore, ShmUnavailable, evict_orphans, set_prefix
from tolaria_trainer.snapshot import LastKnownGood

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/dev/shm") / f"tolaria-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _published(shm: Path, run: str = "run-a") -> tuple[LastKnownGood, dict[str, object], tuple[int, int, str]]:
    """A LKG in shared memory whose newest published snapshot is of a trained state; what it holds."""
    state = make_state()
    lkg = LastKnownGood("host", store=ShmStore(run, 0, shm))
    lkg.take(state)
    train_one_epoch(state)
    info = lkg.stage(state)
    assert lkg.publish(info.timeline, info.step)
    expected = snapshot_of(state)
    return lkg, expected, (info.timeline, info.step, lkg.digest_of(info))


def test_manifest_names_the_newest_published_snapshot(shm: Path) -> None:
    lkg, _, (timeline, step, digest) = _published(shm)
    manifest = json.loads((shm / f"{set_prefix('run-a', 0)}.manifest.json").read_text())
    assert (manifest["timeline"], manifest["step"], manifest["digest"]) == (timeline, step, digest)
    assert digest.startswith("sha256:")
    assert step > 0
    assert (shm / manifest["segment"]).stat().st_size == manifest["segment_bytes"]
    names = [t["name"] for t in manifest["tensors"]]
    assert any(n.startswith("model/") for n in names)
    assert any(n.startswith("optimizer0/") for n in names)
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in shm.iterdir())
    lkg.close(remove=True)
    assert list(shm.iterdir()) == []


def test_a_new_process_adopts_the_snapshot_bit_for_bit(shm: Path) -> None:
    lkg, expected, vouched = _published(shm)
    lkg.close(remove=False)  # the process "dies": its lock goes, the set stays
    fresh = make_state(seed=7)  # another process: other weights, no optimizer state yet
    train_one_epoch(fresh)
    again = LastKnownGood("host", store=ShmStore("run-a", 0, shm))
    info = again.adopt(fresh, vouched)
    assert info.step == vouched[1]
    assert_bitwise_equal(snapshot_of(fresh), expected)
    base = again.take(fresh)  # the restored state becomes the new base, in shared memory again
    manifest = json.loads((shm / f"{set_prefix('run-a', 0)}.manifest.json").read_text())
    assert manifest["step"] == vouched[1]
    assert manifest["digest"] == again.digest_of(base)
    again.close(remove=True)
    assert list(shm.iterdir()) == []


def test_a_tampered_segment_is_refused_and_nothing_changes(shm: Path) -> None:
    lkg, _, vouched = _published(shm)
    lkg.close(remove=False)
    manifest = json.loads((shm / f"{set_prefix('run-a', 0)}.manifest.json").read_text())
    with open(shm / manifest["segment"], "r+b") as handle:
        handle.seek(manifest["tensors"][0]["offset"] + 3)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))
    fresh = make_state(seed=7)
    before = snapshot_of(fresh)
    with pytest.raises(AdoptionRefused, match="do not match its digest"):
        LastKnownGood("host", store=ShmStore("run-a", 0, shm)).adopt(fresh, vouched)
    assert_bitwise_equal(snapshot_of(fresh), before)


def test_refused_when_the_governor_vouches_for_another_snapshot(shm: Path) -> None:
    lkg, _, (timeline, step, _) = _published(shm)
    lkg.close(remove=False)
    again = LastKnownGood("host", store=ShmStore("run-a", 0, shm))
    with pytest.raises(AdoptionRefused, match="not the one the governor journaled"):
        again.adopt(make_state(), (timeline, step, "sha256:" + "0" * 64))
    with pytest.raises(AdoptionRefused, match="names no published snapshot"):
        again.adopt(make_state(), None)


def test_refused_for_another_model(shm: Path) -> None:
    lkg, _, vouched = _published(shm)
    lkg.close(remove=False)
    state = make_state()
    state.model.add_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(AdoptionRefused, match="other model tensors"):
        LastKnownGood("host", store=ShmStore("run-a", 0, shm)).adopt(state, vouched)


def test_a_live_owner_keeps_its_set(shm: Path) -> None:
    lkg, _, _ = _published(shm)
    with pytest.raises(ShmUnavailable, match="held by another live process"):
        ShmStore("run-a", 0, shm)
    assert evict_orphans(shm, 0) == []  # live: never removed, whatever the budget
    lkg.close(remove=True)


def test_sets_of_gone_processes_are_removed_beyond_the_budget(shm: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from tests.unit.trainer.helpers import make_state;"
        "from tolaria_trainer.shm import ShmStore; from tolaria_trainer.snapshot import LastKnownGood;"
        "LastKnownGood('host', store=ShmStore(sys.argv[1], 0, Path(sys.argv[2]))).take(make_state())"
    )
    for run in ("gone-1", "gone-2"):  # processes that exit without removing their sets (as a crash would)
        subprocess.run([sys.executable, "-c", code, run, str(shm)], check=True, cwd=Path(__file__).parents[3])
    live, _, _ = _published(shm, "live")
    size = sum(p.stat().st_blocks * 512 for p in shm.iterdir() if p.name.startswith(set_prefix("gone-1", 0)))
    assert evict_orphans(shm, 10 * size) == []  # within the budget: kept for a restart to adopt
    assert evict_orphans(shm, size) == [set_prefix("gone-1", 0)]  # oldest first, until within it
    left = {p.name.split(".")[0] for p in shm.iterdir()}
    assert left == {set_prefix("gone-2", 0), set_prefix("live", 0)}
    live.close(remove=True)


def test_no_room_falls_back_to_process_memory(
    shm: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full /dev/shm (posix_fallocate: ENOSPC) is a warning naming the fix, and snapshots go on in memory."""

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    state = make_state()
    lkg = LastKnownGood("host", store=ShmStore("run-a", 0, shm))
    lkg.take(state)
    assert "no room" in caplog.text
    assert "--shm-size" in caplog.text
    assert lkg.store is None
    assert list(shm.iterdir()) == []
    expected = snapshot_of(state)
    train_one_epoch(state)
    lkg.restore(state)
    assert_bitwise_equal(snapshot_of(state), expected)
