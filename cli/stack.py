"""``duet stack up|down|status``, ``duet deploy`` and ``duet manifests``: deployment.

All three read the deploy config (``infra/duet.toml`` unless ``--config``), see
``infra/README.md``.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="The local stack: S3 server, Ray head, Prefect server and worker.")

CONFIG_HELP = "DeployConfig TOML/JSON (default: infra/duet.toml)."


def _config(config_uri: str | None):
    from infra.config import load_deploy_config

    try:
        return load_deploy_config(config_uri)
    except (OSError, ValueError) as err:
        typer.echo(f"bad deploy config: {err}", err=True)
        raise typer.Exit(code=2) from err


@app.command("up")
def up(config_uri: str | None = typer.Option(None, "--config", help=CONFIG_HELP)) -> None:
    """Start the stack on loopback and print its addresses."""
    from infra import stack

    cfg = _config(config_uri)
    try:
        state = stack.up(cfg, log=lambda msg: typer.echo(msg, err=True))
    except stack.StackError as err:
        typer.echo(f"make up failed: {err}", err=True)
        raise typer.Exit(code=1) from err
    typer.echo(stack.describe(cfg, state))


@app.command("down")
def down(config_uri: str | None = typer.Option(None, "--config", help=CONFIG_HELP)) -> None:
    """Stop exactly the processes `up` started."""
    from infra import stack

    stack.down(_config(config_uri), log=typer.echo)


@app.command("status")
def status(config_uri: str | None = typer.Option(None, "--config", help=CONFIG_HELP)) -> None:
    """Which of the stack's processes are running."""
    from infra import stack

    alive = stack.status(_config(config_uri))
    if not alive:
        typer.echo("the stack is not up")
        raise typer.Exit(code=1)
    for name, running in alive.items():
        typer.echo(f"{name:<8} {'running' if running else 'stopped'}")


def deploy(
    target: str = typer.Option("cluster", "--target", help="cluster | local"),
    config_uri: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Register the Prefect deployments (curate, train, adgen) on PREFECT_API_URL."""
    import asyncio

    from flows import prefect_api
    from infra.prefect_deploy import TARGETS, register

    if target not in TARGETS:
        raise typer.BadParameter(f"--target must be one of {TARGETS}")
    prefect_api.check_reachable(local_fallback=False)
    ids = asyncio.run(register(_config(config_uri), target))
    for name, deployment_id in ids.items():
        typer.echo(f"{name}: {deployment_id}")


def manifests(
    check: bool = typer.Option(False, "--check", help="Fail if a file is out of date."),
    config_uri: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Write infra/kuberay/*.yaml and infra/prefect/prefect.yaml from the deploy config."""
    from infra import render

    cfg = _config(config_uri)
    name = config_uri or "infra/duet.toml"
    if check:
        stale = render.stale(cfg, config_name=name)
        for path in stale:
            typer.echo(f"out of date: {path} (run `duet manifests`)", err=True)
        raise typer.Exit(code=1 if stale else 0)
    for path in render.write(cfg, config_name=name):
        typer.echo(f"wrote {path}")
