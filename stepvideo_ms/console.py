"""A quiet console for our entry points, and the lines of third-party noise we hold back.

`quiet_environment` must run before MindSpore or transformers is imported (they read their log
level at import): MindSpore's C++ log goes to ERROR (GLOG_v=3) unless the user chose a level,
transformers' "None of PyTorch, TensorFlow >= 2.0, or Flax" advice is silenced, and Python warnings
keep Python's default (each shown once per place). `--verbose` (or a GLOG_v the user set) keeps everything.

`NoiseFilter` drops, from msrun's console stream, the lines that say nothing to a user: the
launcher's "Start ... process ... Execute command" echo (the command is printed once by us) and
MindSpore's "[INFO] DISTRIBUTED ... Event base dispatch success!" lines, which its communication
layer prints whatever GLOG_v says.
"""
from __future__ import annotations

import os
import re
import sys
from typing import MutableMapping, Optional

QUIET_GLOG_LEVEL = "3"  # MindSpore: 0 debug, 1 info, 2 warning, 3 error
VERBOSE_FLAG = "--verbose"

NOISE_PATTERNS = (
    re.compile(r"^Start (scheduler|worker) process.*Execute command:"),
    re.compile(r"^\[INFO\] DISTRIBUTED\(.*Event base dispatch success!"),
)


def quiet_environment(verbose: bool, env: Optional[MutableMapping[str, str]] = None) -> MutableMapping[str, str]:
    """Set the log levels of MindSpore and transformers in `env` (default: this process's environment)."""
    env = os.environ if env is None else env
    if not verbose:
        env.setdefault("GLOG_v", QUIET_GLOG_LEVEL)
        env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def quiet_process(argv=None) -> bool:
    """For an entry point, before its heavy imports: quiet unless `--verbose` is among its arguments."""
    verbose = VERBOSE_FLAG in (sys.argv[1:] if argv is None else argv)
    quiet_environment(verbose)
    return verbose


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE_PATTERNS)


class NoiseFilter:
    """Pass a byte stream through, dropping whole noise lines; progress-bar updates (\\r) pass at once."""

    def __init__(self, out, enabled: bool = True):
        self.out = out
        self.enabled = enabled
        self.pending = b""

    def feed(self, data: bytes) -> None:
        if not self.enabled:
            self._write(data)
            return
        self.pending += data
        while True:
            cut = min((i for i in (self.pending.find(b"\n"), self.pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            segment, self.pending = self.pending[:cut + 1], self.pending[cut + 1:]
            if not is_noise(segment.decode("utf-8", errors="replace")):
                self._write(segment)

    def close(self) -> None:
        if self.pending and not (self.enabled and is_noise(self.pending.decode("utf-8", errors="replace"))):
            self._write(self.pending)
        self.pending = b""

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()


class Waiting:
    """While a remote call runs, show that it runs: a live elapsed-time line (tqdm), or two plain lines.

        with Waiting("VAE server decoding", live=progress):
            frames = vae.vae_decode(latents)
    """

    REFRESH_S = 1.0

    def __init__(self, label: str, live: bool = True, stream=None):
        self.label, self.live = label, live
        self.stream = stream if stream is not None else sys.stderr
        self._bar = self._thread = None
        self._stop = None
        self._t0 = 0.0

    def __enter__(self):
        import threading
        import time

        self._t0 = time.perf_counter()
        if not self.live:
            print(f"[run_parallel] {self.label} ...", file=self.stream, flush=True)
            return self
        from tqdm import tqdm

        self._bar = tqdm(total=None, desc=self.label, bar_format="{desc}: {elapsed}", file=self.stream)
        self._stop = threading.Event()

        def tick():
            while not self._stop.wait(self.REFRESH_S):
                self._bar.refresh()

        self._thread = threading.Thread(target=tick, name="waiting-indicator", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import time

        if self._bar is not None:
            self._stop.set()
            self._thread.join()
            self._bar.close()
        elif exc[0] is None:
            print(f"[run_parallel] {self.label}: done in {time.perf_counter() - self._t0:.1f} s",
                  file=self.stream, flush=True)
        return False
