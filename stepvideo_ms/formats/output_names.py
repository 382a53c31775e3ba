"""Output file names that never replace an earlier video: `free_stem` gives `name`, or `name-1`,
`name-2`, ... when a file of that name is in the folder already (unless `overwrite`). Used by the
one-process pipeline (diffusion/) and by the msrun job front (generation/)."""
from __future__ import annotations

import os
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
