"""The commands the README and docs/ mark as runnable (fenced ```bash runnable blocks) run as written.

Each block runs line by line (a trailing backslash continues a line) from the repository, as a user
in the checkout runs it: `$OUT` is a fresh folder, `.venv/bin/` is the environment this suite runs in
(so the same commands run on every MindSpore the suite is run on), and every line must exit 0.
"""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

FENCE = re.compile(r"^```bash runnable\s*\n(.*?)^```", re.M | re.S)


def runnable_blocks():
    found = []
    for path in [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for n, block in enumerate(FENCE.findall(text)):
            found.append(pytest.param(block, id=f"{os.path.relpath(path, REPO)}#{n + 1}"))
    return found


def commands(block):
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_docs_mark_runnable_commands():
    assert len(runnable_blocks()) >= 3


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", runnable_blocks())
def test_runnable_block(block, tmp_path):
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "OUT": str(tmp_path), "GLOG_v": "3", "PYTHONPATH": REPO}
    for command in commands(block):
        line = command.replace(".venv/bin/", venv_bin + "/")
        done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
