"""The repository's copy of the golden data (tests/golden) is the project's golden set, file for file.

New cases appear first in ../shared/golden beside a developer's checkout; a user's clone has only the
copy. Where ../shared/golden is present, the copy must hold exactly its data files (README aside).
"""
import hashlib
import os

import pytest

from conftest import REPO

COPY = os.path.join(REPO, "tests", "golden")
SOURCE = os.path.join(REPO, "..", "shared", "golden")


def _data_files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name == "README.md":
                continue
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def test_the_copy_holds_every_case_the_suite_reads():
    names = _data_files(COPY)
    for case in ("dit_t2v", "dit_ti2v", "sampler", "step_llm", "clip", "vae"):
        assert f"{case}_weights.safetensors" in names and f"{case}_io.safetensors" in names, case
    for case in ("dit_t2v_bf16", "dit_ti2v_bf16", "vae_bf16"):
        assert os.path.join("bf16", f"{case}_io.safetensors") in names, case
    assert os.path.join("bin", "pytorch_model.bin") in names


@pytest.mark.skipif(not os.path.isdir(SOURCE), reason="no ../shared/golden beside this checkout (a user's clone)")
def test_the_copy_equals_the_shared_golden_set():
    want, have = _data_files(SOURCE), _data_files(COPY)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
    assert not (missing or extra or changed), (
        f"tests/golden differs from ../shared/golden: missing {missing}, not in the shared set {extra}, "
        f"changed {changed}; copy the shared files into tests/golden")
