"""A process of tests/test_host_share.py: maps one shared block file and reports on it.

    python tests/host_share_worker.py KEY NBYTES FILL_SECONDS REPORT_JSON GO_FILE

Opens (or writes, filling byte i with i % 251 after sleeping FILL_SECONDS) the shared map KEY of NBYTES in
$STEPVIDEO_OFFLOAD_DIR, reads every page, says so (REPORT_JSON.ready), writes {created, checksum, Rss, Pss} to REPORT_JSON once GO_FILE
exists (so that every process of the test maps the file when each measures), then waits for GO_FILE.done
before it exits. Loads host_share.py alone (numpy and the standard library), not the package.
"""
import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "host_share", os.path.join(HERE, os.pardir, "stepvideo_ms", "parallel", "host_share.py"))
host_share = importlib.util.module_from_spec(spec)
sys.modules["host_share"] = host_share  # before it runs: its dataclass looks itself up there
spec.loader.exec_module(host_share)


def main(key: str, nbytes: str, fill_s: str, report: str, go: str) -> None:
    n = int(nbytes)

    def fill(buffer):
        time.sleep(float(fill_s))
        buffer[:] = (np.arange(n) % 251).astype(np.uint8)

    shared = host_share.open_shared(key, n, fill)
    checksum = int(shared.array.astype(np.int64).sum())  # touches every page
    with open(report + ".ready", "w", encoding="utf-8"):
        pass
    while not os.path.exists(go):
        time.sleep(0.02)
    memory = host_share.mapped_memory(os.path.basename(shared.path))
    tmp = report + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"created": shared.created, "checksum": checksum, **memory}, fh)
    os.replace(tmp, report)
    while not os.path.exists(go + ".done"):
        time.sleep(0.02)


if __name__ == "__main__":
    main(*sys.argv[1:])
