"""Run the `raylm` command as a user would: in a child process, with its own environment.

done = run_raylm("plugins", "--json")
assert done.returncode == 0, done.stderr
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

RAYLM = str(Path(sys.executable).parent / "raylm")


def run_raylm(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
    cwd: str | Path | None = None,
    command: Sequence[str] = (RAYLM,),
) -> subprocess.CompletedProcess:
    """`raylm ARGS...` (or `command ARGS...`, e.g. another environment's raylm), its output captured as text."""
    return subprocess.run(
        [*command, *args],
        env=None if env is None else dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
