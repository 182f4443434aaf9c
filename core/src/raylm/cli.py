"""The `raylm` command. Plugins add options and subcommands; nothing heavy is imported before a command runs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import sys
import time
from typing import Any

import click

from raylm import __version__
from raylm.errors import RaylmError
from raylm.model_settings import (
    DEFAULT_MAX_ONGOING_REQUESTS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_READ_TIMEOUT_S,
    ROUTING_POLICIES,
    Autoscaling,
    Routing,
)
from raylm.plugins import Registry, get_registry


def echo_progress(message: str) -> None:
    # Whoever read our output may have gone (a closed pipe): the work, and its cleanup, go on.
    with contextlib.suppress(OSError):
        click.echo(f"raylm: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raylm")
def cli() -> None:
    """Serve large language models on Ray Serve behind an OpenAI-compatible API.

    Engines (vLLM, SGLang, ...) and cluster backends (local Ray, Cloudera ML, ...)
    are plugins; `raylm plugins` shows what is installed.
    """


# -- plugins -----------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins, what they provide, and whether they can be used."""
    records = [record.to_dict() for record in get_registry().plugins.values()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("no raylm plugins installed; e.g. pip install raylm-local raylm-vllm")
        return
    rows = [("PLUGIN", "VERSION", "PROVIDES", "STATUS")]
    for record in records:
        provides = ", ".join([f"engine {n}" for n in record["engines"]] + [f"backend {n}" for n in record["backends"]])
        # A missing runtime's error already reads "missing <module> (pip install ...)".
        state = {"ok": "ok", "missing": record["error"]}.get(record["status"], f"failed: {record['error']}")
        rows.append((record["name"], record["version"], provides or "-", state))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


# -- serve / status / stop -------------------------------------------------------


def _backend_options(kwargs: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """Pop the plugin-declared backend options that were given on the command line."""
    names = {option.name for spec in registry.backend_specs() for option in spec.options}
    return {name: kwargs.pop(name) for name in names if kwargs.get(name) is not None}


def _deployment_name(model_name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", model_name.lower()).strip("-")[:40] or "default"


@cli.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model", required=False)
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@click.option("-f", "--file", "plan_file", type=click.Path(dir_okay=False), help="Deployment file (YAML).")
@click.option("--name", help="Name clients use for the model, and of the deployment (default: the model's folder).")
@click.option("--engine", default="vllm", show_default=True, help="Inference engine plugin.")
@click.option("--backend", help="Cluster backend plugin (default: the one the environment suggests, else local).")
@click.option("--cluster", help="Cluster name within the backend (default: the deployment's name).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the OpenAI endpoint listens on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port of the OpenAI endpoint.")
@click.option("--replicas", default=1, show_default=True, type=int, help="Ray Serve replicas of the model.")
@click.option("--min-replicas", type=int, help="Autoscale the model's replicas from this many (instead of --replicas).")
@click.option("--max-replicas", type=int, help="... up to this many, as the load needs (default: --min-replicas).")
@click.option(
    "--target-ongoing-requests",
    type=float,
    help="Autoscaling: the requests one replica should carry (default 16).",
)
@click.option(
    "--max-ongoing-requests",
    default=DEFAULT_MAX_ONGOING_REQUESTS,
    show_default=True,
    type=int,
    help="Requests one replica takes at once; more wait in the model's queue.",
)
@click.option(
    "--max-queued-requests",
    default=DEFAULT_MAX_QUEUED_REQUESTS,
    show_default=True,
    type=int,
    help="Requests that may wait for the model's replicas; more get 429 with Retry-After.",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    help="File of the endpoint's API keys, one per line (or one key in RAYLM_API_KEY); clients send one as "
    "`Authorization: Bearer KEY`. Without either, the endpoint is open.",
)
@click.option("--python", "python_path", help="Python interpreter of a venv holding the engine, for its replicas.")
@click.option(
    "--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Environment of the replicas (repeatable)."
)
@click.option(
    "--routing",
    type=click.Choice(ROUTING_POLICIES),
    help="How the router picks a replica: by load, or by the prompt prefix each replica holds (approximate: "
    "from what it sent where; precise: from the engine's own KV-cache events) [default: precise where the "
    "engine publishes its events (vLLM, SGLang), else approximate]",
)
@click.option("--no-access-log", is_flag=True, help="No line per request in the router's log.")
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help=f"Seconds an engine may send nothing while it has a request (then 504) [default: {DEFAULT_READ_TIMEOUT_S:g}]",
)
@click.option("--detach", is_flag=True, help="Return once serving; stop later with `raylm stop NAME`.")
@click.option("--replace", is_flag=True, help="Stop a running deployment of the same name first.")
def serve_command(
    model: str | None,
    engine_args: tuple[str, ...],
    plan_file: str | None,
    name: str | None,
    engine: str,
    backend: str | None,
    cluster: str | None,
    host: str,
    port: int,
    replicas: int,
    min_replicas: int | None,
    max_replicas: int | None,
    target_ongoing_requests: float | None,
    max_ongoing_requests: int,
    max_queued_requests: int,
    api_key_file: str | None,
    python_path: str | None,
    env_pairs: tuple[str, ...],
    routing: str | None,
    no_access_log: bool,
    read_timeout: float | None,
    detach: bool,
    replace: bool,
    **kwargs: Any,
) -> None:
    """Serve MODEL (a path or hub id) with its ENGINE_ARGS, or the models of a deployment file.

    Options raylm does not know are the engine's own and pass through unchanged,
    e.g. `raylm serve ./tiny --max-model-len 512 --dtype float32`.
    """
    from raylm.api import serve, stop
    from raylm.config import ServePlan, default_model_name, load_plan_file
    from raylm.deployments import DEPLOYMENTS
    from raylm.engine import ModelDeployment

    registry = get_registry()
    backend_options = _backend_options(kwargs, registry)
    if cluster:
        backend_options["cluster"] = cluster
    if plan_file:
        if model or engine_args:
            raise click.UsageError("give either MODEL with its options or -f FILE, not both")
        plan = load_plan_file(plan_file)
        plan = dataclasses.replace(  # what the command line says wins over the file
            plan,
            backend=backend or plan.backend,
            backend_options={**plan.backend_options, **backend_options},
            api_key_file=api_key_file or plan.api_key_file,
            access_log=plan.access_log and not no_access_log,
            read_timeout_s=read_timeout or plan.read_timeout_s,
        )
        if routing:
            models = tuple(
                dataclasses.replace(m, routing=dataclasses.replace(m.routing, policy=routing)) for m in plan.models
            )
            plan = dataclasses.replace(plan, models=models)
    else:
        if not model:
            raise click.UsageError("name a MODEL to serve, or a deployment file with -f")
        if model.startswith("-"):
            raise click.UsageError(f"unknown option {model}: name the MODEL first, then the engine's own options")
        autoscaling = _autoscaling(min_replicas, max_replicas, target_ongoing_requests)
        if autoscaling is not None and replicas != 1:
            raise click.UsageError("give --replicas, or --min-replicas/--max-replicas to autoscale, not both")
        served_name = name or default_model_name(model)
        deployment = ModelDeployment(
            model=model,
            name=served_name,
            engine=engine,
            engine_args=engine_args,
            replicas=replicas,
            autoscaling=autoscaling,
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
            python=python_path,
            env=_parse_env(env_pairs),
            routing=Routing(policy=routing or Routing.policy),
        )
        plan = ServePlan(
            models=(deployment,),
            name=_deployment_name(served_name),
            host=host,
            port=port,
            backend=backend,
            backend_options=backend_options,
            api_key_file=api_key_file,
            access_log=not no_access_log,
            read_timeout_s=read_timeout or DEFAULT_READ_TIMEOUT_S,
        )
    _interrupt_on_stop_signals()
    before = DEPLOYMENTS.load(plan.name)  # a deployment of that name that is not this one's (serve refuses it)
    try:
        running = serve(plan, progress=echo_progress, registry=registry, replace=replace)
        click.echo(f"{running.url}/v1")
        if detach:
            echo_progress(f"detached; `raylm status {running.name}` shows it, `raylm stop {running.name}` stops it")
            return
        echo_progress("press Ctrl-C to stop")
        while DEPLOYMENTS.load(running.name) is not None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        # Also between `serve` being done and the wait above: what this command started stops in any case.
        if DEPLOYMENTS.load(plan.name) in (None, before):  # `serve` undid its start itself, or started nothing
            raise
        echo_progress("stopping")
        stop(plan.name, progress=echo_progress)
    else:
        echo_progress(f"{running.name} was stopped from elsewhere")


def _autoscaling(min_replicas: int | None, max_replicas: int | None, target: float | None) -> Autoscaling | None:
    if min_replicas is None and max_replicas is None and target is None:
        return None
    low = 1 if min_replicas is None else min_replicas
    given = {"target_ongoing_requests": target} if target is not None else {}
    return Autoscaling(min_replicas=low, max_replicas=low if max_replicas is None else max_replicas, **given)


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    return env


def _interrupt_on_stop_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt, so a start is undone and a serve is stopped.

    Set explicitly: a process started in the background by a script inherits SIGINT as ignored.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


@cli.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_command(name: str | None, as_json: bool) -> None:
    """Show the deployments raylm runs (or one of them)."""
    from raylm.api import status

    records = status(name)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("no deployments running")
        return
    for record in records:
        state = "ready" if record["ready"] else ("starting" if record["healthy"] else "not answering")
        where = f"backend {record['backend']} ({record['address']})"
        if not record["cluster_running"]:
            click.echo(
                f"{record['name']}: {state}: its cluster ({where}) is not running (stopped or killed); "
                f"`raylm stop {record['name']}` ends what is left"
            )
            continue
        click.echo(f"{record['name']}: {state} at {record['url']}/v1, {where}")
        for model in record["models"]:
            states = record["replicas"].get(model, {})
            now = ", ".join(f"{n} {s}" for s, n in states.items())
            low, high = record["replica_bounds"].get(model) or ("?", "?")
            bounds = f"{low} replica(s)" if low == high else f"{low}-{high} replicas, autoscaled"
            routing = record["routing"].get(model, "?")
            click.echo(f"  {model}: {now or 'no replica'} ({bounds}; routing {routing})")


@cli.command("stop")
@click.argument("name", required=False)
@click.option(
    "--drain-timeout",
    type=float,
    help="Seconds the requests already taken may take to finish, new ones getting 503 (default 30); 0: cut them.",
)
def stop_command(name: str | None, drain_timeout: float | None) -> None:
    """Stop a deployment (all, without NAME): its models, router, and any cluster it started."""
    from raylm.api import DRAIN_TIMEOUT_S, stop

    drain_timeout_s = DRAIN_TIMEOUT_S if drain_timeout is None else drain_timeout
    if not stop(name, progress=echo_progress, drain_timeout_s=drain_timeout_s):
        click.echo("no deployments running")


# -- cluster -------------------------------------------------------------------


@cli.group("cluster")
def cluster_group() -> None:
    """Start, inspect, scale and stop clusters of a backend."""


def _cluster_options(function):
    function = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(function)
    function = click.option(
        "--cluster", "cluster_name", default="default", show_default=True, help="Cluster name within the backend."
    )(function)
    return click.option("--backend", help="Cluster backend plugin (default: as for serve).")(function)


def _print_cluster(status: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status.to_dict() if status else None, indent=2))
    elif status is None:
        click.echo("no such cluster running")
    else:
        click.echo(
            f"{status.backend} cluster {status.name!r} at {status.address}: "
            f"{status.nodes_alive}/{status.nodes_expected} nodes alive"
            + (f", dashboard {status.dashboard_url}" if status.dashboard_url else "")
        )


@cluster_group.command("up")
@_cluster_options
def cluster_up_command(backend: str | None, cluster_name: str, as_json: bool, **kwargs: Any) -> None:
    """Start a cluster (or reuse the running one of that name)."""
    from raylm.api import cluster_up

    options = {"cluster": cluster_name, **_backend_options(kwargs, get_registry())}
    _print_cluster(cluster_up(backend, options, echo_progress), as_json)


@cluster_group.command("status")
@_cluster_options
def cluster_status_command(backend: str | None, cluster_name: str, as_json: bool, **kwargs: Any) -> None:
    """Show a cluster."""
    from raylm.api import cluster_status

    options = {"cluster": cluster_name, **_backend_options(kwargs, get_registry())}
    _print_cluster(cluster_status(backend, options), as_json)


@cluster_group.command("scale")
@_cluster_options
@click.option("--workers", type=int, required=True, help="Number of worker nodes.")
def cluster_scale_command(backend: str | None, cluster_name: str, as_json: bool, workers: int, **kwargs: Any) -> None:
    """Change the number of worker nodes."""
    from raylm.api import cluster_scale

    options = {"cluster": cluster_name, **_backend_options(kwargs, get_registry())}
    _print_cluster(cluster_scale(backend, options, workers, echo_progress), as_json)


@cluster_group.command("down")
@_cluster_options
def cluster_down_command(backend: str | None, cluster_name: str, as_json: bool, **kwargs: Any) -> None:
    """Stop a cluster and everything on it that raylm started."""
    from raylm.api import cluster_down

    options = {"cluster": cluster_name, **_backend_options(kwargs, get_registry())}
    cluster_down(backend, options, echo_progress)


BACKEND_OPTION_COMMANDS = (
    serve_command,
    cluster_up_command,
    cluster_status_command,
    cluster_scale_command,
    cluster_down_command,
)


def add_backend_options(registry: Registry) -> None:
    """Offer each backend's declared options (`--address`, ...) on the commands that pick a backend."""
    for command in BACKEND_OPTION_COMMANDS:
        present = {param.name for param in command.params}
        for spec in registry.backend_specs():
            for option in spec.options:
                if option.name in present:
                    continue
                present.add(option.name)
                command.params.append(click_option(option, spec.name))


def click_option(option: Any, backend: str) -> click.Option:
    """The command-line form of a BackendOption: `--NAME VALUE`, or a flag for a bool option."""
    flag = "--" + option.name.replace("_", "-")
    help_text = f"[{backend}] {option.help}"
    if option.type is bool:
        return click.Option([flag, option.name], is_flag=True, default=None, help=help_text)
    return click.Option([flag, option.name], type=option.type, default=None, help=help_text)


def main(argv: list[str] | None = None) -> None:
    try:
        registry = get_registry()
        add_backend_options(registry)
        registry.add_cli_commands(cli)
        # Not click's standalone mode: it turns Ctrl-C into "Aborted!" and exit code 1.
        result = cli.main(args=argv, prog_name="raylm", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("raylm: interrupted", err=True)
        sys.exit(130)
    except RaylmError as exc:
        click.echo(f"raylm: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
