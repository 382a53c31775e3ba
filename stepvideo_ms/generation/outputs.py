"""Where a generation's files go, decided before any weight is read.

- the save folder's check (`check_save_folder`: a directory, or one that can be created, that we may
  write in) and the MP4/JSON name (`free_stem`, an existing name numbered) live in
  formats/output_names.py, shared with the one-process pipeline.
- `public_arguments`: the arguments as recorded in the JSON, the token shown only as set / not set.
"""
from __future__ import annotations

import os
from typing import Dict

SECRET_ARGUMENTS = {"auth_token": "STEPVIDEO_AUTH_TOKEN"}  # argument -> the environment variable it falls back to


def public_arguments(args) -> Dict[str, object]:
    """vars(args) for a file or a log: secrets replaced by 'set' / 'not set'."""
    out = dict(vars(args))
    for name, env in SECRET_ARGUMENTS.items():
        if name in out:
            out[name] = "set" if out[name] or os.environ.get(env) else "not set"
    return out
