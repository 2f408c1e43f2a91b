"""Named points where a test can kill the process for real (SIGKILL), to prove that resume and publish survive it.

Set QUANTKIT_KILL_AT to a point's name (e.g. "layer:2:saved", "publish:ref"); unset, each point costs one lookup.
"""
from __future__ import annotations

import os
import signal


def kill_point(name: str) -> None:
    if os.environ.get("QUANTKIT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
