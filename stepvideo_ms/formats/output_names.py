"""Output file names that never replace an earlier video: `free_stem` gives `name`, or `name-1`,
`name-2`, ... when a file of that name is in the folder already (unless `overwrite`). Used by the
one-process pipeline (diffusion/) and by the msrun job front (generation/)."""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

OUTPUT_EXTENSIONS = (".mp4", ".json")
MAX_SUFFIX = 10000


def free_stem(folder: str, stem: str, overwrite: bool = False, extensions: Iterable[str] = OUTPUT_EXTENSIONS) -> str:
    """`stem`, or `stem-N` with the smallest N for which no output file exists yet."""
    def taken(name: str) -> bool:
        return any(os.path.exists(os.path.join(folder, name + ext)) for ext in extensions)

    if overwrite or not taken(stem):
        return stem
    for n in range(1, MAX_SUFFIX):
        candidate = f"{stem}-{n}"
        if not taken(candidate):
            return candidate
    raise ValueError(f"{folder} already holds {MAX_SUFFIX} videos named {stem}: pass --output_file_name")


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
