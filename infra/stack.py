"""The local stack: ``make up`` / ``make down``.

``up`` starts, on loopback, what a cluster provides: an S3 server (moto's server
mode) with the config's buckets, a Ray head with its dashboard and token
authentication (a token of its own, in the state directory), a Prefect server with
its own database, the Duet deployments registered on it (:mod:`infra.prefect_deploy`,
target ``local``) and a process worker that runs them. It prints the addresses and
the environment to use, and records every process it started (pid and process
group) in ``STATE_DIR/stack.json``, so ``down`` stops exactly those and nothing
else: not another engineer's Ray, not a Prefect server someone else started.

The worker's flow runs get the Ray token and the S3 credentials only through the
deployments' job variables (Secret blocks), as on a cluster: the worker itself is
started without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import config_to_dict
from core.ports import free_port
from core.ray_setup import RAY_NODE_STARTUP_TIMEOUT, process_table
from infra.config import REPO_ROOT, DeployConfig

STATE_FILE = "stack.json"
TOKEN_FILE = "ray_auth_token"
ENV_FILE = "env.sh"
# Environment a started service must not inherit from whoever ran `make up`.
_SCRUBBED_PREFIXES = ("RAY_ADDRESS", "RAY_AUTH_", "PREFECT_API_URL")
# How often the head is started before `up` gives up when `ray start` says its raylet
# did not register in time (RAY_NODE_STARTUP_TIMEOUT); CI once saw two misses in a row.
RAY_START_ATTEMPTS = 3


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says what and where."""


def state_dir(cfg: DeployConfig) -> Path:
    path = Path(cfg.state_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def read_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wait(what: str, ready, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StackError(f"{what} exited with {proc.returncode}; log {log}:\n{tail}")
        if ready():
            return
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {timeout_s:.0f} s; log {log}")


def _http_ok(url: str) -> bool:
    """Whether ``url`` answers 200; a refused connection, or something on the port
    that does not speak HTTP, is "not yet" (its own process ending says what is wrong)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


def _service_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(extra or {})
    return env


def _start(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    log = logs / f"{name}.log"
    with open(log, "ab") as fh:
        # A session of its own: `down` signals the whole process group, so children
        # (Ray's raylet and workers, uvicorn) go with their parent.
        return subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def s3_env(cfg: DeployConfig) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": cfg.s3_endpoint(),
        "AWS_ACCESS_KEY_ID": cfg.s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": cfg.s3.secret_access_key,
        "AWS_DEFAULT_REGION": cfg.s3.region,
    }


def user_env(cfg: DeployConfig, directory: Path) -> dict[str, str]:
    """What a shell needs to point ``duet`` at the stack (written to ``env.sh``)."""
    env = {**s3_env(cfg), "PREFECT_API_URL": cfg.prefect_api_url()}
    if cfg.ray.auth_mode == "token":
        env["RAY_AUTH_TOKEN_PATH"] = str(directory / TOKEN_FILE)
    return env


def _create_buckets(cfg: DeployConfig) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=cfg.s3_endpoint(),
        aws_access_key_id=cfg.s3.access_key_id,
        aws_secret_access_key=cfg.s3.secret_access_key,
        region_name=cfg.s3.region,
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in cfg.s3.buckets():
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def _register_deployments(cfg: DeployConfig, token: str | None) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.prefect_deploy import register

    blocks = {
        cfg.s3.access_key_block: cfg.s3.access_key_id,
        cfg.s3.secret_key_block: cfg.s3.secret_access_key,
        cfg.s3.endpoint_block: cfg.s3_endpoint(),
    }
    if token is not None:
        blocks[cfg.ray.auth_token_block] = token
    with temporary_settings({PREFECT_API_URL: cfg.prefect_api_url()}):
        return asyncio.run(register(cfg, "local", blocks))


@dataclass
class _Launch:
    """What ``up`` has started so far, recorded in ``stack.json`` as it grows (so
    ``down``, or ``up``'s own clean-up, can stop exactly that)."""

    directory: Path
    state: dict[str, Any]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    @property
    def ray_temp(self) -> Path:
        return Path(self.state["ray_temp_dir"])

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = _start(name, cmd, env, self.logs)
        self.procs[name] = proc
        self.state["processes"][name] = {"pid": proc.pid, "pgid": proc.pid, "cmd": proc.args}
        _write_state(self.directory, self.state)
        return proc


def _new_launch(cfg: DeployConfig) -> _Launch:
    directory = state_dir(cfg)
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    # Ray's sockets live under its temp dir, whose path must stay short (AF_UNIX).
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    state: dict[str, Any] = {
        "config": config_to_dict(cfg),
        "state_dir": str(directory),
        "ray_temp_dir": str(Path("/tmp") / f"duet-stack-{digest}"),
        "processes": {},
        "started_at": time.time(),
    }
    return _Launch(directory, state)


def _busy_ports(cfg: DeployConfig) -> list[str]:
    return [
        f"{name} port {port}"
        for name, port in (
            ("S3", cfg.s3.port),
            ("Ray GCS", cfg.ray.gcs_port),
            ("Ray dashboard", cfg.ray.dashboard_port),
            ("Ray client", cfg.ray.client_port),
            ("Prefect", cfg.prefect.port),
        )
        if _port_open(cfg.ray.host, port)
    ]


def up(cfg: DeployConfig, log=print) -> dict[str, Any]:
    """Start the stack; returns the state written to ``stack.json``."""
    directory = state_dir(cfg)
    previous = read_state(directory)
    if previous and any(_alive(p["pid"]) for p in previous["processes"].values()):
        raise StackError(f"the stack in {directory} is already up: `make down` first")
    busy = _busy_ports(cfg)
    if busy:
        raise StackError(f"in use: {', '.join(busy)} (set other ports in the config)")
    launch = _new_launch(cfg)
    try:
        _start_s3(cfg, launch, log)
        # Prefect before Ray: once up, Ray takes random ports for its own services
        # (raylet, object manager), and one of them may be the port Prefect was
        # configured with; bound first, it is Prefect's.
        _start_prefect(cfg, launch, log)
        token = _start_ray_head(cfg, launch, log)
        _start_worker(cfg, launch, token, log)
    except BaseException:
        _stop_processes(launch.state, log=lambda *_: None)
        raise
    env = user_env(cfg, directory)
    (directory / ENV_FILE).write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    launch.state["urls"] = urls(cfg)
    _write_state(directory, launch.state)
    return launch.state


def _start_s3(cfg: DeployConfig, launch: _Launch, log) -> None:
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "moto.server", "-H", cfg.s3.host, "-p", str(cfg.s3.port)]
    proc = launch.start("s3", cmd, _service_env())
    ready = lambda: _http_ok(cfg.s3_endpoint() + "/moto-api/")  # noqa: E731
    _wait("S3 server", ready, 60, proc, launch.logs / "s3.log")
    _create_buckets(cfg)
    log(f"S3 server up in {time.monotonic() - t0:.1f} s")


def _start_prefect(cfg: DeployConfig, launch: _Launch, log) -> None:
    t0 = time.monotonic()
    env = _service_env(
        {
            "PREFECT_HOME": str(launch.directory / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": cfg.prefect.host,
            "PREFECT_SERVER_API_PORT": str(cfg.prefect.port),
            "PREFECT_UI_API_URL": cfg.prefect_api_url(),
        }
    )
    cmd = [_bin("prefect"), "server", "start", "--host", cfg.prefect.host,
           "--port", str(cfg.prefect.port)]  # fmt: skip
    proc = launch.start("prefect", cmd, env)
    ready = lambda: _http_ok(cfg.prefect_api_url() + "/health")  # noqa: E731
    _wait("Prefect server", ready, 240, proc, launch.logs / "prefect.log")
    log(f"Prefect server up in {time.monotonic() - t0:.1f} s")


def _ray_head_command(cfg: DeployConfig, ray_temp: Path) -> list[str]:
    host = cfg.ray.host
    cmd = [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={host}", f"--port={cfg.ray.gcs_port}",
        "--include-dashboard=true", f"--dashboard-host={host}",
        f"--dashboard-port={cfg.ray.dashboard_port}",
        f"--ray-client-server-port={cfg.ray.client_port}",
        f"--temp-dir={ray_temp}",
        f"--min-worker-port={cfg.ray.min_worker_port}",
        f"--max-worker-port={cfg.ray.max_worker_port}",
        # Ports Ray would otherwise take at fixed defaults, which another Ray on
        # this machine may hold.
        f"--dashboard-agent-listen-port={free_port(host)}",
        f"--dashboard-agent-grpc-port={free_port(host)}",
        f"--metrics-export-port={free_port(host)}",
        f"--runtime-env-agent-port={free_port(host)}",
    ]  # fmt: skip
    if cfg.ray.num_cpus is not None:
        cmd.append(f"--num-cpus={cfg.ray.num_cpus}")
    return cmd


def _start_ray_head(cfg: DeployConfig, launch: _Launch, log) -> str | None:
    """The Ray head (started again once if its raylet missed registering); returns
    the head's auth token, or None when token authentication is off."""
    token = None
    env = _service_env({"RAY_USAGE_STATS_ENABLED": "0"})
    if cfg.ray.auth_mode == "token":
        token = secrets.token_hex(32)
        token_path = launch.directory / TOKEN_FILE
        token_path.write_text(token)
        token_path.chmod(0o600)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    host, ray_temp = cfg.ray.host, launch.ray_temp
    cmd = _ray_head_command(cfg, ray_temp)
    t0 = time.monotonic()
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        proc = launch.start("ray", cmd, env)
        try:
            ready = lambda: (  # noqa: E731
                (ray_temp / "ray_current_cluster").exists()
                and _port_open(host, cfg.ray.dashboard_port)
            )
            _wait("Ray head", ready, 180, proc, launch.logs / "ray.log")
            break
        except StackError as err:
            # `ray start` gives its raylet a fixed 30 s to register with the GCS; on
            # a machine busy with other work that can pass. Nothing was served yet,
            # so clear this attempt's processes and start the head again.
            if attempt == RAY_START_ATTEMPTS or RAY_NODE_STARTUP_TIMEOUT not in str(err):
                raise
            log("Ray head timed out registering its node (busy machine?): starting it again")
            _stop_processes(
                {
                    "processes": {"ray": launch.state["processes"]["ray"]},
                    "ray_temp_dir": str(ray_temp),
                },
                log=log,
            )
            shutil.rmtree(ray_temp, ignore_errors=True)
    log(f"Ray head up in {time.monotonic() - t0:.1f} s")
    return token


def _start_worker(cfg: DeployConfig, launch: _Launch, token: str | None, log) -> None:
    t0 = time.monotonic()
    launch.state["deployments"] = _register_deployments(cfg, token)
    _write_state(launch.directory, launch.state)
    # No S3 credentials or Ray token: runs get them from their deployment.
    env = {
        k: v
        for k, v in _service_env({"PREFECT_API_URL": cfg.prefect_api_url()}).items()
        if not k.startswith("AWS_")
    }
    env["PREFECT_HOME"] = str(launch.directory / "prefect-worker")
    cmd = [_bin("prefect"), "worker", "start", "--pool", cfg.prefect.local_work_pool,
           "--type", "process", "--name", "duet-local-worker"]  # fmt: skip
    launch.start("worker", cmd, env)
    log(f"deployments registered, worker started in {time.monotonic() - t0:.1f} s")


def urls(cfg: DeployConfig) -> dict[str, str]:
    return {
        "ray_address": cfg.ray_address(),
        "ray_client": f"ray://{cfg.ray.host}:{cfg.ray.client_port}",
        "ray_dashboard": cfg.dashboard_url(),
        "prefect_ui": f"http://{cfg.prefect.host}:{cfg.prefect.port}",
        "prefect_api": cfg.prefect_api_url(),
        "s3_endpoint": cfg.s3_endpoint(),
    }


def describe(cfg: DeployConfig, state: dict[str, Any]) -> str:
    directory = Path(state["state_dir"])
    env_file = directory / ENV_FILE
    lines = ["Duet local stack is up:"]
    lines += [f"  {name:<14} {url}" for name, url in state["urls"].items()]
    lines += [
        f"  {'buckets':<14} " + ", ".join(f"s3://{b}" for b in cfg.s3.buckets()),
        f"  {'deployments':<14} " + ", ".join(sorted(state.get("deployments", {}))),
        "",
        f"In a shell:  source {env_file}",
        f"  duet curate 's3://{cfg.s3.raw_bucket}/corpus/*.mp4' "
        f"--out s3://{cfg.s3.curated_bucket}/run1 --ray-address {cfg.ray_address()}",
        f"  duet train all --data s3://{cfg.s3.curated_bucket}/run1 "
        f"--run s3://{cfg.s3.runs_bucket}/run1 --ray-address {cfg.ray_address()}",
        "  prefect deployment run curate/nightly   # through the stack's worker",
        f"  duet serve --config serve.toml --ray-address {cfg.ray_address()}",
        f"Stop it with `make down` (state: {directory / STATE_FILE}).",
    ]
    return "\n".join(lines)


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(directory / STATE_FILE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        # A zombie is dead for our purposes (only its parent can reap it).
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _family(root: int, pgid: int) -> set[int]:
    """``root``, its descendants, and every member of its process group."""
    table = {pid: (ppid, pgid) for pid, (_, ppid, pgid) in process_table().items()}
    members = {pid for pid, (_, group) in table.items() if group == pgid}
    found = {root} if root in table else set()
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found | members


def _cmdline_mentions(text: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry.name))
    return found


def _process_name(pid: int) -> str:
    """What ``ps`` shows for ``pid`` (Ray names its workers ``ray::Actor``), shortened."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return str(pid)
    name = words[0].rsplit("/", 1)[-1]
    if name.startswith("python"):  # the script, past the interpreter's options
        name = next((w.rsplit("/", 1)[-1] for w in words[1:] if not w.startswith("-")), name)
    return name[:60]


def _stack_pids(state: dict[str, Any]) -> set[int]:
    """Every live process the stack started, its children included (not this one)."""
    targets: set[int] = set()
    for proc in reversed(list(state["processes"].values())):
        targets |= _family(proc["pid"], proc["pgid"])
    # Ray processes whose parent already died still name the stack's temp dir.
    if state.get("ray_temp_dir"):
        targets |= _cmdline_mentions(state["ray_temp_dir"] + "/")
    targets.discard(os.getpid())
    return targets


def _terminate(pids: set[int], grace_s: float) -> None:
    """SIGTERM ``pids`` and wait up to ``grace_s`` for them to be gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)


def _stop_processes(
    state: dict[str, Any], log=print, grace_s: float = 15.0, kill_wait_s: float = 60.0
) -> list[int]:
    """TERM every process the stack started but Ray's GCS and wait up to ``grace_s``;
    then TERM the GCS and whatever is left and wait again; KILL what still runs."""
    first = _stack_pids(state)
    # Ray's own `ray stop` stops the GCS last: Serve's controller, proxy and replicas
    # and the `ray start` parent wait on the GCS while they exit, so with the GCS
    # signalled at the same moment they outlived the whole grace (an idle stack went
    # down in 4 s, one that had served in 16).
    gcs = {p for p in first if _process_name(p) == "gcs_server"}
    _terminate(first - gcs, grace_s)
    # A raylet or a Prefect worker may have started a child after the first look.
    targets = first | _stack_pids(state)
    _terminate({p for p in targets if _alive(p)}, grace_s)
    killed = [p for p in targets if _alive(p)]
    names = ", ".join(sorted({_process_name(p) for p in killed}))
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered when the process next runs, and a large process takes a
    # while to release its memory: on a loaded machine that can be seconds after
    # kill() returns, so wait for them to be gone before saying so.
    deadline = time.monotonic() + kill_wait_s
    while killed and time.monotonic() < deadline and any(_alive(p) for p in killed):
        time.sleep(0.05)
    if killed:
        log(f"killed {len(killed)} process(es) that ignored SIGTERM: {names}")
    survivors = [p for p in killed if _alive(p)]
    if survivors:
        log(f"still alive {kill_wait_s:.0f} s after SIGKILL: {survivors}")
    return sorted(targets)


def down(cfg: DeployConfig, log=print) -> list[int]:
    """Stop what ``up`` started (per ``stack.json``); returns the pids signalled."""
    directory = state_dir(cfg)
    state = read_state(directory)
    if state is None:
        log(f"no stack state in {directory}: nothing to stop")
        return []
    stopped = _stop_processes(state, log=log)
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    for name in (STATE_FILE, TOKEN_FILE, ENV_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    log(f"stopped {len(stopped)} process(es); logs kept in {directory / 'logs'}")
    return stopped


def status(cfg: DeployConfig) -> dict[str, bool]:
    state = read_state(state_dir(cfg))
    if state is None:
        return {}
    return {name: _alive(p["pid"]) for name, p in state["processes"].items()}
