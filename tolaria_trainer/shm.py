"""Snapshot buffers in named shared memory: a last-known-good that outlives the trainer process.

One **segment set** per (run, rank), in a directory of the node's shared memory (``/dev/shm``, or
``TOLARIA_SHM_DIR``). Its files, all named ``tolaria-<run>-r<rank>.*`` and created mode 0600:

- ``.lock``: held with ``flock`` for as long as the owning process lives (the kernel drops it when the
  process dies, ``kill -9`` included). A set whose lock nobody holds belongs to a process that is gone.
- ``.<slot>.<token>.seg``: one file per snapshot buffer set (``LastKnownGood`` keeps several: published
  and staged ones), preallocated with ``posix_fallocate`` (a full tmpfs is an error here, never a SIGBUS
  later), memory-mapped, and viewed as tensors (``torch.frombuffer``): staging copies straight into it.
- ``.manifest.json``: the newest published snapshot, written atomically (temporary file, fsync, rename)
  after its copy completed: run, rank, timeline, step, epoch, the segment it lives in, every tensor's
  name, offset, shape and dtype, the small state by value (RNG states, schedulers, scaler, optimizer
  hyper-parameters, ``extra_state``: a pickle), and a digest over all of it (``digest_segment``).

Lifecycle: created when the first snapshot is allocated; the manifest follows the newest published
snapshot; the set is removed when the run finishes (COMPLETED or HALTED). A process that dies leaves it
for its restart to adopt (``LastKnownGood.adopt``). Sets of processes that are gone are removed, oldest
first, when together they exceed a budget (``TOLARIA_SHM_ORPHAN_BUDGET`` bytes, default a quarter of
the shared-memory file system); a set whose lock is held is never touched.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tolaria_trainer.errors import SnapshotError

DEFAULT_DIR = Path("/dev/shm")
FORMAT = 1
ALIGN = 64  # bytes: every tensor starts on a cache line (and any dtype's alignment)
CHUNK = 32 << 20  # bytes hashed per task: the digest is a tree over chunks, hashed in parallel
_NAME_RE = re.compile(
    r"^(?P<prefix>tolaria-.+-r\d+)\.(?:lock|manifest\.json(?:\.tmp\.[0-9a-f]+)?|\d+\.[0-9a-f]+\.seg)$"
)
_RUN_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_executor: ThreadPoolExecutor | None = None


class ShmUnavailable(SnapshotError):
    """Shared memory cannot hold this rank's snapshots (no directory, no room, another live owner)."""


class AdoptionRefused(SnapshotError):
    """A segment left by an earlier process may not be adopted; the message says why."""


def shm_dir() -> Path:
    """Where segment sets live: ``TOLARIA_SHM_DIR`` or /dev/shm."""
    return Path(os.environ.get("TOLARIA_SHM_DIR") or DEFAULT_DIR)


def set_prefix(run_id: str, rank: int) -> str:
    """The file-name prefix of a (run, rank)'s segment set; a run id that is not a plain name is hashed."""
    name = run_id if _RUN_RE.match(run_id) else "h" + hashlib.sha256(run_id.encode()).hexdigest()[:32]
    return f"tolaria-{name}-r{int(rank)}"


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="shm-hash")
    return _executor


def _sha(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()  # releases the GIL: the chunks are hashed in parallel


def digest_segment(header: bytes, data: memoryview | bytes) -> str:
    """``sha256:<hex>`` over ``header`` (the manifest's description of the snapshot and its pickled small
    state) and the segment's bytes, as a tree: SHA-256 of each ``CHUNK`` (hashed in parallel threads),
    then SHA-256 of the header and the chunk digests. SHA-256 runs at about 2 GB/s per core where the CPU
    has SHA extensions (tests/benchmarks/bench_crash_restart.py reports the cost per snapshot)."""
    view = memoryview(data).cast("B")
    chunks = [view[i : i + CHUNK] for i in range(0, len(view), CHUNK)]
    parts = list(_pool().map(_sha, chunks)) if len(chunks) > 1 else [_sha(c) for c in chunks]
    top = hashlib.sha256()
    top.update(len(header).to_bytes(8, "little"))
    top.update(header)
    for part in parts:
        top.update(part)
    return "sha256:" + top.hexdigest()


@dataclass
class Segment:
    """One mapped segment file: a snapshot buffer set's tensors."""

    path: Path
    mapping: mmap.mmap
    size: int
    offsets: list[int]
    registered: bool = False  # cudaHostRegister'ed (pinned location)

    def view(self) -> memoryview:
        return memoryview(self.mapping)[: self.size]


def _layout(specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> tuple[list[int], int]:
    offsets, size = [], 0
    for shape, dtype in specs:
        offsets.append(size)
        nbytes = _numel(shape) * _itemsize(dtype)
        size += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    return offsets, max(size, ALIGN)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_views(
    mapping: mmap.mmap, size: int, offsets: list[int], specs: Sequence[tuple[Sequence[int], torch.dtype]]
) -> list[torch.Tensor]:
    """Tensors of ``specs`` (shape, dtype) viewing ``mapping`` at ``offsets``."""
    base = torch.frombuffer(mapping, dtype=torch.uint8, count=size)
    out = []
    for offset, (shape, dtype) in zip(offsets, specs, strict=True):
        nbytes = _numel(shape) * _itemsize(dtype)
        out.append(base[offset : offset + nbytes].view(dtype).view(tuple(shape)))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise AdoptionRefused(f"unknown dtype {name!r} in the manifest")
    return value


def _cuda_register(segment: Segment) -> None:
    """Page-lock a mapping for the CUDA copy engines (``pinned``): cudaHostRegister, as pinned memory."""
    if segment.registered or not torch.cuda.is_available():
        return
    ptr = torch.frombuffer(segment.mapping, dtype=torch.uint8, count=segment.size).data_ptr()
    code = torch.cuda.cudart().cudaHostRegister(ptr, segment.size, 0)  # type: ignore[no-untyped-call]
    if int(code) != 0:
        raise ShmUnavailable(f"cudaHostRegister of {segment.path.name} ({segment.size} bytes) failed: error {code}")
    segment.registered = True


def _cuda_unregister(segment: Segment) -> None:
    if segment.registered:
        ptr = torch.frombuffer(segment.mapping, dtype=torch.uint8, count=segment.size).data_ptr()
        torch.cuda.cudart().cudaHostUnregister(ptr)  # type: ignore[no-untyped-call]
        segment.registered = False


class ShmStore:
    """A (run, rank)'s segment set, owned by this process while it lives (the lock).

    Opening it takes the lock (ShmUnavailable if a live process holds it), reads the manifest an earlier
    process left (``previous``), removes that process's other segment files, and cleans up the sets of
    processes that are gone, beyond the budget."""

    def __init__(
        self, run_id: str, rank: int, directory: Path | None = None, orphan_budget_bytes: int | None = None
    ) -> None:
        self.run_id, self.rank = run_id, rank
        self.dir = Path(directory) if directory is not None else shm_dir()
        self.prefix = set_prefix(run_id, rank)
        if not self.dir.is_dir():
            raise ShmUnavailable(f"no shared-memory directory {self.dir}")
        self.lock_path = self.dir / f"{self.prefix}.lock"
        self.manifest_path = self.dir / f"{self.prefix}.manifest.json"
        lock_fd = _take_lock(self.lock_path)
        if lock_fd is None:
            raise ShmUnavailable(f"{self.lock_path} is held by another live process (run {run_id}, rank {rank})")
        self._lock_fd: int = lock_fd
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()} {time.time():.3f}\n".encode())
        self.segments: dict[int, Segment] = {}
        self.previous: dict[str, Any] | None = None
        self.previous_error = ""
        try:
            self.previous = read_manifest(self.manifest_path)
        except AdoptionRefused as exc:
            self.previous_error = str(exc)
        keep = {str(self.previous["segment"])} if self.previous else set()
        for path in self._own_files():
            if path.name not in keep and path not in (self.lock_path, self.manifest_path):
                _unlink(path)
        budget = orphan_budget_bytes if orphan_budget_bytes is not None else default_orphan_budget(self.dir)
        self.evicted = evict_orphans(self.dir, budget)
        self.closed = False

    def _own_files(self) -> list[Path]:
        out = []
        for path in self.dir.iterdir():
            match = _NAME_RE.match(path.name)
            if match and match.group("prefix") == self.prefix:
                out.append(path)
        return out

    # ----------------------------------------------------------------- buffers

    def allocate(
        self, slot: int, specs: Sequence[tuple[Sequence[int], torch.dtype]], pinned: bool
    ) -> list[torch.Tensor]:
        """A new segment for buffer set ``slot`` holding tensors of ``specs`` (shape, dtype); the slot's old
        segment file is removed (its mapping lives on while tensors still view it)."""
        offsets, size = _layout(specs)
        path = self.dir / f"{self.prefix}.{slot}.{secrets.token_hex(6)}.seg"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ShmUnavailable(f"cannot create {path}: {exc.strerror or exc}") from exc
        try:
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            _unlink(path)
            room = "no room: give /dev/shm more (docker --shm-size, an emptyDir with medium Memory)"
            why = room if exc.errno in (errno.ENOSPC, errno.EFBIG) else exc.strerror or str(exc)
            raise ShmUnavailable(f"shared memory for a {size}-byte snapshot buffer ({path}): {why}") from exc
        os.close(fd)
        segment = Segment(path, mapping, size, offsets)
        if pinned:
            try:
                _cuda_register(segment)
            except ShmUnavailable:
                _unlink(path)
                raise
        self.release(slot)
        self.segments[slot] = segment
        return tensor_views(mapping, size, offsets, specs)

    def attach(self, slot: int, segment: Segment, pinned: bool) -> None:
        """Make an adopted segment the buffers of ``slot``."""
        if pinned:
            _cuda_register(segment)
        self.release(slot)
        self.segments[slot] = segment

    def release(self, slot: int) -> None:
        """Forget a slot's segment and remove its file (the mapping stays valid while viewed)."""
        old = self.segments.pop(slot, None)
        if old is not None:
            _cuda_unregister(old)
            _unlink(old.path)

    def digest(self, slot: int, header: bytes) -> str:
        return digest_segment(header, self.segments[slot].view())

    # ----------------------------------------------------------------- the manifest

    def write_manifest(self, slot: int, manifest: dict[str, Any]) -> None:
        """Name ``slot``'s segment as the newest published snapshot: atomically (tmp, fsync, rename)."""
        segment = self.segments[slot]
        body = {
            **manifest,
            "format": FORMAT,
            "run_id": self.run_id,
            "rank": self.rank,
            "segment": segment.path.name,
            "segment_bytes": segment.size,
            "pid": os.getpid(),
            "written_at": time.time(),
        }
        tmp = self.dir / f"{self.prefix}.manifest.json.tmp.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(body).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.manifest_path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def open_previous(self) -> Segment:
        """Map the segment the previous process's manifest names (read-write: it becomes a buffer set)."""
        assert self.previous is not None
        path = self.dir / str(self.previous["segment"])
        size = int(self.previous["segment_bytes"])
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise AdoptionRefused(f"segment {path.name} named by the manifest: {exc.strerror or exc}") from exc
        try:
            info = os.fstat(fd)
            _check_owned(path, info)
            if info.st_size != size:
                raise AdoptionRefused(f"segment {path.name} holds {info.st_size} bytes, the manifest says {size}")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        offsets = [int(t["offset"]) for t in self.previous["tensors"]]
        return Segment(path, mapping, size, offsets)

    # ----------------------------------------------------------------- lifecycle

    def remove(self) -> None:
        """The run finished: remove every file of the set and give up the lock."""
        if self.closed:
            return
        self.closed = True
        for slot in list(self.segments):
            self.release(slot)
        for path in self._own_files():
            if path != self.lock_path:
                _unlink(path)
        _unlink(self.lock_path)
        os.close(self._lock_fd)

    def detach(self) -> None:
        """This process is done with the set but it stays for a restart to adopt: give up the lock only."""
        if not self.closed:
            self.closed = True
            os.close(self._lock_fd)


def _take_lock(path: Path, tries: int = 5) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)  # a cleaner holding it for a moment
    os.close(fd)
    return None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _check_owned(path: Path, info: os.stat_result) -> None:
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise AdoptionRefused(f"{path.name} is not owned by this user with mode 0600: not adopted")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` (None if there is none); AdoptionRefused if it is unreadable or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        _check_owned(path, os.fstat(fd))
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError) as exc:
        raise AdoptionRefused(f"manifest {path.name} is unreadable: {exc}") from exc
    finally:
        os.close(fd)
    required = ("format", "run_id", "rank", "timeline", "step", "segment", "segment_bytes", "tensors", "objects")
    if not isinstance(data, dict) or any(k not in data for k in (*required, "digest")):
        raise AdoptionRefused(f"manifest {path.name} is missing fields")
    if data["format"] != FORMAT:
        raise AdoptionRefused(f"manifest {path.name} has format {data['format']}, this trainer reads {FORMAT}")
    if not _NAME_RE.match(str(data["segment"])) or "/" in str(data["segment"]):
        raise AdoptionRefused(f"manifest {path.name} names a bad segment {data['segment']!r}")
    return data


def manifest_header(manifest: dict[str, Any]) -> bytes:
    """What the digest covers besides the segment's bytes: the snapshot's identity, its tensor table and
    its pickled small state (canonical JSON)."""
    keys = ("run_id", "rank", "timeline", "step", "epoch", "kind", "tensors", "objects", "segment_bytes")
    return json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True, separators=(",", ":")).encode()


def encode_objects(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_objects(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


# --------------------------------------------------------------------- cleanup


def default_orphan_budget(directory: Path) -> int:
    """``TOLARIA_SHM_ORPHAN_BUDGET`` bytes, or a quarter of the file system holding ``directory``."""
    text = os.environ.get("TOLARIA_SHM_ORPHAN_BUDGET")
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            raise ShmUnavailable(f"TOLARIA_SHM_ORPHAN_BUDGET must be a number of bytes, got {text!r}") from None
    fs = os.statvfs(directory)
    return fs.f_blocks * fs.f_frsize // 4


def evict_orphans(directory: Path, budget_bytes: int) -> list[str]:
    """Remove the segment sets of processes that are gone (nobody holds their lock), oldest first, until
    the ones left take at most ``budget_bytes``; returns the prefixes removed. A set whose lock is held
    (a live process) is never touched; a set is removed while holding its lock."""
    groups: dict[str, list[Path]] = {}
    for path in directory.iterdir():
        match = _NAME_RE.match(path.name)
        if match:
            groups.setdefault(match.group("prefix"), []).append(path)
    orphans: list[tuple[float, str, int]] = []
    for prefix, paths in groups.items():
        lock = directory / f"{prefix}.lock"
        fd = _take_lock(lock, tries=1) if lock.exists() else None
        if lock.exists() and fd is None:
            continue  # live
        if fd is not None:
            os.close(fd)
        sizes, newest = 0, 0.0
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                sizes += info.st_blocks * 512
                newest = max(newest, info.st_mtime)
        orphans.append((newest, prefix, sizes))
    total = sum(size for _, _, size in orphans)
    removed = []
    for _, prefix, size in sorted(orphans):
        if total <= budget_bytes:
            break
        lock = directory / f"{prefix}.lock"
        fd = _take_lock(lock, tries=1)
        if fd is None:
            continue  # came alive meanwhile
        try:
            for path in groups[prefix]:
                if path != lock:
                    _unlink(path)
            _unlink(lock)
        finally:
            os.close(fd)
        total -= size
        removed.append(prefix)
    return removed
