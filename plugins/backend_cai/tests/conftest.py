"""Fixtures of the cai tests: a FakeCML per module, and what a CML session of its project sees."""

import pytest
from cai_setup import API_KEY

from raylm_cai.testing import FakeCML


@pytest.fixture(scope="module")
def cml(tmp_path_factory):
    with FakeCML(tmp_path_factory.mktemp("cml"), api_keys=(API_KEY,)) as fake:
        yield fake


@pytest.fixture(scope="module")
def project(cml):
    return cml.create_project("demo")


@pytest.fixture(scope="module")
def session_env(cml, project):
    """The environment of a CML session of the project: raylm run with it acts inside CML."""
    return cml.session_environment(project["id"])


@pytest.fixture
def client(cml):
    from raylm_cai.client import CMLClient

    return CMLClient(cml.url, API_KEY, backoff_s=0.05)
