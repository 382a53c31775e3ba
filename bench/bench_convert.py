"""Throughput and peak memory of convert.py on a large PyTorch .bin (zip format), written without torch.

    .venv/bin/python bench/bench_convert.py [--size_mib 1152] [--workdir /tmp] [--keep]

Builds a state dict of float32 and bfloat16 tensors (32 MiB each, plus a few small ones) with
stepvideo_ms.formats.torch_bin_writer.save_bin, then runs `python convert.py` on it in a child process and
reads the child's peak RSS (VmHWM in /proc). For scale, in the same run it also times a plain
`cp` + `sync` of the file and the peak RSS of a child that only imports the converter. The input
was just written (and flushed), so it is read from the page cache (warm). Temporary files are removed at the end
unless --keep is given.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stepvideo_ms.formats.torch_bin_writer import save_bin  # noqa: E402

TENSOR_MIB = 32


class _Generated(Mapping):
    """name -> array made on demand from a per-tensor seed (the writer reads each twice)."""

    def __init__(self, size_mib: int):
        count = max(1, size_mib // TENSOR_MIB)
        self._specs = {"small.scale": ("f32", (1024,)), "small.ids": ("i64", (4096,))}
        for i in range(count):
            kind = "bf16" if i % 4 == 3 else "f32"
            n = TENSOR_MIB * 2**20 // (2 if kind == "bf16" else 4)
            self._specs[f"blocks.{i}.weight"] = (kind, (n // 1024, 1024))

    def __getitem__(self, name):
        kind, shape = self._specs[name]
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if kind == "bf16":
            return rng.integers(0, 2**16, size=shape, dtype=np.uint16)
        if kind == "i64":
            return rng.integers(0, 2**40, size=shape, dtype=np.int64)
        return rng.random(size=shape, dtype=np.float32)

    def __iter__(self):
        return iter(self._specs)

    def __len__(self):
        return len(self._specs)

    def bf16_names(self):
        return {name: "bfloat16" for name, (kind, _) in self._specs.items() if kind == "bf16"}


_MEASURED = """
import runpy, sys, time
sys.argv = sys.argv[1:]
start = time.perf_counter()
try:
    if sys.argv[0] == "-c":
        exec(sys.argv[1])
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
seconds = time.perf_counter() - start
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"@@measured {seconds} {peak}", file=sys.stderr)
"""


def run_measured(argv):
    """(seconds inside the child, peak RSS in MiB) of a Python child running `argv` (a script or -c code).

    The peak is VmHWM from /proc, read by the child itself at its end: it covers only this
    process image (getrusage of a child would also count the parent's memory at fork).
    """
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *argv], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(l for l in proc.stderr.splitlines() if l.startswith("@@measured"))
    _, seconds, peak_kib = line.split()
    return float(seconds), int(peak_kib) / 1024


def run_timed(argv):
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mib", type=int, default=1152, help="approximate size of the .bin (default 1152 MiB)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where to put the temporary files")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir)
    try:
        src = os.path.join(work, "pytorch_model.bin")
        tensors = _Generated(args.size_mib)
        start = time.perf_counter()
        save_bin(src, tensors, dtypes=tensors.bf16_names())
        with open(src, "rb") as fh:  # flush it now, so that neither measurement pays for its write-back
            os.fsync(fh.fileno())
        size = os.path.getsize(src)
        print(f"built {src}: {size / 2**20:.0f} MiB, {len(tensors)} tensors, in {time.perf_counter() - start:.1f} s")

        out = os.path.join(work, "model.safetensors")
        secs, rss = run_measured(["convert.py", "--pt_filename", src, "--sf_filename", out, "--no_progress"])
        _, base_rss = run_measured(["-c", "import stepvideo_ms.formats.bin_convert"])
        copy_secs = run_timed(["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, os.path.join(work, "copy.bin")])
        mib = size / 2**20
        print(f"convert.py : {secs:6.2f} s  {mib / secs:7.1f} MiB/s (read, write, fsync, re-read and verify)  "
              f"peak RSS {rss:6.1f} MiB")
        print(f"import only:                              peak RSS {base_rss:6.1f} MiB  "
              f"-> the conversion of {mib:.0f} MiB adds {rss - base_rss:.1f} MiB")
        print(f"cp + sync  : {copy_secs:6.2f} s  {mib / copy_secs:7.1f} MiB/s  -> convert.py takes {secs / copy_secs:.2f}x "
              "a plain copy of the file")
        print(f"output     : {os.path.getsize(out) / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores (timings are noisy on a shared machine)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
