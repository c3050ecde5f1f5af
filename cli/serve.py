"""``duet serve`` (the Ray Serve app) and ``duet batch`` (ad variants from a brief)."""

from __future__ import annotations

import typer


def serve(
    config: str = typer.Option(
        None, "--config", "-c", help="Serve config (TOML/JSON URI, serve.config.ServeConfig)."
    ),
    local: bool = typer.Option(
        False, "--local", help="Run the API in this process without Ray (one worker per quality)."
    ),
    ray_address: str = typer.Option(None, "--ray-address", help="Join this Ray cluster."),
    host: str = typer.Option(None, "--host", help="Override the config's host."),
    port: int = typer.Option(None, "--port", help="Override the config's port."),
    checkpoint: str = typer.Option(
        None, "--checkpoint", help="Serve this checkpoint (e.g. RUN/sft/final of `duet train`)."
    ),
) -> None:
    """Serve the generation API and web page (Fast and Full deployments on Ray Serve)."""
    import os
    import secrets
    import signal
    import threading

    from cli.common import absolute
    from cli.generate import check_checkpoint
    from core.config import ConfigError
    from flows.adgen import absolute_serve_config
    from serve.config import API_KEYS_ENV, serve_config_from
    from serve.worker import NoCheckpointError, checkpoint_for

    try:
        cfg = serve_config_from(absolute(config))
        if checkpoint:
            cfg.checkpoint = checkpoint
        # Replicas run in Ray's working directories: local paths are made absolute here.
        cfg = absolute_serve_config(cfg)
        served = {checkpoint_for(cfg, "default", quality) for quality in ("full", "fast")}
    except (ConfigError, NoCheckpointError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    for uri in sorted(served - {None}):
        # Here, before Ray starts: a replica would fail on it in its own log, or serve
        # the noise of a vae-stage checkpoint's untrained DiT.
        check_checkpoint(uri, prompt="")
    if host:
        cfg.host = host
    if port:
        cfg.port = port
    if local or not (ray_address or os.environ.get("RAY_ADDRESS")):
        # Here, not later in a replica's log: the port this machine will serve on (a
        # cluster joined by address may already serve there, to be redeployed).
        _check_port_free(cfg.host, cfg.port)
    if not cfg.all_api_keys():
        key = secrets.token_urlsafe(24)
        cfg.api_keys = (key,)
        typer.echo(
            f"no API keys configured ({API_KEYS_ENV} or api_keys): generated one for this run: "
            f"{key}"
        )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if local:
        from serve.local import ServerThread, build_local_app

        app, backend = build_local_app(cfg)
        with ServerThread(app, cfg.host, cfg.port) as server:
            _announce(server.url, cfg)
            stop.wait()
        backend.close()
        return
    from ray import serve as ray_serve

    from serve.app import run

    url = run(cfg, ray_address=ray_address)
    _announce(url, cfg)
    stop.wait()
    ray_serve.delete(cfg.app_name)


def _check_port_free(host: str, port: int) -> None:
    """Exit 1 with one line when something already listens on ``host:port``."""
    import errno
    import socket

    from cli.common import FAILED, fail

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the server will: a port left in TIME_WAIT by a stopped server is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            fail(
                f"port {port} on {host} is in use (another `duet serve`?): stop what listens "
                "there or pass --port N",
                FAILED,
            )


def _announce(url: str, cfg) -> None:
    typer.echo(f"serving {cfg.app_name} at {url}")
    typer.echo(f"  web page: {url}")
    typer.echo(f"  OpenAPI:  {url}docs  ({url}openapi.json)")
    typer.echo(f"  jobs:     {cfg.jobs_uri}")
    typer.echo("Ctrl-C stops it.")


def batch(
    brief: str = typer.Argument(
        ..., help="Brief: .toml/.json (templates + slots), .csv or .parquet"
    ),
    out: str = typer.Option(..., "--out", "-o", help="Output URI: videos/ and results.parquet"),
    url: str = typer.Option(None, "--url", help="A running Duet API; default: start one here."),
    api_key: str = typer.Option(None, "--api-key", envvar="DUET_API_KEY", help="Key for --url."),
    config: str = typer.Option(None, "--config", "-c", help="Serve config when starting one."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Variants in flight."),
) -> None:
    """Generate every variant of an ad brief (Prefect flow ``adgen``); reruns skip finished ones."""
    from cli.common import absolute
    from pipelines.adgen import BriefError, load_brief

    brief, out, config = absolute(brief), absolute(out), absolute(config)
    try:
        load_brief(brief)  # a bad brief is refused before any flow or service starts
    except (BriefError, FileNotFoundError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    from flows import prefect_api

    prefect_api.check_reachable()  # before the flow's slow imports and Prefect's retries
    from flows.adgen import adgen

    try:
        summary = adgen(
            brief, out, serve_url=url, api_key=api_key, serve_config=config,
            concurrency=concurrency,
        )  # fmt: skip
    except (BriefError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(
        f"{summary['brief']}: {summary['variants']} variants, {summary['succeeded']} made, "
        f"{summary['failed']} failed, {summary['skipped']} already there "
        f"({summary['wall_s']:.0f} s)"
    )
    typer.echo(f"  videos:  {summary['videos']}")
    typer.echo(f"  results: {summary['results']}")
    if summary["failed"]:
        raise typer.Exit(code=1)
