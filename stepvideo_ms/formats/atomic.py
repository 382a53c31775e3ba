"""Atomic file output: write to a hidden temporary file beside the destination, rename on success.

A failed or interrupted write leaves the destination as it was and no temporary file behind.
Temporary files are made with the usual permissions (0666 less the umask), as the final file has.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from typing import Iterator


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path_beside(dest: str) -> str:
    """Create an empty hidden temporary file next to `dest` (same file system, so the rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(dest))
    ext = os.path.splitext(dest)[1]  # kept last: writers such as ffmpeg choose the format by it
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(dest)}.{secrets.token_hex(6)}.partial{ext}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_output(dest: str, make_dirs: bool = True) -> Iterator[str]:
    """Yield a temporary path to write; it becomes `dest` when the block ends without an exception."""
    if make_dirs:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = temp_path_beside(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(dest: str, data: bytes) -> str:
    with atomic_output(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return dest


def write_json(dest: str, obj) -> str:
    return write_bytes(dest, json.dumps(obj, ensure_ascii=False, indent=2, default=str).encode("utf-8"))
