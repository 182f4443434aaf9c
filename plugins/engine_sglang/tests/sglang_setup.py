"""Where the SGLang test environment is, and what SGLang needs to run on this CPU."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
SUPPORT = Path(__file__).resolve().parent / "support"
# What SGLang needs on this CPU: its CPU code paths, and the stand-ins on its path.
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(SUPPORT)}
CPU_ARGS = ("--device", "cpu", "--max-total-tokens", "4096", "--dtype", "float32")
