"""Fixtures of the SGLang tests."""

import pytest
from sglang_setup import SGLANG_PYTHON

from raylm.testing.models import build_tiny_llama


@pytest.fixture(scope="session")
def sglang_python():
    if not SGLANG_PYTHON.exists():
        pytest.fail("no SGLang environment: run scripts/sglang-env (scripts/test does)")
    return str(SGLANG_PYTHON)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")
