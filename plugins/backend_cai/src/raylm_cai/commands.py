"""`raylm cai ...`: prepare a repository for CML, and deploy it there as a chain of jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from raylm.toolkit import click_option, echo_progress
from raylm_cai.options import CLUSTER_OPTIONS, CONNECTION_OPTIONS


@click.group("cai")
def cai_group() -> None:
    """Cloudera ML (Cloudera AI): deploy raylm from a git repository as CML jobs."""


@cai_group.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False, exists=True))
def init_command(directory: str) -> None:
    """Write the job script `raylm cai deploy` runs into DIRECTORY (a git repository); commit it."""
    from raylm_cai.deploy import JOB_SCRIPT, JOB_SCRIPT_SOURCE

    path = Path(directory) / JOB_SCRIPT
    path.write_text(JOB_SCRIPT_SOURCE)
    click.echo(f"wrote {path}; commit it, and a requirements.txt that installs raylm, raylm-cai and an engine")


@cai_group.command("deploy")
@click.option("--git-url", required=True, help="Repository CML clones into the project.")
@click.option("--git-ref", help="Branch or tag to clone (default: the repository's default branch).")
@click.option("-f", "--file", "plan_file", required=True, help="Deployment file, as a path inside the repository.")
@click.option("--cluster", default="default", show_default=True, help="Name of the Ray cluster in the project.")
@click.option(
    "--setup", default="-r requirements.txt", show_default=True, help="Arguments of `pip install` in the setup job."
)
def deploy_command(git_url: str, git_ref: str | None, plan_file: str, cluster: str, setup: str, **options: Any) -> None:
    """Create (or reuse) the project from git and run the jobs setup -> cluster up -> serve.

    Runs from anywhere the CML API answers, e.g. a laptop: give --cml-url, --project
    (the project's name; default: the repository's) and the API key by file or environment.
    """
    from raylm_cai.client import CMLClient, CMLSettings
    from raylm_cai.deploy import deploy, job_chain

    project = options.get("project") or Path(git_url.rstrip("/")).name.removesuffix(".git")
    settings = CMLSettings.resolve({**options, "project": project})
    cluster_options = {option.name: options.get(option.name) for option in CLUSTER_OPTIONS}
    cluster_options["runtime_identifier"] = options.get("runtime_identifier")
    deploy(
        CMLClient(settings.url, settings.api_key),
        project_name=project,
        git_url=git_url,
        git_ref=git_ref,
        runtime_identifier=options.get("runtime_identifier"),
        chain=job_chain(cluster, plan_file, setup, cluster_options),
        progress=echo_progress,
    )


for _option in CONNECTION_OPTIONS + CLUSTER_OPTIONS:
    deploy_command.params.append(click_option(_option, "cai"))
