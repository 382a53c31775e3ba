"""Replacing a MindSpore entry point by a wrapper, once per process, keeping the original reachable.

Our code looks functions up on their module at call time (`mint.matmul(...)`, `ops.rms_norm(...)`),
so replacing the module attribute changes what every caller runs. The wrapper records the function
it wraps (`__wrapped__`), so installing twice is a no-op and the emulators can call the real kernel.
"""
from __future__ import annotations

import inspect
import re
from typing import Callable, Dict, Optional

_MARK = "__ascend_sim__"


def replace(owner, name: str, make: Callable[[Callable], Callable], optional: bool = False) -> Optional[Callable]:
    """Set owner.name to make(original) unless it is already a simulation wrapper; returns the original.

    The simulation follows the installed MindSpore's API: it never adds a name the version lacks. With
    `optional`, a missing name is left missing (None is returned), so the product's fallback is what runs."""
    if optional and not hasattr(owner, name):
        return None
    current = getattr(owner, name)
    if getattr(current, _MARK, False):
        return current.__wrapped__
    wrapper = make(current)
    try:
        setattr(wrapper, _MARK, True)
        setattr(wrapper, "__wrapped__", current)
    except AttributeError:  # pragma: no cover - a wrapper that is not a plain function
        raise TypeError(f"the replacement of {name} must be a Python function")
    setattr(owner, name, wrapper)
    return current


def original(fn: Callable) -> Callable:
    """The real MindSpore function behind a simulation wrapper (or fn itself)."""
    return fn.__wrapped__ if getattr(fn, _MARK, False) else fn


def is_simulated(fn: Callable) -> bool:
    return bool(getattr(fn, _MARK, False))


_SIGNATURES: Dict[int, inspect.Signature] = {}


def signature_of(fn: Callable) -> inspect.Signature:
    """The signature of a real MindSpore function; for an overloaded one (`*args, **kwargs`), the one
    its docstring opens with, e.g. "conv3d(input, weight, bias=None, stride=1, ...) -> Tensor"."""
    key = id(fn)
    if key not in _SIGNATURES:
        sig = inspect.signature(fn)
        kinds = [p.kind for p in sig.parameters.values()]
        if kinds == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
            sig = _documented_signature(fn)
        _SIGNATURES[key] = sig
    return _SIGNATURES[key]


def _documented_signature(fn: Callable) -> inspect.Signature:
    doc = (fn.__doc__ or "").strip()
    match = re.match(rf"{re.escape(fn.__name__)}(\([^)]*\))", doc)
    if not match:
        raise TypeError(f"{fn.__name__} is overloaded and its docstring does not open with its signature")
    namespace: dict = {}
    exec(f"def _f{match.group(1)}: pass", {}, namespace)  # noqa: S102 - MindSpore's own docstring
    return inspect.signature(namespace["_f"])


def bind(fn: Callable, name: str, args, kwargs) -> Dict[str, object]:
    """Bind a call as the real function would: an unknown or missing argument raises TypeError."""
    return bind_signature(signature_of(fn), name, args, kwargs)


def bind_signature(sig: inspect.Signature, name: str, args, kwargs) -> Dict[str, object]:
    """Bind a call to `sig` (e.g. a primitive's __init__ or __call__): unknown or missing arguments raise."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}{sig}: {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)
