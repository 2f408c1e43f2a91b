#!/usr/bin/env python
"""The benchmarks' one way to run a command and measure it: wall time and peak RSS of the whole process (imports
included), its output in a log file, and the JSON report quantkit's `--json` prints as its last line.

Imported by the scripts beside it (`from measure import run`); running it prints the measures of one command:

    python scripts/bench/measure.py -- python -m quantkit inspect demo/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

QUANTKIT = [sys.executable, "-m", "quantkit"]  # the command line, in this interpreter's environment


def bench_env(**extra: str) -> dict[str, str]:
    """The environment every measured command runs in: offline, no tokenizer threads competing for the cores."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def absolute(model: str) -> str:
    """A local path made absolute (measured commands run in their log's folder); a cached hub repo id as it is."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def last_json(lines: list[str]) -> dict | None:
    """The last line that is a JSON object (quantkit's `--json` report, a peer runner's result), or None."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


class CommandFailed(SystemExit):
    """A command exited with a code the caller did not accept: ends the script with this message unless caught."""


@dataclass
class Measured:
    cmd: list[str]
    rc: int
    wall_s: float  # command start to exit
    peak_rss_mb: float  # the process's largest resident set (wait4's ru_maxrss), imports included
    log: Path  # its stdout and stderr

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def report(self) -> dict:
        """The command's last JSON line ({} if it printed none)."""
        return last_json(self.lines()) or {}

    def check(self, ok: tuple[int, ...] = (0,)) -> Measured:
        """Itself if the exit code is one of ok, else CommandFailed with the log's last lines."""
        if self.rc not in ok:
            tail = "\n".join(self.lines()[-25:])
            raise CommandFailed(f"failed ({self.rc}): {' '.join(self.cmd)}\n--- last lines of {self.log}:\n{tail}")
        return self


# Linux gives an exec'd child the peak RSS of the process it was forked from (the mm it replaced), so a command
# started straight from a benchmark that holds a model would report that model's size as its own floor. The
# command is started from this small launcher instead, whose own size is all it inherits; it reports the
# command's peak (wait4's ru_maxrss, in KiB) into the file named by its first argument.
LAUNCHER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> Measured:
    """Run cmd in log's folder (GPTQModel writes a logs/ folder into its working directory), its output into log,
    killed after timeout seconds if given. Paths in cmd should be absolute."""
    peak_file = log.with_name(log.name + ".peak")
    peak_file.unlink(missing_ok=True)
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(peak_file), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env or bench_env(), cwd=log.parent,
                                start_new_session=True)  # its own process group: a timeout kills the command too
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
        proc.wait()
        wall = time.perf_counter() - start
        if timer:
            timer.cancel()
    rss_kb = int(peak_file.read_text()) if peak_file.is_file() else 0  # absent: the launcher itself was killed
    peak_file.unlink(missing_ok=True)
    return Measured(cmd, proc.returncode, wall, rss_kb / 1024, log)


def quantkit_json(args: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> dict:
    """The JSON report of `quantkit ARGS --json`, not measured (verify's, for instance)."""
    proc = subprocess.run([*QUANTKIT, *args, "--json"], env=env or bench_env(), capture_output=True, text=True)
    if proc.returncode not in ok:
        raise CommandFailed(f"quantkit {' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = last_json(proc.stdout.splitlines())
    if report is None:
        raise CommandFailed(f"quantkit {' '.join(args[:1])} printed no JSON report")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    ap.add_argument("--log", type=Path, default=Path("measure.log"), help="where its output goes")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")
    m = run(cmd, args.log.resolve())
    print(json.dumps({"rc": m.rc, "wall_s": round(m.wall_s, 2), "peak_rss_mb": round(m.peak_rss_mb),
                      "report": last_json(m.lines())}))
    return m.rc


if __name__ == "__main__":
    sys.exit(main())
