"""One host copy of an offloaded stage per host (parallel/host_share.py), with processes of their own.

- four processes that open the same key: one writes, three wait and map it; the file-backed memory of
  the four together (their proportional set size of the map) is one copy, and no file is left after them;
- a writer killed in the middle leaves its part and lock files; the next open removes them and writes anew;
- `settle` removes the name while the maps go on; a file of another size under the name is not used.
(The same with real msrun ranks of one stage: the offload cases of tests/test_parallel_msrun.py.)
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stepvideo_ms.parallel import host_share

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "host_share_worker.py")
MIB = 2 ** 20


def _start(tmp_path, key, nbytes, fill_s, name):
    env = dict(os.environ, STEPVIDEO_OFFLOAD_DIR=str(tmp_path / "maps"))
    return subprocess.Popen([sys.executable, WORKER, key, str(nbytes), str(fill_s), str(tmp_path / f"{name}.json"),
                             str(tmp_path / "go")], env=env)


def _ours(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(host_share.PREFIX))


def test_four_processes_hold_one_copy_and_leave_nothing(tmp_path):
    import json

    (tmp_path / "maps").mkdir()
    nbytes = 24 * MIB
    procs = [_start(tmp_path, "four", nbytes, 1.0, f"p{i}") for i in range(4)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all((tmp_path / f"p{i}.json.ready").exists() for i in range(4)):
            assert all(p.poll() is None for p in procs), "a worker ended early"
            time.sleep(0.05)
        (tmp_path / "go").write_text("")  # all four have read every page: each measures with the others mapped
        reports = []
        for i in range(4):
            path = tmp_path / f"p{i}.json"
            while time.time() < deadline and not path.exists():
                assert all(p.poll() in (None, 0) for p in procs), "a worker failed"
                time.sleep(0.05)
            reports.append(json.loads(path.read_text()))
        (tmp_path / "go.done").write_text("")
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    want = int((np.arange(nbytes) % 251).sum())
    assert [r["checksum"] for r in reports] == [want] * 4
    assert sum(r["created"] for r in reports) == 1  # one wrote it, three mapped it
    assert all(r["Rss"] >= 0.95 * nbytes for r in reports)  # each reads the whole copy
    together = sum(r["Pss"] for r in reports)
    assert 0.9 * nbytes <= together <= 1.1 * nbytes, f"four processes hold {together / nbytes:.2f} copies"
    assert _ours(tmp_path / "maps") == []  # the last one out removed the file


def test_a_writer_killed_midway_is_swept_by_the_next_open(tmp_path, monkeypatch):
    maps = tmp_path / "maps"
    maps.mkdir()
    proc = _start(tmp_path, "killed", MIB, 600.0, "k")  # sleeps inside its fill
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(f.endswith(".part") for f in _ours(maps)):
            time.sleep(0.05)
        left = _ours(maps)
        assert any(f.endswith(".part") for f in left) and any(f.endswith(".lock") for f in left), left
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    monkeypatch.setenv(host_share.ENV_DIR, str(maps))
    shared = host_share.open_shared("killed", MIB, lambda b: b.fill(3))
    assert shared.created and int(shared.array[5]) == 3
    assert _ours(maps) == [os.path.basename(shared.path)]  # the part and lock files are gone
    shared.close()
    assert _ours(maps) == []


def test_settle_removes_the_name_and_the_map_stays(tmp_path, monkeypatch):
    monkeypatch.setenv(host_share.ENV_DIR, str(tmp_path))
    first = host_share.open_shared("settle", 4096, lambda b: b.fill(9))
    second = host_share.open_shared("settle", 4096, lambda b: pytest.fail("the file exists: nothing to write"))
    assert first.created and not second.created
    first.settle()
    assert _ours(tmp_path) == []
    assert int(first.array.sum()) == int(second.array.sum()) == 9 * 4096
    with pytest.raises(ValueError):
        first.array[0] = 1  # read-only
    third = host_share.open_shared("settle", 4096, lambda b: b.fill(1))  # a new run after the name went
    assert third.created and int(third.array[0]) == 1 and int(first.array[0]) == 9
    for s in (first, second, third):
        s.close()
    assert _ours(tmp_path) == []


def test_a_file_of_another_size_under_the_name_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv(host_share.ENV_DIR, str(tmp_path))
    stale = tmp_path / f"{host_share.PREFIX}{os.getuid()}_sized.bin"
    stale.write_bytes(b"x" * 100)
    os.chmod(stale, 0o600)
    shared = host_share.open_shared("sized", 4096, lambda b: b.fill(2))
    assert shared.created and shared.nbytes == 4096 and int(shared.array[-1]) == 2
    shared.close()


def test_the_switch_is_checked(monkeypatch):
    monkeypatch.setenv(host_share.ENV_SHARE, "0")
    assert not host_share.sharing_enabled()
    monkeypatch.setenv(host_share.ENV_SHARE, "maybe")
    with pytest.raises(ValueError, match="STEPVIDEO_SHARE_HOST_BLOCKS"):
        host_share.sharing_enabled()


def test_a_full_folder_is_named_before_anything_is_written(tmp_path, monkeypatch):
    """/dev/full-like room: a folder whose file system has less room than the map gets an error naming
    STEPVIDEO_OFFLOAD_DIR (posix_fallocate's ENOSPC), and no part file is left."""
    import errno

    monkeypatch.setenv(host_share.ENV_DIR, str(tmp_path))

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(host_share.os, "posix_fallocate", no_room)
    with pytest.raises(OSError, match="no room for .* GiB of host blocks in .*STEPVIDEO_OFFLOAD_DIR"):
        host_share.open_shared("full", 4096, lambda b: pytest.fail("nothing is written without room"))
    assert _ours(tmp_path) == []
