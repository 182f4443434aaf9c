"""What the cai tests share: the fake's key and runtime, and running raylm as a user of CML would."""

import sys
from pathlib import Path

from raylm.testing.cli import run_raylm
from raylm_cai.testing import DEFAULT_RUNTIME

API_KEY = "fake-cml-api-key-0123456789"
RUNTIME = DEFAULT_RUNTIME


class Console:
    """Runs raylm commands and keeps everything they printed, to search it for secrets."""

    def __init__(self):
        self.output = []

    def __call__(self, *args, env, timeout=900):
        done = run_raylm(*args, env=env, cwd=env["HOME"], timeout=timeout)
        self.output += [done.stdout, done.stderr]
        return done


def session_path():
    """PATH of a shell that has raylm."""
    return str(Path(sys.executable).parent) + ":/usr/bin:/bin"
