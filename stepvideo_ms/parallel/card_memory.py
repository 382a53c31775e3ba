"""The memory of this process's Ascend card (real or simulated), as mindspore.hal reports it.

MindSpore reports 0 bytes for a card that is not yet initialized (its first operator, or
communication.init in an msrun job, initializes it). `device_memory_gib` is for a process that owns
its card, after the runtime is set; `probe_card_gib` is for one that must not hold a card (the msrun
launcher, the checks before the runtime starts): a child process opens the card, reads it and exits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional, Tuple

from ..console import quiet_environment

CARD_REPORTS = "the card reports {gib:g} GiB (pass --card_gb to plan for another size)"
PROBE_TIMEOUT_S = 300


def device_memory_gib(device: str) -> Tuple[Optional[float], str]:
    """(memory of this process's Ascend card in GiB, or None; why it is None on an Ascend card, or ""), real or
    simulated, from mindspore.hal. MindSpore reports 0 for a card not yet initialized (by its first
    operator, or by communication.init in an msrun job): call after `init_world`; a lone process runs
    one tiny operator first. On CPU: (None, "")."""
    from ..runtime import SIMULATED_ASCEND

    if device not in ("Ascend", SIMULATED_ASCEND):
        return None, ""
    from mindspore import hal, mint

    try:
        if not hal.is_initialized("Ascend"):
            mint.zeros((1,)).asnumpy()
        total = hal.get_device_properties(0, "Ascend").total_memory  # device_id is ignored: the current card
    except (RuntimeError, ValueError, AttributeError) as exc:  # a runtime without the query
        return None, f"the card did not report its memory ({type(exc).__name__}: {exc})"
    if not total:
        return None, "the card reported 0 bytes of memory"
    return round(total / 2 ** 30, 3), ""


_PROBE = """
import json, sys
from stepvideo_ms import runtime
from stepvideo_ms.parallel.card_memory import device_memory_gib
gib, why = device_memory_gib(runtime.init(sys.argv[1]).device)
print(json.dumps({"gib": gib, "why": why}))
"""


def probe_card_gib(device: str, env: Optional[dict] = None) -> Tuple[Optional[float], str]:
    """`device_memory_gib` of the card a child process opens (the first of ASCEND_RT_VISIBLE_DEVICES in
    `env`, default this process's environment) and closes when it exits: a launcher, or a check before
    the runtime starts, learns the card's size without holding the card its workers will use. On CPU:
    (None, "") at once."""
    from ..runtime import SIMULATED_ASCEND

    if device not in ("Ascend", SIMULATED_ASCEND):
        return None, ""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child_env = quiet_environment(False, dict(os.environ if env is None else env))
    child_env["PYTHONPATH"] = repo + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, device], env=child_env, capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"reading the card's memory took over {PROBE_TIMEOUT_S} s"
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        return answer["gib"], answer["why"]
    except (IndexError, ValueError, KeyError):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the card's memory could not be read (exit {done.returncode}: {last})"


def left_on_card(device: str, held_bytes: int) -> Tuple[Optional[float], str]:
    """(GiB of this process's card left for working memory once it holds `held_bytes` of weights and the
    planner's runtime reserve, or None; why None on an Ascend card). Negative when they do not fit."""
    card_gb, why = device_memory_gib(device)
    if card_gb is None:
        return None, why
    from .plan import Hardware

    return card_gb - held_bytes / 2 ** 30 - Hardware().reserve_gib, ""
