"""The `raylm` command as users meet it: help, plugins, and one clear line for every bad input."""

import json
import socket

import pytest
from clitools import run_raylm_probed

from raylm.deployments import DEPLOYMENTS, DeploymentRecord


def test_version():
    code, out, _, _ = run_raylm_probed("--version")
    assert code == 0 and out.strip() == "raylm, version 0.1.0"


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["serve", "--help"]])
def test_help_and_plugins_import_no_heavy_runtime(args):
    code, out, _, heavy = run_raylm_probed(*args)
    assert code == 0 and out
    assert heavy == [], f"`raylm {' '.join(args)}` imported {heavy}"


def test_help_lists_the_commands_and_backend_options():
    _, out, _, _ = run_raylm_probed("--help")
    for command in ("plugins", "serve", "status", "stop", "cluster"):
        assert command in out
    _, out, _, _ = run_raylm_probed("serve", "--help")
    assert "--address" in out and "[local]" in out


def test_plugins_table_shows_every_plugin_and_its_status():
    code, out, _, _ = run_raylm_probed("plugins")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["raylm-local"].endswith("ok") and "backend local" in rows["raylm-local"]
    assert rows["raylm-vllm"].endswith("ok") and "engine vllm" in rows["raylm-vllm"]
    # SGLang runs from an environment of its own, so here its runtime is missing:
    assert rows["raylm-sglang"].endswith("missing sglang (pip install 'raylm-sglang[sglang]')")
    assert rows["raylm-cai"].endswith("ok") and "backend cai" in rows["raylm-cai"]


def test_plugins_json_has_the_documented_keys():
    _, out, _, _ = run_raylm_probed("plugins", "--json")
    records = {r["name"]: r for r in json.loads(out)}
    assert set(records["raylm-vllm"]) == {"name", "version", "entry_point", "engines", "backends", "status", "error"}
    assert records["raylm-vllm"]["entry_point"] == "vllm = raylm_vllm.plugin"
    assert records["raylm-vllm"]["engines"] == ["vllm"] and records["raylm-vllm"]["status"] == "ok"
    assert records["raylm-cai"]["status"] == "ok"


def assert_one_line_error(code, stderr, *fragments):
    assert code == 1, stderr
    assert len(stderr) == 1, "expected one line, got:\n" + "\n".join(stderr)
    assert stderr[0].startswith("raylm: error: ")
    for fragment in fragments:
        assert fragment in stderr[0]


@pytest.fixture
def tmp_home(raylm_home):
    return {"RAYLM_HOME": str(raylm_home)}


def test_unknown_engine(tiny_llama, tmp_home):
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--engine", "nope", env=tmp_home)
    assert_one_line_error(
        code, err, "unknown engine 'nope'", "installed engines: sglang, vllm", "pip install raylm-nope"
    )


def test_unknown_backend(tiny_llama, tmp_home):
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--backend", "nope", env=tmp_home)
    assert_one_line_error(code, err, "unknown backend 'nope'", "installed backends: cai, env, local")


def test_cml_backend_outside_cml_without_settings(tiny_llama, tmp_home):
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--backend", "cai", env=tmp_home)
    assert_one_line_error(code, err, "no CML workbench URL: pass --cml-url", "RAYLM_CML_URL")


def test_engine_not_installed_here(tiny_llama, tmp_home):
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--engine", "sglang", env=tmp_home)
    assert_one_line_error(
        code, err, "engine 'sglang' needs the Python module 'sglang', which is not installed", "raylm-sglang[sglang]"
    )


def test_engine_runtime_not_installed(tiny_llama, tmp_home, make_distribution):
    site = make_distribution(
        "raylm-delta",
        module="delta_plugin",
        source="""
        import raylm
        from doubles import NullEngine

        @raylm.hookimpl
        def raylm_engines():
            yield raylm.EngineSpec(name="delta", description="d", engine_class=NullEngine,
                                   requires=[raylm.Requirement("delta_runtime", "pip install 'raylm-delta[delta]'")])
    """,
    )
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--engine", "delta", env=tmp_home, extra_path=[site])
    assert_one_line_error(code, err, "needs the Python module 'delta_runtime'", "pip install 'raylm-delta[delta]'")
    code, out, _, _ = run_raylm_probed("plugins", extra_path=[site])
    row = next(line for line in out.splitlines() if line.startswith("raylm-delta "))
    assert row.endswith("  missing delta_runtime (pip install 'raylm-delta[delta]')")


def test_model_path_missing(tmp_home):
    code, _, err, _ = run_raylm_probed("serve", "./no/such/model", env=tmp_home)
    assert_one_line_error(code, err, "model path ./no/such/model does not exist")


def test_port_in_use(tiny_llama, tmp_home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--port", str(port), env=tmp_home)
    assert_one_line_error(code, err, f"port {port} on 127.0.0.1 is in use", "--port")


def test_invalid_engine_argument_gets_vllms_own_message(tiny_llama, tmp_home):
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--max-model-lenn", "512", env=tmp_home)
    # vLLM's own complaint, as `vllm serve` words it. (The Ray head started meanwhile is stopped again.)
    assert code == 1 and err[0] == "raylm: checking the engine arguments of tiny-llama"
    assert err[-1] == (
        "raylm: error: model 'tiny-llama': vLLM rejected the arguments: unrecognized arguments: --max-model-lenn 512"
    )
    assert any(line.startswith("raylm: stopping the local Ray head 'tiny-llama'") for line in err), err
    assert not any("replica" in line for line in err), "nothing may be deployed"


def test_reserved_engine_option_points_to_the_raylm_option(tiny_llama, tmp_home):
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--served-model-name", "x", env=tmp_home)
    assert_one_line_error(code, err, "raylm sets --served-model-name itself; use --name instead")


def test_deployment_file_errors(tmp_path, tmp_home):
    plan = tmp_path / "deploy.yaml"
    plan.write_text("models:\n  - model: ./m\n    enigne: vllm\n")
    code, _, err, _ = run_raylm_probed("serve", "-f", str(plan), env=tmp_home)
    assert_one_line_error(code, err, "unknown key enigne")
    code, _, err, _ = run_raylm_probed("serve", "-f", str(tmp_path / "missing.yaml"), env=tmp_home)
    assert_one_line_error(code, err, "cannot read")
    plan.write_text("models:\n  - model: ./m\n    routing: {policy: approximate, load_weight: 200}\n")
    code, _, err, _ = run_raylm_probed("serve", "-f", str(plan), env=tmp_home)
    assert_one_line_error(code, err, "routing: load_weight must be a number from 0 to 100, got 200")
    plan.write_text("server: {read_timeout_s: -1}\nmodels:\n  - model: ./m\n")
    code, _, err, _ = run_raylm_probed("serve", "-f", str(plan), env=tmp_home)
    assert_one_line_error(code, err, "read_timeout_s must be a number of seconds > 0, got -1")


def test_stop_and_status_of_an_unknown_deployment(tmp_home):
    code, _, err, _ = run_raylm_probed("stop", "ghost", env=tmp_home)
    assert_one_line_error(code, err, "no deployment named 'ghost'; running: none")
    code, out, _, _ = run_raylm_probed("status", env=tmp_home)
    assert code == 0 and out.strip() == "no deployments running"


def test_status_of_a_deployment_whose_cluster_is_gone_is_one_line(tmp_home):
    record = DeploymentRecord(
        name="orphan", url="http://127.0.0.1:1", models=("tiny",), router_app="raylm-orphan-router",
        model_apps=("raylm-orphan-tiny",), backend="local", backend_options={"cluster": "orphan"},
        address="127.0.0.1:1", owns_cluster=True, head_is_local=True, host="127.0.0.1", port=1,
    )  # fmt: skip
    DEPLOYMENTS.save(record)  # what `raylm serve` left, its Ray head since killed
    code, out, _, _ = run_raylm_probed("status", env=tmp_home)
    assert code == 0 and out.splitlines() == [
        "orphan: not answering: its cluster (backend local (127.0.0.1:1)) is not running (stopped or killed); "
        "`raylm stop orphan` ends what is left"
    ]
    code, _, err, _ = run_raylm_probed("stop", "orphan", env=tmp_home)
    assert code == 0 and err[-1] == "raylm: stopped orphan" and DEPLOYMENTS.load("orphan") is None


def test_unknown_backend_option_in_a_deployment_file(tiny_llama, tmp_path, tmp_home):
    plan = tmp_path / "deploy.yaml"
    plan.write_text(f"cluster:\n  backend: local\n  workers: 3\nmodels:\n  - model: {tiny_llama}\n")
    code, _, err, _ = run_raylm_probed("serve", "-f", str(plan), env=tmp_home)
    assert_one_line_error(
        code, err, "backend 'local' has no option 'workers'; its options: address, num_cpus, num_gpus"
    )


def test_worker_bounds_on_a_backend_that_cannot_add_nodes(tmp_home):
    code, _, err, _ = run_raylm_probed("cluster", "up", "--backend", "local", "--max-workers", "2", env=tmp_home)
    assert_one_line_error(code, err, "backend 'local' has no option 'max_workers'; its options: address, num_cpus")


def test_a_backend_option_of_the_wrong_type(tiny_llama, tmp_path, tmp_home):
    plan = tmp_path / "deploy.yaml"
    plan.write_text(f"cluster:\n  num_cpus: many\nmodels:\n  - model: {tiny_llama}\n")
    code, _, err, _ = run_raylm_probed("serve", "-f", str(plan), env=tmp_home)
    assert_one_line_error(code, err, "backend 'local': option 'num_cpus' expects int, got 'many'")


def test_an_engine_option_before_the_model_is_a_usage_error(tmp_home):
    code, _, err, _ = run_raylm_probed("serve", "--max-model-len", "512", env=tmp_home)
    assert code == 2 and err[-1] == (
        "Error: unknown option --max-model-len: name the MODEL first, then the engine's own options"
    )


def test_an_api_key_file_without_a_key_stops_before_anything_starts(tiny_llama, tmp_path, tmp_home):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\n")
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--api-key-file", str(keys), env=tmp_home)
    assert_one_line_error(code, err, f"the API key file {keys} holds no key: write one key per line")
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--api-key-file", str(tmp_path / "no"), env=tmp_home)
    assert_one_line_error(code, err, f"cannot read the API key file {tmp_path / 'no'}: No such file or directory")


def test_bad_autoscaling_bounds_stop_before_anything_starts(tiny_llama, tmp_home):
    bounds = ("--min-replicas", "3", "--max-replicas", "2")
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), *bounds, env=tmp_home)
    assert_one_line_error(code, err, "autoscaling: max_replicas must be a whole number >= min_replicas and >= 1, got 2")
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--min-replicas", "-1", env=tmp_home)
    assert_one_line_error(code, err, "autoscaling: min_replicas must be a whole number >= 0, got -1")
    code, _, err, _ = run_raylm_probed("serve", str(tiny_llama), "--min-replicas", "0", env=tmp_home)
    assert_one_line_error(code, err, "autoscaling: max_replicas must be a whole number >= min_replicas and >= 1, got 0")
