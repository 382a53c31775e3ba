"""Where a generation's files go, decided before any weight is read.

- `check_save_folder`: the folder exists as a directory or can be created, and we may write in it
  (checked with a real temporary file, removed at once); a path that is a file is refused.
- the MP4/JSON name (`free_stem`, an existing name numbered) lives in formats/output_names.py, shared
  with the one-process pipeline.
- `public_arguments`: the arguments as recorded in the JSON, the token shown only as set / not set.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict

SECRET_ARGUMENTS = {"auth_token": "STEPVIDEO_AUTH_TOKEN"}  # argument -> the environment variable it falls back to


def check_save_folder(path: str, flag: str = "--save_path") -> str:
    """The absolute folder, after proving it is (or can become) a writable directory; creates nothing."""
    if not path:
        raise ValueError(f"{flag} is empty: give the folder for the video, e.g. {flag} ./results")
    folder = os.path.abspath(path)
    probe = folder
    while not os.path.exists(probe):  # the nearest existing ancestor decides whether it can be created
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        what = "is a file" if probe == folder else f"cannot be created: {probe} is a file"
        raise ValueError(f"{flag} {path} {what}: give a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stepvideo-write-test-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        verb = "write in" if probe == folder else f"create it inside {probe}"
        raise ValueError(f"{flag} {path}: cannot {verb} ({exc.strerror}): choose a writable folder") from None
    return folder


def public_arguments(args) -> Dict[str, object]:
    """vars(args) for a file or a log: secrets replaced by 'set' / 'not set'."""
    out = dict(vars(args))
    for name, env in SECRET_ARGUMENTS.items():
        if name in out:
            out[name] = "set" if out[name] or os.environ.get(env) else "not set"
    return out
