"""Streams, events, pinned host memory and asynchronous host-to-device copies, emulated with the device's rules.

On the CPU backend `mindspore.runtime.Event()` raises, `current_stream()` is None, `StreamCtx` fails and
`Tensor.pin_memory()` needs the Ascend plugin. The simulation replaces them with emulators bound to the real
MindSpore 2.10 signatures (Stream(priority=0, **kwargs) with record_event / wait_event / wait_stream /
synchronize / query, Event(enable_timing=False, blocking=False) with record / wait / synchronize / query,
StreamCtx(ctx_stream), current_stream(), default_stream(), Tensor.pin_memory / is_pinned, Tensor.copy_(src,
non_blocking=False)), and plays the copies the way a device orders them:

- `dst.copy_(src, non_blocking=True)` from pinned host memory, issued on a stream, has NOT landed when the call
  returns: `dst` keeps its old values and is marked in flight on that stream;
- `event.record(stream)` captures the copies issued on `stream` so far; once some stream waits on that event
  (`stream.wait_event(e)`, `e.wait(stream)`), or the host waits (`e.synchronize()`, `stream.synchronize()`,
  `mindspore.runtime.synchronize()`), the captured copies land;
- a Cell called while one of its parameters is still in flight reads memory the copy has not filled: an error
  (RuntimeError naming the parameter), as on the device it would be silently wrong;
- the other half: a non-blocking copy issued on one stream into a parameter that a Cell used on another
  stream, when the copying stream has not waited on an event recorded on the using stream after that use
  (nor the host synchronized), overwrites memory the use may still read: refused (RuntimeError naming the
  parameter and the missing wait_event);
- stricter than the device: a non-blocking copy from host memory that is not pinned is refused (on a device it
  silently becomes a synchronous copy and the overlap is lost).
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, List, Optional, Set, Tuple

import mindspore as ms
from mindspore import Tensor, nn

from .patching import replace

_lock = threading.Lock()
_inflight: Dict[int, "_Copy"] = {}  # id(dst) -> its copy not yet landed
_targets: Set[int] = set()  # id of every tensor a non-blocking copy was issued into: their uses are tracked
# id(target) -> (a weak reference to it, the stream of its last use by a Cell, that use's number)
_last_use: Dict[int, Tuple[weakref.ref, "Stream", int]] = {}
_local = threading.local()


class _Copy:
    def __init__(self, dst: Tensor, src: Tensor, stream: "Stream", real_copy):
        self.dst, self.src, self.stream, self.real_copy = dst, src, stream, real_copy

    def land(self) -> None:
        with _lock:
            if _inflight.get(id(self.dst)) is not self:
                return
            del _inflight[id(self.dst)]
        self.real_copy(self.dst, self.src)


def _check_stream(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if not isinstance(value, Stream):
        raise TypeError(f"For '{name}', 'stream' must be a mindspore.runtime.Stream or None, got {type(value).__name__}")


class Stream:
    """Emulated `mindspore.runtime.Stream(priority=0, **kwargs)`."""

    _count = 0

    def __init__(self, priority: int = 0, **kwargs):
        if not isinstance(priority, int):
            raise TypeError(f"For 'Stream', 'priority' must be an int, got {type(priority).__name__}")
        Stream._count += 1
        self.id = Stream._count
        self.priority = priority
        self.issued: List[_Copy] = []  # copies issued on this stream, not yet landed
        self.uses = 0  # Cells run on this stream so far (a use's number)
        self.seen: Dict[int, int] = {}  # another stream's id -> how many of its uses this stream has waited for

    def __repr__(self) -> str:
        return f"Stream(simulated, stream id:{self.id})"

    def record_event(self, event=None):
        if event is not None and not isinstance(event, Event):
            raise TypeError(f"For 'record_event', 'event' must be a mindspore.runtime.Event or None, got "
                            f"{type(event).__name__}")
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"For 'wait_event', 'event' must be a mindspore.runtime.Event, got {type(event).__name__}")
        if event.uses is not None:
            other, count = event.uses
            self.seen[other.id] = max(self.seen.get(other.id, 0), count)
        event._land()

    def wait_stream(self, stream) -> None:
        _check_stream("wait_stream", stream, allow_none=False)
        self.wait_event(stream.record_event())

    def synchronize(self) -> None:
        for copy in list(self.issued):
            copy.land()
        self.issued.clear()
        _host_waited(self, self.uses)

    def query(self) -> bool:
        return True


_DEFAULT = Stream()


class Event:
    """Emulated `mindspore.runtime.Event(enable_timing=False, blocking=False)`."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False):
        if not isinstance(enable_timing, bool) or not isinstance(blocking, bool):
            raise TypeError("For 'Event', 'enable_timing' and 'blocking' must be bool")
        self.captured: List[_Copy] = []
        self.recorded = False
        self.uses: Optional[Tuple[Stream, int]] = None  # (stream, its uses so far) when recorded

    def record(self, stream=None) -> None:
        _check_stream("record", stream)
        stream = stream if stream is not None else current_stream()
        self.captured = list(stream.issued)
        self.recorded = True
        self.uses = (stream, stream.uses)

    def wait(self, stream=None) -> None:
        _check_stream("wait", stream)
        (stream if stream is not None else current_stream()).wait_event(self)

    def synchronize(self) -> None:
        if self.uses is not None:
            _host_waited(*self.uses)
        self._land()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        raise NotImplementedError("the simulation does not time events")

    def _land(self) -> None:
        for copy in self.captured:
            copy.land()
            if copy in copy.stream.issued:
                copy.stream.issued.remove(copy)
        self.captured = []


def _host_waited(stream: Stream, count: int) -> None:
    """The host waited for `stream`'s first `count` uses: they are over for every stream."""
    with _lock:
        for key, (_, used_on, number) in list(_last_use.items()):
            if used_on is stream and number <= count:
                del _last_use[key]


def current_stream() -> Stream:
    return getattr(_local, "stream", None) or _DEFAULT


def default_stream() -> Stream:
    return _DEFAULT


class StreamCtx:
    """Emulated `mindspore.runtime.StreamCtx(ctx_stream)`: a no-op for None."""

    def __init__(self, ctx_stream):
        _check_stream("StreamCtx", ctx_stream)
        self.stream = ctx_stream
        self._before: Optional[Stream] = None

    def __enter__(self):
        self._before = getattr(_local, "stream", None)
        if self.stream is not None:
            _local.stream = self.stream
        return self.stream

    def __exit__(self, *exc):
        _local.stream = self._before
        return False


def synchronize_all() -> None:
    """What `mindspore.runtime.synchronize()` waits for: every copy lands."""
    with _lock:
        pending = list(_inflight.values())
    for copy in pending:
        copy.land()
        if copy in copy.stream.issued:
            copy.stream.issued.remove(copy)
    with _lock:
        _last_use.clear()


def inflight_names() -> List[str]:
    with _lock:
        return [getattr(c.dst, "name", "?") for c in _inflight.values()]


# ---- Tensor methods ----------------------------------------------------------------------------

def _pin_memory_emulator(real):
    def pin_memory(self):
        out = self.copy()  # a host copy
        out._sim_pinned = True
        return out
    return pin_memory


def _is_pinned_emulator(real):
    def is_pinned(self):
        return bool(getattr(self, "_sim_pinned", False))
    return is_pinned


def _copy_emulator(real):
    """Tensor.copy_(src, non_blocking=False) -> Tensor (the docstring's signature; the builtin has none)."""

    def real_copy(dst, src):
        real(dst, src)

    def copy_(self, *args, **kwargs):
        names = ("src", "non_blocking")
        if len(args) > 2 or set(kwargs) - set(names) or any(n in kwargs for n in names[:len(args)]):
            raise TypeError(f"copy_(src, non_blocking=False): got {len(args)} positional and {sorted(kwargs)}")
        bound = dict(zip(names, args), **kwargs)
        if "src" not in bound:
            raise TypeError("copy_(src, non_blocking=False): missing 'src'")
        src, non_blocking = bound["src"], bound.get("non_blocking", False)
        if not isinstance(src, Tensor):
            raise TypeError(f"For 'copy_', 'src' must be a Tensor, got {type(src).__name__}")
        host = bool(getattr(src, "_sim_pinned", False))
        if host and (tuple(src.shape) != tuple(self.shape) or src.dtype != self.dtype):
            raise ValueError(f"For 'copy_', a host-to-device copy needs the same shape and dtype: src "
                             f"{tuple(src.shape)} {src.dtype}, self {tuple(self.shape)} {self.dtype}")
        stream = current_stream()
        if not non_blocking or stream is _DEFAULT:
            real(self, src)
            return self
        if not host:
            raise RuntimeError("ascend-sim: copy_(non_blocking=True) from host memory that is not pinned: the device "
                               "would copy synchronously (no overlap); pin the host tensor (Tensor.pin_memory())")
        with _lock:
            used = _last_use.get(id(self))
        used = used[1:] if used is not None and used[0]() is self else None  # an id reused by a new tensor: no use
        if used is not None and used[0] is not stream and stream.seen.get(used[0].id, 0) < used[1]:
            raise RuntimeError(
                f"ascend-sim: copy_(non_blocking=True) on {stream} into {getattr(self, 'name', 'a tensor')}, which a "
                f"Cell used on {used[0]} (use {used[1]}) that this stream has not waited for: the copy may overwrite "
                "it while that use still reads it; record an event on the using stream after the use and "
                "wait_event on it in the copying stream first")
        copy = _Copy(self, src, stream, real_copy)
        with _lock:
            _inflight[id(self)] = copy
            _targets.add(id(self))
        stream.issued.append(copy)
        return self
    return copy_


def _cell_call_emulator(real):
    def __call__(self, *args, **kwargs):
        if _inflight:
            with _lock:
                busy = {k: c for k, c in _inflight.items()}
            for name, param in self.parameters_and_names():
                if id(param) in busy:
                    raise RuntimeError(
                        f"ascend-sim: {type(self).__name__} ran while its parameter {name} ({param.name}) was still "
                        f"being copied from host memory on {busy[id(param)].stream}: wait on the copy's event on the "
                        "computing stream first (Stream.wait_event / Event.wait)")
        if _targets:  # a use of a copy target: a later copy into it must wait for it
            stream = current_stream()
            stream.uses += 1
            with _lock:
                for _, param in self.parameters_and_names():
                    if id(param) in _targets:
                        _last_use[id(param)] = (weakref.ref(param), stream, stream.uses)
        return real(self, *args, **kwargs)
    return __call__


def install() -> None:
    r = ms.runtime
    replace(r, "Stream", lambda real: Stream)
    replace(r, "Event", lambda real: Event)
    replace(r, "StreamCtx", lambda real: StreamCtx)
    replace(r, "current_stream", lambda real: current_stream)
    replace(r, "default_stream", lambda real: default_stream)
    # Tensor.pin_memory / is_pinned are missing in MindSpore 2.7.0: there they stay missing, and the
    # product's synchronous offload copies (capabilities.pinned_host_memory) are what runs
    replace(Tensor, "pin_memory", _pin_memory_emulator, optional=True)
    replace(Tensor, "is_pinned", _is_pinned_emulator, optional=True)
    replace(Tensor, "copy_", _copy_emulator)
    replace(nn.Cell, "__call__", _cell_call_emulator)
