"""What the cai tests share: the fake's key and runtime, and running raylm as a user of CML would."""

import sys
from pathlib import Path

from raylm.testing.cli import run_raylm
from raylm.toolkit import wait_until
from raylm_cai.applications import delete_application
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


def delete_what_is_left(cml, client, project_id):
    """Delete the applications a test left in the project and wait for their pods' processes: FakeCML's pods
    share this machine's ports, so the next test needs them gone (a test that fails midway leaves them)."""
    for app in client.applications(project_id, "raylm-"):
        delete_application(client, project_id, app)
    wait_until(
        lambda: not cml.pod_processes(),
        timeout_s=60,
        poll_s=0.5,
        on_timeout=lambda: AssertionError(f"processes of deleted applications still run: {cml.pod_processes()}"),
    )
