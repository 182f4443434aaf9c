"""The example backend passes raylm's backend contract, against a real Ray cluster."""

import pytest

from raylm.testing.contracts import BackendContract


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head, started with raylm's local backend."""
    from raylm_local.backend import LocalBackend

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYLM_HOME", str(tmp_path_factory.mktemp("home")))
        head = LocalBackend({"cluster": "env-example", "num_cpus": 2})
        yield head.up(print).address
        head.down(print)


class TestEnvBackend(BackendContract):
    backend_name = "env"
    plugin_module = "raylm_env"
    starts_clusters = False

    @pytest.fixture
    def backend_options(self, ray_cluster, monkeypatch):
        monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
        return {"cluster": "example"}


def test_up_without_a_cluster_says_what_to_do(monkeypatch):
    from raylm.toolkit import ClusterError
    from raylm_env import EnvBackend

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ClusterError, match="set it to a running cluster"):
        EnvBackend({}).up(print)
