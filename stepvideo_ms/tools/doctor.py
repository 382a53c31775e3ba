"""What to check first on a new machine or cluster, in one screen:

    python -m stepvideo_ms doctor [--device Ascend|CPU|ascend-sim]

The MindSpore version and whether this package supports it; on Ascend the CANN toolkit and driver
read from the installation (and whether the pair is one MindSpore publishes); the card this process
opens and its memory; the capabilities this MindSpore has and the fallback taken where one is
missing. Exit code 0 when everything a run needs is there, 1 otherwise.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
from typing import Dict, List, Optional, Tuple

from .. import versions

ASCEND_ROOT = "/usr/local/Ascend"


def _field(path: str, key: str) -> Optional[str]:
    """The value of `key=value` in an Ascend install-info file (the key's case ignored)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, sep, value = line.partition("=")
                if sep and name.strip().lower() == key:
                    return value.strip() or None
    except OSError:
        return None
    return None


def cann_version(env: Optional[Dict[str, str]] = None, root: str = ASCEND_ROOT) -> Tuple[Optional[str], str]:
    """(CANN toolkit version, the file it was read from): `version=` of ascend_toolkit_install.info under
    $ASCEND_HOME_PATH / $ASCEND_TOOLKIT_HOME, else the default install folders (ascend-toolkit/latest, cann)."""
    env = os.environ if env is None else env
    arch = f"{platform.machine()}-linux"
    homes = [env.get(v) for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")]
    homes += [os.path.join(root, "ascend-toolkit", "latest"), os.path.join(root, "cann")]
    homes += sorted(glob.glob(os.path.join(root, "cann-*")), reverse=True)
    for home in filter(None, homes):
        for path in (os.path.join(home, arch, "ascend_toolkit_install.info"),
                     *glob.glob(os.path.join(home, "*-linux", "ascend_toolkit_install.info"))):
            found = _field(path, "version")
            if found:
                return found, path
    return None, ""


def driver_version(root: str = ASCEND_ROOT) -> Tuple[Optional[str], str]:
    path = os.path.join(root, "driver", "version.info")
    found = _field(path, "version")
    return found, (path if found else "")


def report(device: Optional[str], env: Optional[Dict[str, str]] = None, root: str = ASCEND_ROOT) -> Tuple[List[str], bool]:
    """(lines to print, whether everything a run needs is there)."""
    import mindspore as ms

    from .. import capabilities, runtime
    from ..parallel.card_memory import device_memory_gib

    lines, ok = [], True

    def line(label: str, text: str, good: bool = True) -> None:
        nonlocal ok
        ok &= good
        lines.append(f"{'ok ' if good else 'BAD'} {label:<18} {text}")

    ms_version = ms.__version__
    in_range = versions.supported(ms_version)
    line("MindSpore", f"{ms_version} ({'supported' if in_range else 'NOT supported'}: {versions.range_text()}; "
                      f"tested here: {', '.join(versions.TESTED)})", in_range)
    line("Python", f"{platform.python_version()} ({sys.executable})")
    try:
        rt = runtime.init(device)
    except (ValueError, RuntimeError) as exc:
        line("device", f"cannot start: {exc}", False)
        return lines, ok
    line("device", f"{rt.device} (compute dtype {rt.compute_dtype})"
         + ("; the Ascend simulation on the CPU backend (tests only)" if rt.device == runtime.SIMULATED_ASCEND else ""))
    if rt.device == "Ascend":
        cann, where = cann_version(env, root)
        line("CANN", f"{cann} ({where})" if cann else "not found (no ascend_toolkit_install.info; source set_env.sh)",
             bool(cann))
        driver, where = driver_version(root)
        line("driver", f"{driver} ({where})" if driver else f"not found ({root}/driver/version.info)", bool(driver))
        published = versions.cann_for(ms_version)
        if published and cann:
            same = cann.upper().startswith(published.upper())
            line("pairing", f"MindSpore {ms_version} is published with CANN {published}"
                 + ("" if same else f"; this machine has {cann}: check MindSpore's install page for your pair"), same)
        else:
            line("pairing", f"no published CANN pairing known to this package for MindSpore {ms_version}")
    elif rt.device == runtime.SIMULATED_ASCEND:
        line("CANN", "not read (simulation: no CANN is needed)")
    if rt.device != "CPU":
        gib, why = device_memory_gib(rt.device)
        count = _device_count()
        line("card", (f"device {rt.device_id}: {gib:g} GiB" if gib else f"device {rt.device_id}: {why}")
             + (f" ({count} visible)" if count else ""), bool(gib))
    caps = capabilities.in_use(rt.device)
    needs_npu = rt.device != "CPU"
    line("fused attention", "ops.flash_attention_score" if caps["fused_attention"] else "missing",
         caps["fused_attention"] or not needs_npu)
    line("int8 kernel", "WeightQuantBatchMatmul (--weights int8)" if caps["int8_matmul"] else
         "missing: --weights int8 cannot run on Ascend", caps["int8_matmul"] or not needs_npu)
    line("offload", str(caps["offload_copies"]))
    line("sized split", str(caps["sized_split"]))
    if "cpu_numpy_views" in caps:
        line("CPU numpy path", str(caps["cpu_numpy_views"]))
    line("card query", "hal.get_device_properties" if caps["device_properties"] else
         "missing: pass --card_gb to plan layouts")
    return lines, ok


def _device_count() -> int:
    try:
        from mindspore import hal

        return int(hal.device_count("Ascend"))
    except Exception:  # a MindSpore without the query, or no plugin: not a failure of the check
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_ms doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None,
                        help="Ascend, CPU or ascend-sim (default: $STEPVIDEO_DEVICE, else Ascend when present)")
    args = parser.parse_args(argv)
    from ..console import quiet_environment

    quiet_environment(False)  # MindSpore's own log lines stay out of the screen
    lines, ok = report(args.device)
    print("\n".join(lines))
    print("everything a run needs is there" if ok else "something a run needs is missing (lines marked BAD)")
    return 0 if ok else 1
