"""Shared-memory buffers for same-host weight updates: one memcpy instead of two socket copies.

The one home of our shared-memory files: their layout (``layout``: 64-byte aligned offsets),
their names (``rlhf-engine-<owner pid>.<its pid namespace>-<kind>-<random>``, mode 0600,
``create_file``, ``owned_prefix``), their mapping (``map_file``) and the removal of those whose owner died
(``remove_stale_files``: only files of its own pid namespace, whose pids it can check; containers that share
``/dev/shm`` but not their pids never sweep each other's).
The trainer's weight buffers (kind ``weights``) live here; a relay leader's copies (kind ``relay``,
``relay.py``) and a vLLM generator's staging file (kind ``staging``, ``rollout/staging.py``) use the
same helpers.

The trainer writes a whole update into a file under ``shm_dir`` (tmpfs) that it created
and sends only a header over ZeroMQ.
A generator maps the same file and views the tensors in place (the trainer only ever
writes these buffers, so nothing a generator does to them reaches the trainer's model). Buffers are reused once every generator acknowledged,
so after the first update no page is faulted in again on either side.
"""

from __future__ import annotations

import mmap
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rlhf_engine.transport.wire import ALLOWED_DTYPES, TensorSpec, WireError

PREFIX = "rlhf-engine-"
ALIGN = 64


def layout(nbytes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets (each a multiple of ``ALIGN``) and total size for tensors of ``nbytes``."""
    offsets, pos = [], 0
    for n in nbytes:
        offsets.append(pos)
        pos += (n + ALIGN - 1) // ALIGN * ALIGN
    return offsets, max(pos, ALIGN)


def _pid_namespace() -> str:
    """This process's pid namespace (the inode of /proc/self/ns/pid; "0" where there is none)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def owned_prefix(kind: str) -> str:
    """``rlhf-engine-<pid>.<pid namespace>-<kind>-``: the start of the name of a file or folder this process
    owns in a shared-memory folder, which ``remove_stale_files`` removes once the process is gone."""
    return f"{PREFIX}{os.getpid()}.{_pid_namespace()}-{kind}-"


def create_file(directory: str, kind: str, size: int) -> str:
    """A new file of ``size`` bytes, mode 0600, named for this process (see ``remove_stale_files``). Its
    blocks are allocated now (``posix_fallocate``): a full tmpfs raises OSError here, where a sparse file
    would kill the writer with SIGBUS later."""
    path = os.path.join(directory, owned_prefix(kind) + secrets.token_hex(8))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


def map_file(path: str, size: int) -> torch.Tensor:
    """A uint8 tensor ``[size]`` over the whole file, shared and pre-faulted (MAP_POPULATE).

    Shared, not private copy-on-write: a private writable mapping would be populated with
    private copies of every page and stop seeing the trainer's later writes.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(mm, dtype=torch.uint8)  # keeps mm alive as long as any view lives


@dataclass(eq=False)
class Segment:
    path: str
    size: int
    buffer: torch.Tensor
    waiting_for: set[str] = field(default_factory=set)
    """Peers that still hold the update written here."""
    taken: int = 0
    """When ``acquire`` last handed it out (a count): the smallest is the oldest update."""

    def write(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
        for tensor, off in zip(tensors, offsets):
            flat = tensor.detach().contiguous().reshape(-1)  # [numel]
            n = flat.numel() * flat.element_size()
            if n:
                self.buffer[off:off + n].copy_(flat.view(torch.uint8))


    def views(self, specs: Sequence[TensorSpec], offsets: Sequence[int]) -> list[torch.Tensor]:
        """The tensors written at ``offsets``, as views of the buffer."""
        return [self.buffer[off:off + spec.nbytes].view(ALLOWED_DTYPES[spec.dtype]).view(spec.shape) if spec.nbytes
                else torch.empty(spec.shape, dtype=ALLOWED_DTYPES[spec.dtype]) for spec, off in zip(specs, offsets)]


def remove_stale_files(directory: str) -> list[str]:
    """Delete our files and folders (a vLLM generator's adapter folders) in ``directory`` whose owner process is
    gone (never those of a live one, nor those of another pid namespace: their pids mean nothing here)."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    namespace = _pid_namespace()
    for name in names:
        pid, _, owner_namespace = name[len(PREFIX):].split("-", 1)[0].partition(".")
        if not name.startswith(PREFIX) or not pid.isdigit() or owner_namespace != namespace:
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or pid reused): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(name)
        except OSError:
            pass  # not ours to delete
    return removed


class BuffersHeld(TimeoutError):
    """Every buffer is still held after the timeout; ``oldest_holders`` hold the oldest update."""

    def __init__(self, message: str, oldest_holders: set[str]) -> None:
        super().__init__(message)
        self.oldest_holders = oldest_holders


class ShmPool:
    """At most ``max_buffers`` segments (files of ``kind``); a busy one is reused once released. The trainer's
    weight buffers, and a relay leader's copies (``relay.py``).

    The segment of the newest update is *pinned* (``pin``): it stays readable for a generator that
    joins later (``hold``), and is written again only when no other segment can be had.
    """

    def __init__(self, directory: str, max_buffers: int, kind: str = "weights") -> None:
        self._dir = directory
        self._kind = kind
        self._max = max_buffers
        self._segments: list[Segment] = []
        self._pinned: Segment | None = None
        self._taken = 0
        self._cond = threading.Condition()

    def acquire(self, size: int, timeout_s: float, holders: set[str]) -> Segment:
        """A free segment of ``size`` bytes, marked as held by ``holders``: an unpinned one, else a new one,
        else the pinned one (then unpinned); waits for a release. ``BuffersHeld`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                seg = self._free(size)
                if seg is not None:
                    if seg is self._pinned:
                        self._pinned = None
                    self._taken += 1
                    seg.waiting_for, seg.taken = set(holders), self._taken
                    return seg
                left = deadline - time.monotonic()
                if left <= 0:
                    oldest = min(self._segments, key=lambda s: s.taken)
                    holders = sorted({p for s in self._segments for p in s.waiting_for})
                    raise BuffersHeld(f"all {self._max} shared-memory weight buffers are still held by {holders} "
                                      f"after {timeout_s} s: generators must ack() each WeightUpdate",
                                      set(oldest.waiting_for))
                self._cond.wait(left)

    def _free(self, size: int) -> Segment | None:
        """A segment ``acquire`` may hand out now (lock held), or None."""
        while True:
            idle = [s for s in self._segments if not s.waiting_for]
            fits = [s for s in idle if s.size == size]
            unpinned = [s for s in fits if s is not self._pinned]
            if unpinned:
                return unpinned[0]
            if len(self._segments) < self._max:
                seg = self._create(size)
                self._segments.append(seg)
                return seg
            if fits:
                return fits[0]
            if not idle:
                return None
            # wrong size (the model changed): replace it
            self._segments.remove(idle[0])
            if idle[0] is self._pinned:
                self._pinned = None
            os.unlink(idle[0].path)

    def _create(self, size: int) -> Segment:
        path = create_file(self._dir, self._kind, size)
        return Segment(path, size, map_file(path, size))

    def assign(self, segment: Segment, peers: set[str]) -> None:
        """Exactly ``peers`` (the generators live now, the update written) hold ``segment``: a holder lost
        while ``acquire`` waited was forgotten (``release``) before the segment named it, and would
        otherwise hold it forever; one that joined meanwhile gets this update too."""
        with self._cond:
            segment.waiting_for = set(peers)
            self._cond.notify_all()

    def pin(self, segment: Segment) -> None:
        """``segment`` holds the newest update (until ``acquire`` hands it out again)."""
        with self._cond:
            self._pinned = segment

    def hold(self, segment: Segment, peer: str) -> bool:
        """``peer`` holds ``segment`` if it is still pinned (its update is the newest and intact); else False."""
        with self._cond:
            if segment is not self._pinned:
                return False
            segment.waiting_for.add(peer)
            return True

    def release(self, peer: str, path: str | None = None) -> None:
        """``peer`` no longer holds the segment at ``path`` (or any segment, when None)."""
        with self._cond:
            for seg in self._segments:
                if path is None or seg.path == path:
                    seg.waiting_for.discard(peer)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            for seg in self._segments:
                try:
                    os.unlink(seg.path)
                except FileNotFoundError:
                    pass
            self._segments.clear()
            self._pinned = None


class ShmReader:
    """Generator side: validates a header's file and views its tensors; keeps mappings for reuse."""

    def __init__(self, directory: str, max_mappings: int) -> None:
        self._dir = os.path.realpath(directory)
        self._max = max_mappings
        self._maps: dict[str, torch.Tensor] = {}

    def view(self, path: str, size: int, specs: Sequence[TensorSpec], dtypes: Sequence[torch.dtype],
             offsets: Sequence[int]) -> list[torch.Tensor]:
        real = os.path.realpath(path)
        if os.path.dirname(real) != self._dir or not Path(real).name.startswith(PREFIX):
            raise WireError("bad_shm", f"path {path!r} is not an {PREFIX}* file in {self._dir}")
        if len(offsets) != len(specs):
            raise WireError("bad_shm", f"{len(offsets)} offsets for {len(specs)} tensors")
        end = 0
        for spec, off in sorted(zip(specs, offsets), key=lambda p: p[1]):
            if off % ALIGN or off < end or off + spec.nbytes > size:
                raise WireError("bad_shm", f"tensor {spec.name!r} at offset {off} (+{spec.nbytes}) in a {size}-byte file")
            end = off + spec.nbytes
        buf = self._maps.get(real)
        if buf is None or buf.numel() != size:
            try:
                st = os.stat(real)
            except OSError as e:
                raise WireError("bad_shm", f"cannot stat {real}: {e}") from None
            if st.st_size != size:
                raise WireError("bad_shm", f"{real} has {st.st_size} bytes, header says {size}")
            try:
                buf = map_file(real, size)
            except (OSError, ValueError) as e:
                raise WireError("bad_shm", f"cannot map {real}: {e}") from None
            self._maps[real] = buf
            while len(self._maps) > self._max:
                self._maps.pop(next(iter(self._maps)))
        return [buf[off:off + spec.nbytes].view(dtype).view(spec.shape) if spec.nbytes else
                torch.empty(spec.shape, dtype=dtype) for spec, dtype, off in zip(specs, dtypes, offsets)]

    def close(self) -> None:
        self._maps.clear()
