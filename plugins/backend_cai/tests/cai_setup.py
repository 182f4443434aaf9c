"""What the cai tests share: the fake's key and runtime, and running raylm as a user of CML would."""

import subprocess
import sys
from pathlib import Path

from raylm_cai.testing import DEFAULT_RUNTIME

API_KEY = "fake-cml-api-key-0123456789"
RUNTIME = DEFAULT_RUNTIME
RAYLM = str(Path(sys.executable).parent / "raylm")


class Console:
    """Runs raylm commands and keeps everything they printed, to search it for secrets."""

    def __init__(self):
        self.output = []

    def __call__(self, *args, env, timeout=900):
        done = subprocess.run(
            [RAYLM, *args], env=env, cwd=env["HOME"], capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.output += [done.stdout, done.stderr]
        return done


def session_path():
    """PATH of a shell that has raylm."""
    return str(Path(sys.executable).parent) + ":/usr/bin:/bin"
