"""Run the real `raylm` command in a child process, as a user would."""

import json
import os
import sys
from pathlib import Path

from raylm.testing.cli import run_raylm

TESTS = Path(__file__).resolve().parent

# Runs the CLI, then reports which heavy runtimes it imported.
PROBE = """
import json, sys
from raylm.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'sglang', 'torch', 'transformers'})
print('RAYLM_TEST_HEAVY=' + json.dumps(heavy), file=sys.stderr)
sys.exit(code)
"""


def run_raylm_probed(*args, python=sys.executable, env=None, timeout=600, extra_path=()):
    """Run `raylm ARGS`; returns (exit code, stdout, stderr lines without the probe's, heavy modules imported)."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), str(TESTS)])
    result = run_raylm(*args, env=environment, timeout=timeout, command=(python, "-c", PROBE))
    lines = result.stderr.splitlines()
    heavy = next((json.loads(line.split("=", 1)[1]) for line in lines if line.startswith("RAYLM_TEST_HEAVY=")), None)
    stderr = [line for line in lines if not line.startswith("RAYLM_TEST_HEAVY=")]
    return result.returncode, result.stdout, stderr, heavy
