"""Named points where a test can kill the process for real (SIGKILL), or hold it, to prove that resume, publish
and the locks survive real processes.

Set QUANTKIT_KILL_AT to a point's name (e.g. "layer:2:saved", "publish:ref"); unset, each point costs one lookup.
Under torchrun, QUANTKIT_KILL_RANK names the one process (its RANK) killed there; unset, every process is.
Set QUANTKIT_WAIT_AT to a wait point's name (e.g. "target:locked") and QUANTKIT_WAIT_FILE to a path: there the
process creates that file and waits until it is deleted (at most WAIT_LIMIT_S), so a test can start a second run
while the first is held at a known step.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

WAIT_LIMIT_S = 120.0


def kill_point(name: str) -> None:
    if os.environ.get("QUANTKIT_KILL_AT") == name and \
            os.environ.get("QUANTKIT_KILL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def wait_point(name: str) -> None:
    if os.environ.get("QUANTKIT_WAIT_AT") != name or not os.environ.get("QUANTKIT_WAIT_FILE"):
        return
    flag = Path(os.environ["QUANTKIT_WAIT_FILE"])
    flag.touch()
    deadline = time.monotonic() + WAIT_LIMIT_S
    while flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
