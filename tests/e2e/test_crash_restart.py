"""A crash costs seconds: `tolaria-train` killed with SIGKILL mid-run, restarted under the same run id, adopts
the last-known-good it left in /dev/shm (the one the governor journaled as published) and finishes governed; a
tampered segment is refused and the restart starts over. A real `governor serve`, real processes, real files.

The crash is made at a known quiet point: ``hang@epoch=N`` stops the trainer before epoch N (after the last
agreement point of epoch N-1), and the daemon's STALL entry for that step says it stopped there; no snapshot is
published while it hangs, so the journal's last ``snapshot`` entry is the trainer's last published one."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from governor_daemon.daemon_process import DaemonProcess
from tests.e2e.test_governed_training import trainer_cmd
from tolaria.controller import ControllerClient
from tolaria_trainer.shm import set_prefix

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")]

HANG_AT = 4  # the trainer stops before this epoch: by then the train stream vouched for an epoch's snapshot
EPOCHS = 5
DUO_HANG_AT = 4  # two ranks take half the steps per epoch: the train stream vouches for epoch 1 in epoch 3
AGREE = ("--agree-every-steps", "10")  # snapshots are published at agreement points, once vouched for


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "data")
    yield d
    if d.proc.poll() is None:
        d.terminate()


@pytest.fixture
def shm() -> Iterator[Path]:
    directory = Path("/dev/shm") / f"tolaria-e2e-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def _crash(daemon: DaemonProcess, tmp_path: Path, shm: Path, run_id: str) -> tuple[int, int, str]:
    """Start a trainer that hangs before epoch HANG_AT, wait (on the journal) until it is stuck there, SIGKILL
    it; returns the last published snapshot the governor journaled for rank 0 (timeline, step, digest)."""
    env = {**os.environ, "TOLARIA_SHM_DIR": str(shm)}
    cmd = trainer_cmd(
        daemon.address,
        tmp_path / f"{run_id}-crashed.json",
        "--epochs",
        str(EPOCHS),
        "--inject",
        f"hang@epoch={HANG_AT}:s=600",
        "--policy",
        "stall_timeout_s=2",
        *AGREE,
        run_id=run_id,
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[dict[str, Any]] = []
    hung_at = threading.Event()
    target: list[int] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            found = _events(line)
            lines.extend(found)
            for item in found:
                if item.get("event") == "epoch" and item.get("epoch") == HANG_AT - 1:
                    target.append(int(item["step"]))
                    hung_at.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    snapshots: list[tuple[int, int, str]] = []
    try:
        with ControllerClient(daemon.address) as client:
            stream = client.events(runs=[run_id], kinds=["snapshot", "stall"])

            def end_with_the_trainer() -> None:
                proc.wait()
                stream.close()

            threading.Thread(target=end_with_the_trainer, daemon=True).start()
            with stream:
                for event in stream:
                    payload = event.payload
                    if event.kind == "snapshot":
                        snapshots.append((int(payload["timeline"]), int(payload["step"]), str(payload["digest"])))
                    elif hung_at.is_set() and int(payload["latest_step"]) >= target[0]:
                        break  # stalled at the end of epoch HANG_AT - 1: hung, publishing nothing more
        assert proc.poll() is None, f"the trainer ended before its hang: {lines[-20:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    published = [e for e in lines if e.get("event") == "snapshot"]
    assert published, "the trainer published no snapshot with a digest"
    assert snapshots[-1] == (published[-1]["timeline"], published[-1]["step"], published[-1]["digest"])
    assert snapshots[-1][1] > 0, "only the initial snapshot was published before the crash"
    return snapshots[-1]


def _manifest(shm: Path, run_id: str) -> dict[str, Any]:
    return dict(json.loads((shm / f"{set_prefix(run_id, 0)}.manifest.json").read_text()))


def _weights_in_segment(shm: Path, manifest: dict[str, Any]) -> str:
    """SHA-256 of the model tensors in the segment (key and bytes, in the manifest's order), read here."""
    digest = hashlib.sha256()
    with open(shm / manifest["segment"], "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as data:
        for tensor in manifest["tensors"]:
            if not tensor["name"].startswith("model/"):
                continue
            itemsize = {"float32": 4, "int64": 8, "float64": 8, "float16": 2, "bfloat16": 2, "bool": 1}[tensor["dtype"]]
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            digest.update(tensor["name"].removeprefix("model/").encode())
            digest.update(data[tensor["offset"] : tensor["offset"] + count * itemsize])
    return digest.hexdigest()


def _restart(
    daemon: DaemonProcess, tmp_path: Path, shm: Path, run_id: str
) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    env = {**os.environ, "TOLARIA_SHM_DIR": str(shm)}
    summary = tmp_path / f"{run_id}-restarted.json"
    policy = ("--policy", "stall_timeout_s=2")  # a restart repeats the run's policy overrides (or is refused)
    cmd = trainer_cmd(daemon.address, summary, "--epochs", str(EPOCHS), *policy, *AGREE, run_id=run_id)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    return result.returncode, _events(result.stderr), json.loads(summary.read_text()) if summary.exists() else {}


def test_sigkilled_trainer_restarts_from_the_shared_memory_lkg(
    daemon: DaemonProcess, tmp_path: Path, shm: Path
) -> None:
    timeline, step, digest = _crash(daemon, tmp_path, shm, "crash-adopt")
    manifest = _manifest(shm, "crash-adopt")
    assert (manifest["timeline"], manifest["step"], manifest["digest"]) == (timeline, step, digest)
    weights = _weights_in_segment(shm, manifest)

    code, events, summary = _restart(daemon, tmp_path, shm, "crash-adopt")
    assert code == 0, events[-20:]
    adopted = [e for e in events if e.get("event") == "adopted"]
    assert len(adopted) == 1, events[-20:]
    assert adopted[0]["step"] == step  # the last snapshot the governor journaled as published
    assert adopted[0]["digest"] == digest
    assert adopted[0]["weights_sha256"] == weights  # bit-identical to the segment
    assert adopted[0]["timeline"] == timeline + 1  # a new timeline, as after a restore
    first_epoch = next(e for e in events if e.get("event") == "epoch")
    assert first_epoch["epoch"] == manifest["epoch"] + 1  # goes on from there, not from epoch 1
    with ControllerClient(daemon.address) as client:
        with client.events(runs=["crash-adopt"], kinds=["snapshot_adopted"]) as stream:
            entry = next(iter(stream)).payload  # journaled before the restart trained a step
        assert entry["snapshot"] == {"timeline": timeline, "step": step, "digest": digest}
        assert entry["run_timeline"] == timeline + 1
        assert client.panic_state("crash-adopt").timeline == timeline + 1
    assert summary["status"] == "completed"
    assert summary["governed"] is True
    assert summary["epochs_completed"] == EPOCHS
    assert list(shm.iterdir()) == []  # the run finished: its segment set is gone


def test_a_tampered_segment_is_refused_and_the_restart_starts_over(
    daemon: DaemonProcess, tmp_path: Path, shm: Path
) -> None:
    _crash(daemon, tmp_path, shm, "crash-tampered")
    manifest = _manifest(shm, "crash-tampered")
    with open(shm / manifest["segment"], "r+b") as handle:  # one bit of the first weight tensor
        handle.seek(manifest["tensors"][0]["offset"])
        byte = handle.read(1)
        handle.seek(manifest["tensors"][0]["offset"])
        handle.write(bytes([byte[0] ^ 0x01]))

    code, events, summary = _restart(daemon, tmp_path, shm, "crash-tampered")
    assert code == 0, events[-20:]
    assert not [e for e in events if e.get("event") == "adopted"]
    refused = [e for e in events if e.get("event") == "adoption_refused"]
    assert len(refused) == 1
    assert "do not match its digest" in refused[0]["reason"]
    first_epoch = next(e for e in events if e.get("event") == "epoch")
    assert first_epoch["epoch"] == 1  # started over
    assert summary["status"] == "completed"
    assert summary["governed"] is True
    assert list(shm.iterdir()) == []


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a child of ``parent`` whose environment says RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _torchrun_cmd(daemon: DaemonProcess, tmp_path: Path, run_id: str, *args: str) -> list[str]:
    """``trainer_cmd`` for two ranks under ``torchrun --max-restarts 1`` (summaries ``duo-{rank}.json``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    inner = trainer_cmd(
        daemon.address, tmp_path / "duo-{rank}.json", "--epochs", str(EPOCHS), *AGREE, *args, run_id=run_id
    )
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1", f"--master_port={master_port}"]
    return [inner[0], *launcher, *inner[1:]]


def test_one_rank_of_two_killed_under_torchrun_both_adopt_the_same_step(
    daemon: DaemonProcess, tmp_path: Path, shm: Path
) -> None:
    """torchrun --max-restarts 1, two ranks; rank 1 hangs before epoch DUO_HANG_AT (rank 0 waits for it at the next
    agreement point, so neither publishes anything more) and is killed with SIGKILL. torchrun restarts both; each
    adopts its own segment, both the same step, whose digest is the one the governor journaled for it."""
    run_id = "duo-crash"
    cmd = _torchrun_cmd(
        daemon,
        tmp_path,
        run_id,
        "--inject",
        f"hang@epoch={DUO_HANG_AT}:s=45:rank=1",  # the restarted rank 1 hangs again for 45 s, then goes on
        "--policy",
        "stall_timeout_s=2",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOLARIA_SHM_DIR": str(shm)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[dict[str, Any]] = []
    raw: list[str] = []
    target: list[int] = []
    epoch_before = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            raw.append(line)
            for item in _events(line):
                lines.append(item)
                if item.get("event") == "epoch" and item.get("epoch") == DUO_HANG_AT - 1 and not target:
                    target.append(int(item["step"]))
                    epoch_before.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    snapshots: dict[int, list[tuple[int, int, str]]] = {0: [], 1: []}
    with ControllerClient(daemon.address) as client:
        stream = client.events(runs=[run_id], kinds=["snapshot", "stall"])

        def end_with_the_trainer() -> None:
            proc.wait()
            stream.close()

        threading.Thread(target=end_with_the_trainer, daemon=True).start()
        with stream:
            for event in stream:
                payload = event.payload
                if event.kind == "snapshot":
                    found = (int(payload["timeline"]), int(payload["step"]), str(payload["digest"]))
                    snapshots[int(payload["rank"])].append(found)
                elif epoch_before.is_set() and payload["rank"] == 1 and int(payload["latest_step"]) >= target[0]:
                    break  # rank 1 hangs at the end of epoch DUO_HANG_AT - 1; rank 0 waits for it
    assert proc.poll() is None, f"torchrun ended before the hang: {lines[-20:]}"
    rank1 = _worker_pid(proc.pid, 1)
    assert rank1 is not None, "rank 1's worker process not found"
    os.kill(rank1, signal.SIGKILL)
    last = {rank: snapshots[rank][-1] for rank in (0, 1)}
    assert last[0][1] == last[1][1] > 0  # the ranks publish together

    try:
        proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(timeout=10)
        pytest.fail("the restarted ranks did not finish: " + "".join(raw[-60:]))
    reader.join(timeout=60)
    assert proc.returncode == 0, "".join(raw[-60:])
    adopted = [e for e in lines if e.get("event") == "adopted"]
    assert len(adopted) == 2, "".join(raw)
    assert {e["step"] for e in adopted} == {last[0][1]}
    assert {e["digest"] for e in adopted} == {last[0][2], last[1][2]}  # each rank's own, as journaled
    assert adopted[0]["weights_sha256"] == adopted[1]["weights_sha256"]
    assert {e["timeline"] for e in adopted} == {last[0][0] + 1}  # both go on on one new timeline
    moved = [e.payload["run_timeline"] for e in _history(daemon.address, run_id, ["snapshot_adopted"])]
    assert moved == [last[0][0] + 1] * 2, moved  # the first rank moved the run; its peer followed
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"duo-{rank}.json").read_text())
        assert summary["status"] == "completed"
        assert summary["governed"] is True
    assert list(shm.iterdir()) == []


def _history(address: str, run_id: str, kinds: list[str]) -> list[Any]:
    """The run's journal entries of ``kinds`` so far (up to its last cursor, read before)."""
    with ControllerClient(address) as client:
        last = client.panic_state(run_id).last_cursor
        out = []
        with client.events(runs=[run_id]) as stream:
            for event in stream:
                if event.kind in kinds:
                    out.append(event)
                if event.cursor >= last:
                    break
    return out


def test_a_hung_trainer_is_ended_by_the_stall_watchdog_and_its_restart_adopts_the_lkg(
    daemon: DaemonProcess, tmp_path: Path, shm: Path
) -> None:
    """Policy end_stalled_ranks: a trainer hung before epoch HANG_AT (for 10 minutes) is marked STALLED, told
    so with StreamEnd.end_process, and ends itself with exit 10 (its hung training thread never returns); the
    STALL entry says so. Restarted as a launcher would, it adopts the last-known-good it left in /dev/shm and
    the run completes governed: a hang costs a restart, not the run."""
    env = {**os.environ, "TOLARIA_SHM_DIR": str(shm)}
    run_id = "hang-watchdog"
    # The threshold is a few seconds so the test is short; on a loaded machine a healthy rank's steps come
    # well within it (the default is 300 s).
    policy = ("--policy", "stall_timeout_s=5", "--policy", "end_stalled_ranks=true")
    hung = trainer_cmd(
        daemon.address,
        tmp_path / "hung.json",
        "--epochs",
        str(EPOCHS),
        "--inject",
        f"hang@epoch={HANG_AT}:s=600",
        *policy,
        *AGREE,
        run_id=run_id,
    )
    first = subprocess.run(hung, capture_output=True, text=True, env=env, check=False)
    events = _events(first.stderr)
    assert first.returncode == 10, first.stderr[-3000:]  # ExitCode.STALLED
    watchdog = [e for e in events if str(e.get("event", "")).startswith("the governor's stall watchdog")]
    assert len(watchdog) == 1, events[-10:]
    assert "made no progress" in watchdog[0]["reason"]
    published = [e for e in events if e.get("event") == "snapshot"]
    assert published
    assert published[-1]["step"] > 0
    stalls = _history(daemon.address, run_id, ["stall"])
    assert len(stalls) == 1
    assert stalls[0].payload["end_process"] is True
    assert int(stalls[0].payload["latest_step"]) >= published[-1]["step"]

    summary = tmp_path / "restarted.json"
    cmd = trainer_cmd(daemon.address, summary, "--epochs", str(EPOCHS), *policy, *AGREE, run_id=run_id)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    adopted = [e for e in _events(second.stderr) if e.get("event") == "adopted"]
    assert len(adopted) == 1, second.stderr[-4000:]
    assert (adopted[0]["step"], adopted[0]["digest"]) == (published[-1]["step"], published[-1]["digest"])
    report = json.loads(summary.read_text())
    assert (report["status"], report["governed"], report["epochs_completed"]) == ("completed", True, EPOCHS)
    assert list(shm.iterdir()) == []


def test_a_hung_rank_under_torchrun_is_ended_by_the_watchdog_and_both_ranks_adopt(
    daemon: DaemonProcess, tmp_path: Path, shm: Path
) -> None:
    """Two ranks under ``torchrun --max-restarts 1`` with the watchdog on: rank 1 hangs before epoch DUO_HANG_AT in
    the first attempt only (a transient hang). Rank 0 waits for it at the next collective, so both stop making
    progress; the governor ends the STALLED rank(s) (exit 10), torchrun restarts both, and each adopts its own
    segment, both the same step; the run completes governed. Nothing here kills a process but the watchdog."""
    run_id = "duo-hang"
    cmd = _torchrun_cmd(
        daemon,
        tmp_path,
        run_id,
        "--inject",
        f"hang@epoch={DUO_HANG_AT}:s=600:rank=1:attempt=0",
        "--policy",
        "stall_timeout_s=5",
        "--policy",
        "end_stalled_ranks=true",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOLARIA_SHM_DIR": str(shm)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    events = _events(done.stderr)
    ended = [e for e in events if str(e.get("event", "")).startswith("the governor's stall watchdog")]
    assert ended, "no rank was ended by the watchdog"
    assert all(e["exit_code"] == 10 for e in ended)
    adopted = [e for e in events if e.get("event") == "adopted"]
    assert len(adopted) == 2, done.stderr[-4000:]
    assert len({e["step"] for e in adopted}) == 1
    assert adopted[0]["weights_sha256"] == adopted[1]["weights_sha256"]
    stalls = _history(daemon.address, run_id, ["stall"])
    assert any(s.payload["rank"] == 1 and s.payload["end_process"] for s in stalls), [s.payload for s in stalls]
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"duo-{rank}.json").read_text())
        assert (summary["status"], summary["governed"], summary["epochs_completed"]) == ("completed", True, EPOCHS)
    assert list(shm.iterdir()) == []
