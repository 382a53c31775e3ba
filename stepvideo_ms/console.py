"""A quiet console for our entry points, and the lines of third-party noise we hold back.

`quiet_environment` must run before MindSpore or transformers is imported (they read their log
level at import): MindSpore's C++ log goes to ERROR (GLOG_v=3) unless the user chose a level,
transformers' "None of PyTorch, TensorFlow >= 2.0, or Flax" advice is silenced, and Python warnings
keep Python's default (each shown once per place). `--verbose` (or a GLOG_v the user set) keeps everything.

`progress` is the progress bar of every long loop: tqdm's live bar on a terminal; plain lines at most
every LINE_INTERVAL_S seconds (and one at the end) when the output goes to a file or a pipe, so that
a log holds readable lines instead of carriage-return updates glued into one. STEPVIDEO_PROGRESS=bars
or =lines decides for processes whose own output is never a terminal (msrun's workers write to log
files that msrun shows on the user's terminal: the launcher sets it from its own output).

`NoiseFilter` drops, from msrun's console stream, the lines that say nothing to a user: the
launcher's "Start ... process ... Execute command" echo (the command is printed once by us) and
MindSpore's "[INFO] DISTRIBUTED ... Event base dispatch success!" lines, which its communication
layer prints whatever GLOG_v says.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from typing import Iterable, MutableMapping, Optional

QUIET_GLOG_LEVEL = "3"  # MindSpore: 0 debug, 1 info, 2 warning, 3 error
VERBOSE_FLAG = "--verbose"

NOISE_PATTERNS = (
    re.compile(r"^Start (scheduler|worker) process\b.*log file:"),  # msrun's echo (2.7's has no "Execute command")
    re.compile(r"^\[INFO\] \w+\(.*Event base dispatch success!"),  # DISTRIBUTED (2.8 on) or PS (2.7)
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


PROGRESS_ENV = "STEPVIDEO_PROGRESS"  # "bars" (live, carriage returns) or "lines" (plain lines)
LINE_INTERVAL_S = 10.0


def live_bars(stream=None) -> bool:
    """Whether progress shows as live bars: STEPVIDEO_PROGRESS if set, else whether `stream` is a terminal."""
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode in ("bars", "lines"):
        return mode == "bars"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None, unit: str = "it",
             disable: bool = False, leave: bool = True, file=None, **tqdm_options):
    """A tqdm bar on a terminal, a LineProgress elsewhere (same use: iterate, or update/close/with)."""
    if live_bars(file):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave, file=file,
                    **tqdm_options)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave, file=file,
                        unit_scale=tqdm_options.get("unit_scale", False),
                        unit_divisor=tqdm_options.get("unit_divisor", 1000))


class LineProgress:
    """Progress as plain lines: `desc: n/total unit (p%), elapsed`, at most every `interval` seconds, and
    a last line at the end (for a `leave=False` bar only if it lasted long enough to print one before)."""

    def __init__(self, iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None,
                 unit: str = "it", disable: bool = False, leave: bool = True, file=None, unit_scale: bool = False,
                 unit_divisor: int = 1000, interval: float = LINE_INTERVAL_S, clock=time.monotonic):
        self.iterable, self.desc, self.unit, self.disable, self.leave = iterable, desc, unit, disable, leave
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self.file, self.unit_scale, self.unit_divisor = file, unit_scale, unit_divisor
        self.interval, self.clock = interval, clock
        self.start = self.last = clock()
        self.printed = 0
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if not self.disable and now - self.last >= self.interval:
            self._line(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and (self.leave or self.printed):
            self._line(self.clock(), final=True)

    def _amount(self, n) -> str:
        if not self.unit_scale:
            return str(n)
        from tqdm import tqdm

        return tqdm.format_sizeof(n, divisor=self.unit_divisor)

    def _line(self, now: float, final: bool = False) -> None:
        from tqdm import tqdm

        if self.unit_scale:  # 1.50MB/3.00MB
            done = f"{self._amount(self.n)}{self.unit}" + (f"/{self._amount(self.total)}{self.unit}" if self.total else "")
        else:  # 2/5 steps
            count = self.total if self.total else self.n
            units = self.unit + ("s" if len(self.unit) > 1 and count != 1 else "")
            done = (f"{self.n}/{self.total}" if self.total else f"{self.n}") + f" {units}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total and not final else ""
        took = ("in " if final else "") + tqdm.format_interval(now - self.start)
        print(f"{self.desc}: {done}{share}, {took}", file=self.file if self.file is not None else sys.stderr,
              flush=True)
        self.last, self.printed = now, self.printed + 1


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
    """While a remote call runs, show that it runs: a live elapsed-time line (tqdm) on a terminal, else
    plain lines: its start, every LINE_INTERVAL_S seconds, its end.

        with Waiting("VAE server decoding", live=progress):
            frames = vae.vae_decode(latents)
    """

    REFRESH_S = 1.0

    def __init__(self, label: str, live: bool = True, stream=None, interval: float = LINE_INTERVAL_S):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.live = live and live_bars(self.stream)
        self.lines = live and not self.live  # progress wanted, but not on a terminal
        self.interval = interval
        self._bar = self._thread = None
        self._stop = None
        self._t0 = 0.0

    def __enter__(self):
        import threading

        self._t0 = time.perf_counter()
        if not self.live:
            print(f"[run_parallel] {self.label} ...", file=self.stream, flush=True)
            if self.lines:
                self._stop = threading.Event()

                def say():
                    while not self._stop.wait(self.interval):
                        print(f"[run_parallel] {self.label}: {time.perf_counter() - self._t0:.0f} s", file=self.stream,
                              flush=True)

                self._thread = threading.Thread(target=say, name="waiting-lines", daemon=True)
                self._thread.start()
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
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
        elif exc[0] is None:
            print(f"[run_parallel] {self.label}: done in {time.perf_counter() - self._t0:.1f} s",
                  file=self.stream, flush=True)
        return False


# ---- command lines: "did you mean" for a mistyped flag --------------------------------------------
def flag_suggestions(parser: argparse.ArgumentParser, unknown: Iterable[str]) -> list:
    """'--nme (did you mean --name?)' for each unknown flag close to one of `parser`'s (difflib, similarity
    0.75: a typo or a dash for an underscore, not any flag sharing a few letters), the others as they are. Python 3.11's argparse has no suggest_on_error."""
    known = [s for s in parser._option_string_actions if s.startswith("--")]
    out = []
    for token in unknown:
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
        out.append(f"{token} (did you mean {close[0]}?)" if close else token)
    return out


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose 'unrecognized arguments' error names the closest known flag."""

    UNRECOGNIZED = "unrecognized arguments: "

    def suggest(self, message: str) -> str:
        if not message.startswith(self.UNRECOGNIZED):
            return message
        return self.UNRECOGNIZED + " ".join(flag_suggestions(self, message[len(self.UNRECOGNIZED):].split()))

    def error(self, message):
        super().error(self.suggest(message))
