"""Faults a test injects into Ray workers, to show how the driver takes them.

Off unless MERGEKIT_EVOLVER_RAY_FAULTS holds a JSON object; the driver passes
the variable on to its workers. Its keys:

    marks   a dir for "happened once" marker files (they outlive a restart)
    exit    steps whose worker dies (os._exit) the first time it takes them
    raise   steps whose candidate raises, every time
    hang    steps whose candidate never finishes (it sleeps an hour)
    delay   up to this many seconds of random sleep before every candidate
    uid     the worker drops to this uid before its start-up check, so the
            kernel really refuses it what that uid may not read
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

VARIABLE = "MERGEKIT_EVOLVER_RAY_FAULTS"


def _plan() -> dict:
    text = os.environ.get(VARIABLE)
    return json.loads(text) if text else {}


def on_check() -> None:
    uid = _plan().get("uid")
    if uid is not None:
        os.setgid(int(uid))
        os.setuid(int(uid))


def on_candidate(step: str) -> None:
    plan = _plan()
    if not plan:
        return
    if plan.get("delay"):
        time.sleep(random.Random(os.urandom(8)).uniform(0, float(plan["delay"])))
    if step in plan.get("exit", ()) and _first_time(plan, "exit", step):
        os._exit(1)
    if step in plan.get("raise", ()):
        raise RuntimeError(f"injected fault in {step}")
    if step in plan.get("hang", ()):
        time.sleep(3600)


def _first_time(plan: dict, kind: str, step: str) -> bool:
    mark = Path(plan["marks"]) / f"{kind}-{step.replace('/', '_')}"
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
