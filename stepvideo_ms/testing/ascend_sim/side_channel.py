"""The wire of the simulated HCCL: files in a run directory shared by the workers of one msrun job.

Every message has exactly one sender and one reader: the sender writes it atomically under a name
that says who sends to whom in which call, the reader waits for it, loads it and deletes it. A
message carries one array (float32 for bfloat16 data, which travels exactly) and a small JSON
header that the reader checks against its own call (same operation, same parameters).
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Dict, Iterable, Optional, Tuple

import numpy as np


POLL_FIRST, POLL_MAX = 0.0005, 0.01  # seconds between looks for a message: doubling up to POLL_MAX


def write_bytes(dest: str, data: bytes) -> None:
    """Publish a message whole: written beside its name, then renamed (a reader never sees half of it)."""
    folder, name = os.path.split(dest)
    os.makedirs(folder, exist_ok=True)  # a rank leaving first may have removed the emptied run directory
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, dest)


class DeadlockError(RuntimeError):
    """A simulated collective or transfer waited past its timeout for peers that never arrived."""


def pack(data: Optional[np.ndarray], header: dict) -> bytes:
    buf = io.BytesIO()
    arrays = {"header": np.array(json.dumps(header, sort_keys=True))}
    if data is not None:
        arrays["data"] = np.ascontiguousarray(data)
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(blob: bytes) -> Tuple[Optional[np.ndarray], dict]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        data = z["data"] if "data" in z.files else None
    return data, header


class Channel:
    """Messages between the ranks of one job, in `run_dir`."""

    def __init__(self, run_dir: str, rank: int):
        self.run_dir, self.rank = run_dir, rank

    def path(self, key: str, src: int, dst: int) -> str:
        return os.path.join(self.run_dir, f"{key}.{src}-{dst}.npz")

    def post(self, key: str, dst: int, data: Optional[np.ndarray], header: dict) -> None:
        target = self.path(key, self.rank, dst)
        if os.path.exists(target):
            raise RuntimeError(f"simulated HCCL: message {os.path.basename(target)} is still unread: "
                               "two calls used the same key (call numbers out of step)")
        write_bytes(target, pack(data, header))

    def collect(self, key: str, sources: Iterable[int], what: str,
                timeout: float) -> Dict[int, Tuple[Optional[np.ndarray], dict]]:
        """Wait for the message of every rank in `sources` under `key`; DeadlockError names the missing ones."""
        pending = {src: self.path(key, src, self.rank) for src in sources}
        got: Dict[int, Tuple[Optional[np.ndarray], dict]] = {}
        deadline, pause = time.monotonic() + timeout, POLL_FIRST
        while pending:
            for src, path in list(pending.items()):
                if os.path.exists(path):
                    with open(path, "rb") as fh:
                        got[src] = unpack(fh.read())
                    os.remove(path)
                    del pending[src]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise DeadlockError(f"{what}: rank {self.rank} waited {timeout:g} s; rank(s) {sorted(pending)} "
                                    f"never arrived (dead-lock: they are not making the matching call)")
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX)
        return got
