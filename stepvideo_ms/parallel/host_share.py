"""One host copy of a stage's offloaded blocks per host: the ranks of one host that run the same stage map one file.

Where the offloaded blocks are not pinned tensors (the CPU backend, and Ascend on a MindSpore without
`Tensor.pin_memory`: `capabilities.asynchronous_offload` says no), they live in a file-backed map. Ranks that
hold the same stage of the same checkpoint would each read and keep the same bytes; instead, the first of them
to arrive writes the file and every other one maps it read-only, so the host holds one copy (the page cache's)
however many ranks use it. Where they are pinned (Ascend with `Tensor.pin_memory`), every rank keeps its own:
MindSpore pins by allocating fresh page-locked memory in its own process (`Tensor.pin_memory`, its PinMemPool
over `aclrtMallocHost`, then a copy; the pool's `RegisterPinnedMem` only logs) and offers no call that
page-locks memory several processes map (CANN's `aclrtHostRegister` is not reachable from MindSpore).

The file is named by its content: the checkpoint files (path, size, modification time, inode), the stage's
layers, the block layout and its host dtypes (`content_key`), in `STEPVIDEO_OFFLOAD_DIR` (default: the
temporary directory), owned by this user, mode 0600. Locks (flock) order the arrivals and tell a file in use
from a left-over one:
- a rank that uses a file holds a shared lock on it for its lifetime;
- the writer writes `<name>.<random>.part` (holding a shared lock on it), then renames it to `<name>.bin`, all
  under an exclusive lock on `<name>.lock`, which the others wait on; a rank that finds `<name>.bin` maps it;
- `settle()`, once every rank of the world has loaded (a world agreement in generation/world.py), removes the
  name: the processes keep their maps and the memory goes with the last of them, as an unlinked temporary
  file's does, whatever way they end;
- a file that nobody holds a lock on (a run killed while loading) is removed by the next load (`sweep`), and
  by the last user at its exit when no agreement came.

`STEPVIDEO_SHARE_HOST_BLOCKS=0` gives every rank its own unlinked map again (for comparisons).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import mmap
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import numpy as np

PREFIX = "stepvideo_blocks_"
ENV_DIR = "STEPVIDEO_OFFLOAD_DIR"
ENV_SHARE = "STEPVIDEO_SHARE_HOST_BLOCKS"
FORMAT = "1"  # part of every key: a change of the map's layout makes new names


def folder() -> str:
    return os.environ.get(ENV_DIR) or tempfile.gettempdir()


def sharing_enabled() -> bool:
    value = os.environ.get(ENV_SHARE, "1").strip().lower()
    if value not in ("0", "1", "no", "yes", "false", "true", "off", "on"):
        raise ValueError(f"{ENV_SHARE}={value!r}: use 1 (ranks of one host share their stage's host blocks, the "
                         "default) or 0 (every rank its own copy)")
    return value in ("1", "yes", "true", "on")


def content_key(files: Iterable[str], parts: Iterable[object]) -> str:
    """A name for the bytes made from `files` (as they are on disk now) and `parts` (layers, layout, dtypes)."""
    h = hashlib.sha256(FORMAT.encode())
    for path in sorted(os.path.realpath(f) for f in files):
        st = os.stat(path)
        h.update(repr((path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)).encode())
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:24]


def _stem(key: str) -> str:
    return f"{PREFIX}{os.getuid()}_{key}"


def reserve(fd: int, nbytes: int, where: str) -> None:
    """Room for `nbytes` in the file now: a full disk raises here, not as a SIGBUS in the middle of a write."""
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # a file system that cannot reserve
            os.ftruncate(fd, max(nbytes, 1))
            return
        raise OSError(f"--offload: no room for {nbytes / 2 ** 30:.2f} GiB of host blocks in {where} ({exc.strerror}); "
                      f"free it or set {ENV_DIR} to a folder with room (a tmpfs keeps them in memory)") from None


def private_map(nbytes: int) -> np.memmap:
    """A writable byte map over an unlinked temporary file of this process alone (gone with it)."""
    fd, path = tempfile.mkstemp(prefix="stepvideo_offload_", suffix=".bin", dir=folder())
    try:
        reserve(fd, nbytes, os.path.dirname(path))
        return np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(nbytes, 1),))
    finally:
        os.close(fd)
        os.unlink(path)


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _try_exclusive(path: str) -> Optional[int]:
    """An fd with an exclusive lock on `path` when nobody holds a lock on it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep(where: Optional[str] = None) -> int:
    """Remove this user's block files (and their lock and part files) that no process holds: left by a run that
    was killed while it loaded. -> how many were removed."""
    removed = 0
    for path in glob.glob(os.path.join(where or folder(), f"{PREFIX}{os.getuid()}_*")):
        fd = _try_exclusive(path)
        if fd is None:
            continue
        try:
            if _same_file(fd, path):
                os.unlink(path)
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _release(fd: int, path: str) -> None:
    """At the end of a user: drop its lock; the last user of a still named file removes the name."""
    os.close(fd)
    last = _try_exclusive(path)
    if last is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(last)


@dataclass
class SharedBlockFile:
    """A read-only map of one stage's host blocks, shared by the ranks of this host that run the stage."""

    path: str
    array: np.ndarray  # uint8, read-only, over the file's map
    created: bool  # this process wrote it (the others waited and mapped it)
    fd: int

    def __post_init__(self):
        self._finalizer = weakref.finalize(self, _release, self.fd, self.path)

    @property
    def nbytes(self) -> int:
        return int(self.array.shape[0])

    def settle(self) -> None:
        """Every rank that shares the file has mapped it: remove its name (the maps stay)."""
        if _same_file(self.fd, self.path):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._finalizer()


def _open_existing(path: str, nbytes: int) -> Optional[int]:
    """A shared-locked fd on the finished file at `path`, or None (absent, not ours, or another size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    st = os.fstat(fd)
    if not _same_file(fd, path) or st.st_uid != os.getuid() or st.st_mode & 0o022 or st.st_size != max(nbytes, 1):
        os.close(fd)
        return None
    return fd


def _read_only_map(fd: int, nbytes: int) -> np.ndarray:
    """The file of `fd` mapped read-only through a descriptor of its own (the map keeps it open: were it `fd`,
    the lock on `fd` would last as long as the map, and the last user could never see itself last)."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        view = mmap.mmap(own, max(nbytes, 1), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(own)
    return np.frombuffer(view, dtype=np.uint8)


def _write(where: str, stem: str, nbytes: int, fill: Callable[[np.memmap], None]) -> int:
    """Write the file under a part name and rename it into place: -> a shared-locked fd on it."""
    fd, part = tempfile.mkstemp(prefix=stem + ".", suffix=".part", dir=where)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # in use: a sweep leaves it
        reserve(fd, nbytes, where)
        writable = np.memmap(part, dtype=np.uint8, mode="r+", shape=(max(nbytes, 1),))
        fill(writable)
        writable.flush()
        del writable
        os.rename(part, os.path.join(where, stem + ".bin"))
    except BaseException:
        os.close(fd)
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
    return fd


def open_shared(key: str, nbytes: int, fill: Callable[[np.memmap], None],
                where: Optional[str] = None) -> SharedBlockFile:
    """The shared map named by `key`, of `nbytes` bytes: mapped when another rank of this host wrote it (or is
    writing it: this waits), else written here by `fill(writable uint8 map)`."""
    where = where or folder()
    sweep(where)
    stem = _stem(key)
    path, lock_path = os.path.join(where, stem + ".bin"), os.path.join(where, stem + ".lock")
    while True:
        fd = _open_existing(path, nbytes)
        created = False
        if fd is None:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the writer holds it until the file is in place
                if not _same_file(lock, lock_path):  # removed while this waited: take the new one
                    continue
                fd = _open_existing(path, nbytes)
                if fd is None:
                    try:
                        fd, created = _write(where, stem, nbytes, fill), True
                    except BaseException:  # nothing half-written is left; a waiter tries for itself
                        if _same_file(lock, lock_path):
                            os.unlink(lock_path)
                        raise
                try:
                    os.unlink(lock_path)  # the waiters see it gone and find the file
                except FileNotFoundError:
                    pass
            finally:
                os.close(lock)
        return SharedBlockFile(path, _read_only_map(fd, nbytes), created, fd)


def mapped_memory(fragment: str, pid: str = "self") -> Dict[str, int]:
    """Resident ("Rss") and proportional ("Pss": each shared page divided by the processes that map it)
    bytes of the maps of `pid` whose file name contains `fragment` (Linux /proc/<pid>/smaps)."""
    out = {"Rss": 0, "Pss": 0}
    inside = False
    with open(f"/proc/{pid}/smaps", "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):  # a mapping's first line
                inside = fragment in line
            elif inside and head in ("Rss:", "Pss:"):
                out[head[:-1]] += int(line.split()[1]) * 1024
    return out
