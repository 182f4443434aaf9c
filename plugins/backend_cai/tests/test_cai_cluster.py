"""End to end on FakeCML: `raylm cluster up --backend cai` forms a real Ray cluster of CML applications,
`raylm serve` puts a vLLM model on it, `raylm cluster down` leaves nothing. Real Ray, vLLM, HTTP, OpenAI client."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from cai_setup import API_KEY, RUNTIME, Console, delete_what_is_left, session_path

from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
from raylm.toolkit import args_to_argv, wait_until
from raylm_cai.node import cluster_folder, ray_auth_environment

SIZES = ["--head-cpu", "1", "--head-memory", "3", "--worker-cpu", "2", "--worker-memory", "3"]
SIZES += ["--runtime-identifier", RUNTIME]
TINY_ARGS = args_to_argv(TINY_LLAMA_VLLM_ARGS)
ENGINE_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]

pytestmark = pytest.mark.engine


@pytest.fixture
def console():
    return Console()


@pytest.fixture(autouse=True)
def an_empty_workspace_after(cml, project, client):
    yield
    delete_what_is_left(cml, client, project["id"])


def autoscaler_log(cml) -> str:
    """The end of the newest Ray autoscaler log of FakeCML's pods (Ray's monitor on an autoscaled head), for a
    failure's message: what the autoscaler saw and decided."""
    logs = sorted(cml.pod_tmp_root.glob("*/raylm-ray/session_*/logs/monitor.log"), key=lambda log: log.stat().st_mtime)
    return logs[-1].read_text(errors="replace")[-4000:] if logs else "(no autoscaler log)"


# Ray's GCS on what keeps each node busy: the autoscaler deletes a worker only once Ray reports it idle.
NODE_ACTIVITY = """
import sys
from ray._raylet import GcsClient
from ray.autoscaler.v2.sdk import get_cluster_resource_state
from ray.core.generated.autoscaler_pb2 import NodeStatus
for node in get_cluster_resource_state(GcsClient(address=sys.argv[1])).node_states:
    status = NodeStatus.Name(node.status)
    print(node.node_ip_address, status, f"idle {node.idle_duration_ms} ms", list(node.node_activity))
"""


def node_activity(session_env, cluster: str, address: str) -> str:
    """Each Ray node of the cluster: its status, idle time and what Ray says keeps it busy, for a failure's
    message."""
    env = {**session_env, **ray_auth_environment(cluster_folder(cluster, Path(session_env["HOME"])))}
    done = subprocess.run(
        [sys.executable, "-c", NODE_ACTIVITY, address], env=env, capture_output=True, text=True, timeout=60
    )
    return done.stdout + done.stderr[-2000:]


def test_a_bad_key_fails_fast_in_one_line_and_creates_nothing(cml, session_env, console):
    started = time.monotonic()
    # No --backend: inside a CML workload the default backend is cai.
    done = console("cluster", "up", "--workers", "2", *SIZES, env={**session_env, "CDSW_APIV2_KEY": "x"})
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    assert done.stderr.strip().splitlines() == [
        "raylm: error: CML refused the API key (invalid or expired API key): it is wrong or expired; "
        "create an API v2 key in User Settings"
    ]
    assert cml.applications() == []


def test_up_from_outside_cml_says_where_to_run_it(cml, project, console, tmp_path):
    laptop = {
        "PATH": session_path(),
        "HOME": str(tmp_path),
        "RAYLM_CML_URL": cml.url,
        "RAYLM_CML_PROJECT": "demo",
        "RAYLM_CML_API_KEY": API_KEY,
    }
    done = console("cluster", "up", "--backend", "cai", *SIZES, env=laptop)
    assert done.returncode == 1
    assert "run this in a CML session or job of that project, or use `raylm cai deploy`" in done.stderr
    assert cml.applications() == []
    assert console("cluster", "status", "--backend", "cai", env=laptop).stdout.strip() == "no such cluster running"


def test_an_endpoint_open_to_anyone_without_keys_is_refused_before_anything_starts(
    cml, session_env, console, tiny_llama
):
    done = console(
        "serve", str(tiny_llama), "--backend", "cai", "--bypass-authentication", *SIZES, *TINY_ARGS, env=session_env
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "raylm: error: --bypass-authentication opens the endpoint to anyone who reaches its URL: give it keys "
        "(--api-key-file, or RAYLM_API_KEY)"
    ]
    assert cml.applications() == []


def test_a_worker_that_fails_fails_up_and_leaves_no_application(cml, session_env, console):
    cml.faults.fail_applications(r"-worker-2$")
    try:
        done = console(
            "cluster", "up", "--backend", "cai", "--cluster", "broken", "--workers", "2", *SIZES, env=session_env
        )
    finally:
        cml.faults.clear()
    assert done.returncode == 1
    assert "raylm: error: application raylm-broken-worker-2 is failed: see its logs in CML" in done.stderr
    assert "deleting the applications created" in done.stderr
    assert cml.applications() == []
    assert cml.pod_processes() == []


@pytest.mark.parametrize(
    "bounds, error",
    [
        (["--min-workers", "3", "--max-workers", "2"], "--max-workers must be >= 1 and >= --min-workers (3), got 2"),
        (["--min-workers", "-1", "--max-workers", "2"], "--max-workers must be >= 1 and >= --min-workers (-1), got 2"),
        (["--min-workers", "1"], "--min-workers needs --max-workers: the most workers the cluster may grow to"),
        (
            ["--workers", "1", "--max-workers", "2"],
            "give --workers for a fixed cluster, or --min-workers/--max-workers",
        ),
        (["--max-workers", "2", "--idle-timeout", "-5"], "--idle-timeout must be >= 0 seconds, got -5.0"),
    ],
)
def test_bad_worker_bounds_fail_in_one_line_before_anything_starts(cml, session_env, console, bounds, error):
    done = console("cluster", "up", "--backend", "cai", "--cluster", "bad", *bounds, *SIZES, env=session_env)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"raylm: error: {error}")
    assert cml.applications() == []


def test_an_autoscaled_cluster_grows_for_demand_and_shrinks_when_idle(cml, project, session_env, console, tiny_llama):
    up = console(
        "cluster", "up", "--backend", "cai", "--cluster", "elastic", "--max-workers", "2", "--idle-timeout", "20",
        *SIZES, "--json", env=session_env,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    cluster = json.loads(up.stdout)
    assert cluster["applications"] == {"raylm-elastic-head": "APPLICATION_RUNNING"}, "a head only, to start with"
    assert cluster["autoscaling"] == {"min_workers": 0, "max_workers": 2}
    fixed = console("cluster", "scale", "--backend", "cai", "--cluster", "elastic", "--workers", "1", env=session_env)
    assert fixed.returncode == 1 and "autoscales between 0 and 2 workers" in fixed.stderr

    # Two replicas of one CPU: the head (1 CPU) holds one; Ray's autoscaler creates a worker for the other,
    # though CML answers its first two creates with 503.
    cml.faults.fail_requests("POST", r"/applications$", 503, times=2)
    serve = ["serve", str(tiny_llama), "--name", "tiny", "--backend", "cai", "--cluster", "elastic"]
    served = console(*serve, "--replicas", "2", "--detach", *TINY_ARGS, env=session_env)
    assert served.returncode == 0, served.stderr
    assert cml_names(cml) == ["raylm-elastic-head", "raylm-elastic-worker-1"]
    (record,) = json.loads(console("status", "tiny", "--json", env=session_env).stdout)
    assert record["ready"] is True and record["replicas"] == {"tiny": {"running": 2}}
    from openai import OpenAI

    client = OpenAI(base_url=served.stdout.strip().splitlines()[-1], api_key="unused", max_retries=0)
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4

    # The worker's pod dies (a lost node): its application is deleted and replaced, and Serve's replica with it.
    (lost,) = [app["id"] for app in cml.applications() if app["name"] == "raylm-elastic-worker-1"]
    cml.kill_pod("raylm-elastic-worker-1")

    def replaced() -> bool:
        workers = [app["id"] for app in cml.applications() if app["name"] != "raylm-elastic-head"]
        (model,) = httpx.get(f"{client.base_url}models", timeout=10).json()["data"]
        return workers not in ([], [lost]) and model["replicas"] == 2  # replicas the router sends requests to

    wait_until(
        replaced,
        timeout_s=600,
        poll_s=2.0,
        on_timeout=lambda: AssertionError(f"the lost worker stayed lost\n{autoscaler_log(cml)}"),
    )
    assert cml_names(cml) == ["raylm-elastic-head", "raylm-elastic-worker-1"]
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4

    assert console("stop", "tiny", env=session_env).returncode == 0
    wait_until(
        lambda: cml_names(cml) == ["raylm-elastic-head"],
        timeout_s=240,
        poll_s=2.0,
        on_timeout=lambda: AssertionError(
            f"the idle worker was not deleted: {cml_names(cml)}\n{autoscaler_log(cml)}\n"
            + node_activity(session_env, "elastic", cluster["address"])
        ),
    )
    down = console("cluster", "down", "--backend", "cai", "--cluster", "elastic", env=session_env)
    assert down.returncode == 0, down.stderr
    assert cml.applications() == [] and cml.pod_processes() == []


def cml_names(cml):
    return sorted(app["name"] for app in cml.applications())


def test_cluster_up_serve_heal_scale_down(cml, project, session_env, console, client, tiny_llama):
    # CML answers 503, then 429, to the first application create: retried, and `up` still succeeds.
    cml.faults.fail_requests("POST", r"/applications$", 503)
    cml.faults.fail_requests("POST", r"/applications$", 429)
    up = console(
        "cluster", "up", "--backend", "cai", "--cluster", "main", "--workers", "2", *SIZES, "--json", env=session_env
    )
    assert up.returncode == 0, up.stderr
    cluster = json.loads(up.stdout)
    assert (cluster["nodes_alive"], cluster["nodes_expected"]) == (3, 3)
    head_ip = cluster["address"].rpartition(":")[0]
    assert cluster["dashboard_url"] == f"http://{head_ip}:8265"
    assert cluster["api_url"].startswith("http://raylm-main-head-")
    assert sorted(cluster["applications"]) == ["raylm-main-head", "raylm-main-worker-1", "raylm-main-worker-2"]
    assert all(app["bypass_authentication"] is False for app in cml.applications())
    assert "Ray reports 3 nodes alive" in up.stderr

    token_file = Path(session_env["HOME"]) / ".raylm/cai/main/token"
    # The head application's URL: CML's polling gets 200, the API says nothing serves yet.
    front = cml.application_url("raylm-main-head")
    assert httpx.get(f"{front}/").status_code == 200
    nothing = httpx.get(f"{front}/v1/models")
    assert nothing.status_code == 503 and nothing.json()["error"]["code"] == "no_deployment"
    node_ips = ray_node_ips(cluster["address"], session_env, token_file)
    assert len(set(node_ips)) == 3 and head_ip in node_ips and "127.0.0.1" not in node_ips
    refused = ray_node_ips(cluster["address"], session_env, token_file=None)
    assert refused is None, "a driver without the cluster's token must be refused"

    again = console("cluster", "up", "--backend", "cai", "--cluster", "main", "--workers", "2", *SIZES, env=session_env)
    assert again.returncode == 0 and "creating application" not in again.stderr  # idempotent

    key_file = Path(session_env["HOME"]) / "endpoint.keys"  # on the project filesystem, which the head reads
    key_file.write_text("sk-cai-endpoint\n")
    serve = ["serve", str(tiny_llama), "--name", "tiny", "--backend", "cai", "--cluster", "main"]
    served = console(*serve, "--api-key-file", str(key_file), "--detach", *TINY_ARGS, env=session_env)
    assert served.returncode == 0, served.stderr
    url = served.stdout.strip().splitlines()[-1]
    assert url == f"http://{head_ip}:8000/v1"  # the router listens on the head node, at its cluster IP
    assert len(cml.applications()) == 3  # serving on the cluster kept its workers

    from openai import AuthenticationError, OpenAI

    # Inside the workspace at the head's IP, and at the head application's URL, through CML's ingress.
    for base_url in (url, f"{front}/v1"):
        openai = OpenAI(base_url=base_url, api_key="sk-cai-endpoint", max_retries=0)
        assert [m.id for m in openai.models.list().data] == ["tiny"]
        completion = openai.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0)
        assert completion.usage.completion_tokens == 8
        stream = openai.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == completion.choices[0].text
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{front}/").status_code == 200, "CML's polling still gets its answer"
    kept_plan = Path(session_env["HOME"]) / ".raylm/cai/main/plans/tiny.yaml"
    assert kept_plan.is_file() and kept_plan.stat().st_mode & 0o077 == 0

    # The head application restarts (a new pod: a new IP, an empty Ray). Nobody acts: the workers join the
    # new head and the head serves the kept plan again, at the head application's URL.
    (head,) = [app for app in cml.applications() if app["name"] == "raylm-main-head"]
    client.call("POST", f"projects/{project['id']}/applications/{head['id']}:restart")
    back = wait_until(
        lambda: answering(cml, "raylm-main-head", "sk-cai-endpoint"),
        timeout_s=600,
        poll_s=2.0,
        on_timeout=lambda: AssertionError("the deployment did not answer again after the head restarted"),
    )
    assert back.usage.completion_tokens == 8 and back.choices[0].text == completion.choices[0].text
    (record,) = json.loads(console("status", "tiny", "--json", env=session_env).stdout)
    new_head_ip = record["address"].rpartition(":")[0]
    assert new_head_ip != head_ip and record["url"] == f"http://{new_head_ip}:8000"
    node_ips = ray_node_ips(record["address"], session_env, token_file)
    assert len(set(node_ips)) == 3 and new_head_ip in node_ips, "both workers rejoined the new head"

    (engine,) = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[1:3] == ENGINE_SERVER]
    assert engine.nice() == 0, "Ray's default worker niceness (15) reached the engine on a CML node"
    replica = engine.parent().parent()  # the engine's supervisor's parent
    assert os.sched_getscheduler(engine.pid) == os.SCHED_OTHER, "the engine is the data path (raylm.ray_nodes)"
    assert os.sched_getscheduler(replica.pid) == os.SCHED_BATCH, "Ray's processes on a CML node are batch"

    secrets = {"API key": API_KEY, "Ray token": token_file.read_text().strip()}
    assert_not_in_command_lines(secrets)

    status = console("status", "tiny", "--json", env=session_env)
    (record,) = json.loads(status.stdout)
    assert record["ready"] is True and record["replicas"] == {"tiny": {"running": 1}}
    assert console("stop", "tiny", env=session_env).returncode == 0
    assert not kept_plan.exists(), "a stopped deployment is not served again"

    scaled = console("cluster", "scale", "--backend", "cai", "--cluster", "main", "--workers", "1", env=session_env)
    assert scaled.returncode == 0, scaled.stderr
    assert sorted(app["name"] for app in cml.applications()) == ["raylm-main-head", "raylm-main-worker-1"]

    down = console("cluster", "down", "--backend", "cai", "--cluster", "main", env=session_env)
    assert down.returncode == 0, down.stderr
    assert cml.applications() == []
    assert cml.pod_processes() == []
    assert cml.killed_after_grace == [], "a Ray node did not stop within CML's grace time"
    assert not token_file.exists()
    assert_not_in_files(secrets, console.output, [cml.root / "logs", cml.pod_tmp_root])


def answering(cml, head_app, api_key):
    """A completion from the endpoint at the head application's URL, or None while it gives none."""
    from openai import OpenAI, OpenAIError

    try:
        front = cml.application_url(head_app)
        client = OpenAI(base_url=f"{front}/v1", api_key=api_key, max_retries=0, timeout=30)
        return client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0)
    except (OpenAIError, KeyError):  # KeyError: the head restarting has no workload yet
        return None


def ray_node_ips(address, session_env, token_file):
    """The IPs of the nodes Ray reports alive, asked by a driver of our own (None when Ray refuses it)."""
    code = (
        "import json, sys, ray\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))\n"
    )
    auth = {"RAY_AUTH_MODE": "token", **({"RAY_AUTH_TOKEN_PATH": str(token_file)} if token_file else {})}
    done = subprocess.run(
        [sys.executable, "-c", code, address], env={**session_env, **auth}, capture_output=True, text=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def assert_not_in_command_lines(secrets):
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or ())
        for what, value in secrets.items():
            assert value not in command, f"the {what} is in the command line of process {process.pid}"


def assert_not_in_files(secrets, outputs, folders):
    for what, value in secrets.items():
        assert not any(value in text for text in outputs), f"the {what} was printed"
        for folder in folders:
            for path in folder.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    assert value.encode() not in path.read_bytes(), f"the {what} is in {path}"
