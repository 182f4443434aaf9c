"""What `raylm.serve` and `raylm.stop` do, and undo, without Ray or an engine.

The backend, the engines and Ray Serve's applications are stand-ins that record what they are
asked; the orchestration under test is the real one.
"""

import concurrent.futures
import dataclasses
import threading
import types
from pathlib import Path

import pytest
from doubles import NullEngine

import raylm
from raylm.config import load_plan_file, plan_document
from raylm.deployments import DEPLOYMENTS
from raylm.errors import ConfigError, DeploymentError
from raylm.model_settings import Autoscaling, Routing
from raylm.net import free_port

CALLS = []


class RecordingBackend(raylm.Backend):
    """A cluster of one node with 8 CPUs, that says what it was asked."""

    running: set = set()

    def up(self, progress):
        CALLS.append(("up", self.cluster_name))
        self.running.add(self.cluster_name)
        return self.status()

    def status(self):
        if self.cluster_name not in self.running:
            return None
        return raylm.ClusterStatus("recording", self.cluster_name, f"127.0.0.1:{len(self.cluster_name)}")

    def down(self, progress):
        CALLS.append(("down", self.cluster_name))
        self.running.discard(self.cluster_name)

    def remember_plan(self, plan):
        CALLS.append(("remember", plan.name))

    def forget_plan(self, name):
        CALLS.append(("forget", name))


class CheckedEngine(NullEngine):
    """An engine whose argument check refuses `--bad` and whose replicas need `--gpus N` GPUs."""

    def validate(self):
        if "--bad" in self.deployment.engine_args:
            raise ConfigError(f"model {self.deployment.name!r}: Engine rejected the arguments: --bad")

    def resources(self):
        args = self.deployment.engine_args
        return raylm.ReplicaResources(
            num_cpus=1, num_gpus=int(args[args.index("--gpus") + 1]) if "--gpus" in args else 0
        )


class FakeApps:
    """Ray Serve's applications of one cluster, as `raylm.serving.apps.RayServeApps` offers them."""

    deployed: dict = {}  # address -> app names
    fail_waiting: str | None = None
    key_file: str | None = None

    def __init__(self, address, environment):
        self.address = address
        CALLS.append(("connect", address))

    def close(self):
        CALLS.append(("close", self.address))

    def nodes(self):
        return [{"CPU": 8.0}]

    def deploy_router(self, plan, host, progress):
        self.deployed.setdefault(self.address, []).append(f"raylm-{plan.name}-router")
        FakeApps.key_file = plan.api_key_file  # the path the router would read its keys from
        CALLS.append(("deploy", (f"raylm-{plan.name}-router",)))

    def deploy_models(self, plan, engines, progress):
        names = [f"raylm-{plan.name}-{e.deployment.name}" for e in engines]
        self.deployed[self.address].extend(names)
        CALLS.append(("deploy", tuple(names)))

    def replica_states(self, apps):
        return {app: {"running": 1} for app in apps if app in self.deployed.get(self.address, [])}

    def wait_running(self, labels, progress, timeout_s):
        if self.fail_waiting:
            raise DeploymentError(self.fail_waiting)

    def drain(self, router_app, timeout_s, progress):
        if timeout_s > 0 and router_app in self.deployed.get(self.address, []):
            CALLS.append(("drain", router_app))

    def delete(self, apps, progress):
        present = [app for app in apps if app in self.deployed.get(self.address, [])]
        for app in present:
            self.deployed[self.address].remove(app)
        CALLS.append(("delete", tuple(present)))


@pytest.fixture
def registry(raylm_registry, raylm_home):
    plugin = types.SimpleNamespace(
        raylm_engines=raylm.hookimpl(
            lambda: [raylm.EngineSpec(name="checked", description="stand-in", engine_class=CheckedEngine)]
        ),
        raylm_backends=raylm.hookimpl(
            lambda: [raylm.BackendSpec(name="recording", description="stand-in", backend_class=RecordingBackend)]
        ),
    )
    raylm_registry.add_plugin(plugin, name="stand-ins")
    CALLS.clear()
    RecordingBackend.running = set()
    FakeApps.deployed, FakeApps.fail_waiting, FakeApps.key_file = {}, None, None
    return raylm_registry


PORT = free_port()


def plan(name="orch", *models, **backend_options):
    models = models or (raylm.ModelDeployment(model="m", name="small", engine="checked"),)
    return raylm.ServePlan(name=name, models=models, port=PORT, backend="recording", backend_options=backend_options)


def serve(registry, the_plan, **kwargs):
    return raylm.serve(the_plan, registry=registry, apps=FakeApps, progress=lambda _: None, **kwargs)


def stop(registry, name=None):
    return raylm.stop(name, registry=registry, apps=FakeApps, progress=lambda _: None)


def test_serving_starts_the_cluster_deploys_and_remembers_it(registry):
    deployment = serve(registry, plan())
    assert deployment.url == f"http://127.0.0.1:{PORT}" and deployment.models == ("small",)
    assert CALLS == [
        ("up", "orch"),
        ("connect", "127.0.0.1:4"),
        ("deploy", ("raylm-orch-router",)),
        ("deploy", ("raylm-orch-small",)),
        ("close", "127.0.0.1:4"),
        ("remember", "orch"),
    ]
    record = DEPLOYMENTS.load("orch")
    assert record.owns_cluster and record.apps == ("raylm-orch-router", "raylm-orch-small")


def test_stopping_drains_then_deletes_models_then_the_router_and_the_cluster_it_started(registry):
    serve(registry, plan())
    CALLS.clear()
    assert stop(registry, "orch") == ["orch"]
    assert CALLS == [
        ("forget", "orch"),
        ("connect", "127.0.0.1:4"),
        ("drain", "raylm-orch-router"),
        ("delete", ("raylm-orch-small",)),
        ("delete", ("raylm-orch-router",)),
        ("close", "127.0.0.1:4"),
        ("down", "orch"),
    ]
    assert DEPLOYMENTS.names() == []


def test_a_key_in_the_environment_reaches_the_router_as_a_file_and_goes_with_the_deployment(registry, monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "sk-from-the-environment")
    serve(registry, plan())
    key_file = Path(FakeApps.key_file)
    assert key_file.read_text() == "sk-from-the-environment\n" and key_file.stat().st_mode & 0o777 == 0o600
    record = DEPLOYMENTS.load("orch")
    assert record.api_key_file == str(key_file)
    assert "sk-from-the-environment" not in DEPLOYMENTS.store.path("orch").read_text()
    stop(registry, "orch")
    assert not key_file.exists()


def test_a_start_that_fails_stops_everything_it_started(registry):
    FakeApps.fail_waiting = "small failed to start: out of memory"
    with pytest.raises(DeploymentError, match="out of memory"):
        serve(registry, plan())
    assert FakeApps.deployed["127.0.0.1:4"] == []
    assert ("down", "orch") in CALLS and DEPLOYMENTS.names() == []
    assert ("remember", "orch") not in CALLS, "a plan that never served is not kept to serve again"


def test_two_starts_of_one_name_at_once_the_second_is_refused_and_touches_nothing(registry, monkeypatch):
    in_up, go_on = threading.Event(), threading.Event()
    up = RecordingBackend.up

    def slow_up(self, progress):
        in_up.set()
        go_on.wait(10)
        return up(self, progress)

    monkeypatch.setattr(RecordingBackend, "up", slow_up)
    first = concurrent.futures.ThreadPoolExecutor(1).submit(serve, registry, plan())
    assert in_up.wait(10)
    with pytest.raises(ConfigError, match=r"a `raylm serve` of 'orch' is already under way \(pid \d+\)"):
        serve(registry, plan())
    go_on.set()
    assert first.result(10).models == ("small",)
    assert FakeApps.deployed["127.0.0.1:4"] == ["raylm-orch-router", "raylm-orch-small"]
    assert DEPLOYMENTS.names() == ["orch"]


def test_precise_routing_needs_an_engine_that_publishes_its_cache_events(registry):
    precise = raylm.ModelDeployment(model="m", name="small", engine="checked", routing=Routing("precise"))
    with pytest.raises(ConfigError, match="routing 'precise' needs an engine that publishes its KV-cache events"):
        serve(registry, plan("orch", precise))
    assert CALLS == []  # refused before anything started


def test_a_bad_engine_argument_deploys_no_model_and_stops_what_started_meanwhile(registry):
    bad = raylm.ModelDeployment(model="m", name="small", engine="checked", engine_args=("--bad",))
    with pytest.raises(ConfigError, match="rejected the arguments: --bad"):
        serve(registry, plan("orch", bad))
    assert ("deploy", ("raylm-orch-small",)) not in CALLS
    assert FakeApps.deployed["127.0.0.1:4"] == [], "the router deployed meanwhile is deleted"
    assert CALLS[-1] == ("down", "orch") and DEPLOYMENTS.names() == []


def test_a_replica_no_node_can_hold_is_refused_before_anything_deploys(registry):
    big = raylm.ModelDeployment(model="m", name="big", engine="checked", engine_args=("--gpus", "2"))
    with pytest.raises(DeploymentError, match="needs 1 CPU and 2 GPUs on one node per replica"):
        serve(registry, plan("orch", big))
    assert ("deploy", ("raylm-orch-big",)) not in CALLS
    assert ("down", "orch") in CALLS and DEPLOYMENTS.names() == []


def test_a_cluster_started_by_another_deployment_outlives_this_one(registry):
    serve(registry, plan("first"))
    serve(registry, plan("second", cluster="first"))
    stop(registry, "first")
    assert ("down", "first") not in CALLS, "the second deployment still runs on it"
    assert DEPLOYMENTS.load("second").owns_cluster
    stop(registry, "second")
    assert ("down", "first") in CALLS


def test_replacing_stops_the_old_deployment_first(registry):
    serve(registry, plan())
    with pytest.raises(ConfigError, match="a deployment named 'orch'"):
        serve(registry, plan())
    serve(registry, plan(), replace=True)
    assert CALLS.count(("down", "orch")) == 1 and DEPLOYMENTS.names() == ["orch"]


def test_stopping_everything_stops_the_rest_when_one_cannot_be_stopped(registry):
    serve(registry, plan("first"))
    serve(registry, plan("second"))
    DEPLOYMENTS.save(dataclasses.replace(DEPLOYMENTS.load("first"), backend="gone"))
    with pytest.raises(DeploymentError, match="could not stop first .*stopped: second"):
        stop(registry)
    assert DEPLOYMENTS.names() == ["first"]


def test_status_shows_each_models_replicas_and_bounds(registry):
    scaled = raylm.ModelDeployment(
        model="m", name="elastic", engine="checked", autoscaling=Autoscaling(min_replicas=0, max_replicas=3)
    )
    serve(registry, plan("orch", raylm.ModelDeployment(model="m", name="small", engine="checked", replicas=2), scaled))
    (record,) = raylm.status("orch", registry=registry, apps=FakeApps)
    assert record["replicas"] == {"small": {"running": 1}, "elastic": {"running": 1}}
    assert record["replica_bounds"] == {"small": [2, 2], "elastic": [0, 3]}
    assert record["routing"] == {"small": "approximate", "elastic": "approximate"}  # its engine publishes no events
    RecordingBackend.running.clear()  # the cluster is gone: no replica states, and no connection tried
    CALLS.clear()
    (record,) = raylm.status("orch", registry=registry, apps=FakeApps)
    assert record["cluster_running"] is False and record["replicas"] == {} and CALLS == []


def test_a_plan_written_as_a_deployment_file_reads_back_the_same(tmp_path, monkeypatch):
    import yaml

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "keys").write_text("sk-1\n")
    monkeypatch.chdir(tmp_path)
    models = (
        raylm.ModelDeployment(
            model="models/tiny", name="tiny", engine="vllm", engine_args=("--max-model-len", "256"), replicas=2,
            python="/opt/venv/bin/python", env={"VLLM_LOGGING_LEVEL": "WARNING"}, max_queued_requests=7,
        ),
        raylm.ModelDeployment(
            model="org/hub-model", name="hub", engine="sglang", autoscaling=Autoscaling(min_replicas=0, max_replicas=3),
            routing=Routing("approximate", prefix_weight=5, load_weight=1.5),
        ),
    )  # fmt: skip
    written = raylm.ServePlan(
        models=models, name="demo", host="0.0.0.0", port=8100, backend="cai", backend_options={"cluster": "main"},
        api_key_file="keys", access_log=False, read_timeout_s=90.0,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "demo.yaml").write_text(yaml.safe_dump(plan_document(written)))
    monkeypatch.chdir(elsewhere)
    read = load_plan_file(elsewhere / "demo.yaml")
    assert read == dataclasses.replace(
        written,
        models=(dataclasses.replace(models[0], model=str(tmp_path / "models/tiny")), models[1]),
        api_key_file=str(tmp_path / "keys"),
    )
