"""Fixtures of the SGLang tests."""

import pytest
from sglang_setup import SGLANG_PYTHON


@pytest.fixture(scope="session")
def sglang_python():
    if not SGLANG_PYTHON.exists():
        pytest.fail("no SGLang environment: run scripts/sglang-env (scripts/test does)")
    return str(SGLANG_PYTHON)
