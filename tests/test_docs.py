"""What the documents tell a newcomer to run, run the way a newcomer runs it: the
installed ``duet`` console script, from a folder of their own, with relative paths.

``make demo`` once curated and then lost its manifest in the Ray Train stage,
because the workers resolved the relative ``--out`` against their own working
directory; ``duet generate`` then ``duet probe`` died on the generation metadata;
no test ran a command from another folder or a document's commands as written, so
nothing caught either.

Every fenced shell block of ``README.md`` and ``infra/README.md`` (and the inline
``duet`` commands of ``checkpoints/default/README.md``) is read here, command by
command. The README's chain runs in order, as written, in a temporary folder laid
out like a clone; only the entries of ``PLACEHOLDERS`` are substituted and only the
options of ``SMALLEST`` appended (Click keeps the last value of an option, so the
document's own options still parse and a wrong one still fails). What needs a
cluster (``--ray-address``, kubectl, docker, helm, the Prefect server) is checked:
its syntax, every ``duet`` command parsed by the CLI itself, and every file, image,
secret and deployment it names against what ``duet manifests`` generates.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DUET = Path(sys.executable).with_name("duet")
DOCUMENTS = ("README.md", "infra/README.md", "checkpoints/default/README.md")
# What a clone has that the README's chain reads (linked into the temporary folder).
CLONE_ENTRIES = (".venv", "serve", "checkpoints")

# The one table. Placeholders (whole words) -> values known when the chain runs.
PLACEHOLDERS = {
    "127.0.0.1:8000": "127.0.0.1:{port}",  # the address `duet serve` answers at
    "KEY": "{key}",  # the API key `duet serve` printed
}
# The smallest settings, appended to a documented command that starts so.
SMALLEST = {
    "duet synth": "--num-videos 3 --width 128 --height 128 --fps 16 --sample-rate 16000 "
    "--min-shots 2 --max-shots 2 --max-shot-s 3.5 --kinds bouncing_balls,collision",
    "duet curate": "--no-speech --num-cpus 2",
    "duet train all": "--config {quick_train} --runner local",
    "duet generate": "--steps 4 --sampler euler",
    "duet serve": "--local --port {port}",
    "duet demo": "--quick",
}
# Every stage at a step or two (the Ray Train path runs in the quick demo).
QUICK_TRAIN = """
preset = "tiny"
data = {frame_buckets = [17]}
vae = {steps = 2, batch_size = 2, checkpoint_every = 2, log_every = 1, eval_clips = 1}
pretrain = {steps = 2, batch_size = 2, checkpoint_every = 2, log_every = 1}
sft = {steps = 2, batch_size = 2, checkpoint_every = 2, log_every = 1}
distill = {steps = 2, batch_size = 2, trajectories_per_prompt = 1, teacher_steps = 2, checkpoint_every = 2, log_every = 1}
[rlhf]
steps = 1
batch_size = 1
group_size = 2
sample_steps = 2
checkpoint_every = 1
log_every = 1
preferences = {candidates_per_prompt = 2, rounds = 1, steps = 2}
# A functional chain: at two steps the candidates can be alike, so every pair counts
# and the agreement floor is off (what the reward model learns is bench/quality.py's).
reward = {steps = 2, min_margin = 0.0, min_agreement = 0.0, observer_steps = 2, observer_batch = 2, observer_colour_steps = 2}
"""  # noqa: E501


@dataclass
class Command:
    document: str
    line: int
    text: str  # as written, continuations joined, comment dropped
    background: bool  # ended with `&`

    def where(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


# -- reading the documents ---------------------------------------------------------
def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` starting a word, unquoted)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(text: str, document: str) -> list[Command]:
    """The commands of every fenced ``bash``/``sh`` block, in order."""
    out: list[Command] = []
    lines = text.splitlines()
    inside = False
    pending, start = "", 0
    for number, raw in enumerate(lines, 1):
        if raw.startswith("```"):
            inside = not inside and raw[3:].strip() in ("bash", "sh", "shell")
            continue
        if not inside:
            continue
        line = raw.rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = _strip_comment(pending + line.strip()).strip()
        pending = ""
        if full:
            background = full.endswith("&") and not full.endswith("&&")
            out.append(Command(document, start, full.rstrip("&").strip(), background))
    return out


def inline_duet_commands(text: str, document: str) -> list[Command]:
    """Inline code spans that are whole ``duet`` commands (with options: a bare
    ``duet generate`` names a command, it is not one to run)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`(duet [^`]+)`", line):
            if any(word.startswith("--") for word in span.split()):
                out.append(Command(document, number, span, False))
    return out


def document_commands(document: str, text: str | None = None) -> list[Command]:
    text = (REPO / document).read_text() if text is None else text
    return shell_commands(text, document) + (
        inline_duet_commands(text, document) if document.startswith("checkpoints/") else []
    )


# -- checking what cannot run here -------------------------------------------------
def duet_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``duet`` / ``.venv/bin/duet``, or None for another program."""
    if words and words[0] in ("duet", ".venv/bin/duet"):
        return words[1:]
    return None


def parse_duet(args: list[str]) -> dict:
    """Parse ``duet ARGS`` as the console script would, without running it; raises the
    CLI's usage error for an unknown command or option or a missing argument."""
    import typer

    from cli.main import app

    if "--help" in args:
        args = [a for a in args if a != "--help"]
        if not args:
            return {}
    command = typer.main.get_command(app)
    ctx = command.make_context("duet", list(args))
    while hasattr(command, "resolve_command"):
        name, command, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx.params


def _manifests() -> dict[str, str]:
    from infra.config import load_deploy_config
    from infra.render import rendered

    return {str(path): text for path, text in rendered(load_deploy_config(None)).items()}


def _flow_parameters(entrypoint: str) -> set[str]:
    import importlib

    module, name = entrypoint.split(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
    return set(inspect.signature(flow.fn).parameters)


def check_command(cmd: Command, manifests: dict[str, str]) -> None:
    """Syntax, and what the command names, for a command this machine does not run."""
    syntax = subprocess.run(["bash", "-n", "-c", cmd.text], capture_output=True, text=True)
    assert syntax.returncode == 0, f"{cmd.where()}: {syntax.stderr}"
    words = shlex.split(cmd.text)
    generated = "\n".join(manifests.values())
    tool = words[0].rsplit("/", 1)[-1]
    if (args := duet_argv(words)) is not None:
        try:
            parse_duet(args)
        except Exception as err:
            raise AssertionError(f"{cmd.where()}: {err}") from err
    elif tool == "make":
        for target in words[1:]:
            if "=" not in target:
                found = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True)
                assert found.returncode == 0, f"{cmd.where()}: no make target {target}"
    elif tool == "kubectl":
        if "-f" in words:
            path = words[words.index("-f") + 1]
            assert path in manifests, f"{cmd.where()}: {path} is not a file `duet manifests` writes"
            assert (REPO / path).exists(), path  # and up to date: tests/test_infra.py
        if words[-3:-1] == ["create", "namespace"] or "secret" in words:
            name = words[-1] if "namespace" in words else words[words.index("generic") + 1]
            assert re.search(rf"\b{re.escape(name)}\b", generated), f"{cmd.where()}: {name}?"
    elif tool == "docker":
        if "-f" in words:
            dockerfile = (REPO / words[words.index("-f") + 1]).read_text()
            for arg in words[words.index("-f") :]:
                if "=" in arg and arg.split("=")[0].isupper():
                    assert f"ARG {arg.split('=')[0]}" in dockerfile, f"{cmd.where()}: {arg}"
        tags = [w for w in words if w.startswith("ghcr.io/")]
        assert tags and all(tag in generated for tag in tags), f"{cmd.where()}: image tag"
    elif tool == "prefect" and words[1:3] == ["deployment", "run"]:
        import yaml

        flow, name = words[3].split("/")
        deployments = yaml.safe_load(manifests["infra/prefect/prefect.yaml"])["deployments"]
        found = [d for d in deployments if d["name"] == name and d["entrypoint"].endswith(flow)]
        assert len(found) == 1, f"{cmd.where()}: no deployment {flow}/{name}"
        params = _flow_parameters(found[0]["entrypoint"])
        for i, word in enumerate(words):
            if word == "-p":
                key = words[i + 1].split("=")[0]
                assert key in params, f"{cmd.where()}: {flow} has no parameter {key}"
    elif tool == "prefect" and words[1:3] == ["work-pool", "create"]:
        assert f"name: {words[3]}" in generated, f"{cmd.where()}: work pool {words[3]}"
    elif tool not in ("source", "export", "helm", "python"):
        raise AssertionError(f"{cmd.where()}: a command this test does not know how to check")


def test_every_documented_command_parses_and_names_what_exists():
    """Fast, for every document: what runs in the slow chain below is also parsed here;
    what cannot run here is checked against the generated manifests."""
    manifests = _manifests()
    seen = 0
    for document in DOCUMENTS:
        for cmd in document_commands(document):
            check_command(cmd, manifests)
            seen += 1
    assert seen >= 40, seen


@pytest.mark.parametrize(
    "edit",
    [
        ("duet curate 'raw/*.mp4' --out curated", "duet curate 'raw/*.mp4' --output curated"),
        ("duet model info small", "duet model inf small"),
        ("duet train all --data curated", "duet train all --dataset curated"),
        (
            "kubectl apply -f infra/kuberay/raycluster.yaml",
            "kubectl apply -f infra/raycluster.yaml",
        ),
        ("ghcr.io/duet-ai/duet:0.1.0-cpu .", "ghcr.io/duet-ai/duet:0.2.0-cpu ."),
        ("-p speech=false", "-p speak=false"),
        ("--from-literal=keys=key1,key2", "--from-literal=keys=key1,key2 '"),
    ],
)
def test_a_document_edit_that_breaks_a_command_fails(edit):
    """The checker is not blind: each edit, made to a copy of the document, fails it."""
    manifests = _manifests()
    old, new = edit
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        if old in text:
            break
    else:
        raise AssertionError(f"{old!r} is in no document any more: update this test")
    with pytest.raises(AssertionError):
        for cmd in document_commands(document, text.replace(old, new)):
            check_command(cmd, manifests)


# -- running the README's chain ----------------------------------------------------
def _duet(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [str(DUET), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def _newcomer_env() -> dict[str, str]:
    """This process's environment without the keys a newcomer has not set (the chain
    reads the key `duet serve` generates and prints)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DUET_API_KEYS", "DUET_API_KEY")}
    return {**env, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A folder laid out like a fresh clone: what the documents read is there, nothing
    the chain writes (the newcomer's own folder, relative paths)."""
    root = tmp_path_factory.mktemp("clone")
    for entry in CLONE_ENTRIES:
        (root / entry).symlink_to(REPO / entry)
    return root


@pytest.fixture(scope="module")
def quick_demo(clone) -> subprocess.CompletedProcess:
    """``duet demo`` with ``SMALLEST``'s settings, once for the module (the README's
    chain ends with the same command and reuses this run)."""
    return _duet(["demo", *SMALLEST["duet demo"].split()], clone, timeout=900)


@pytest.mark.slow
def test_quick_demo_then_probe_from_a_fresh_folder_with_relative_paths(clone, quick_demo):
    from pipelines.train.config import DataConfig
    from pipelines.train.data import load_clip_rows
    from pipelines.train.vocabulary import vocabulary_of

    demo = quick_demo
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    out = clone / "demo_out"
    (manifest,) = (out / "curated" / "manifest").glob("v=*/clips.parquet")
    assert (out / "generated.mp4").stat().st_size > 0
    # Progress while training, as lines (the output is not a terminal).
    for stage in ("vae", "pretrain", "sft"):
        assert f"train {stage}: step" in demo.stdout, demo.stdout[-4000:]
    # The trained checkpoint records the words of the captions it trained on.
    meta = json.loads((out / "train-quick" / "sft" / "final" / "config.json").read_text())
    rows = load_clip_rows(DataConfig(curated_uri=str(out / "curated")), meta["config"]["fps"])
    assert rows and meta["extra"]["caption_vocabulary"] == vocabulary_of(r.text for r in rows)

    # The natural next step: probe what the demo generated.
    probe = _duet(["probe", "demo_out/generated.mp4"], clone, timeout=300)
    assert probe.returncode == 0, probe.stderr[-4000:]
    assert json.loads(probe.stdout)["num_frames"] > 0
    assert "generation metadata, not ground truth" in probe.stderr


def _with_smallest(text: str, values: dict[str, str]) -> str:
    """The documented command, its placeholders replaced and its smallest settings added."""
    for placeholder, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<![\w.]){re.escape(placeholder)}(?![\w])", value.format(**values), text)
    words = shlex.split(text)
    plain = " ".join(["duet", *words[1:]]) if duet_argv(words) is not None else text
    for prefix, extra in SMALLEST.items():
        if plain == prefix or plain.startswith(prefix + " "):
            text += " " + extra.format(**values)
    return text


def _bash(prelude: list[str], text: str, cwd: Path, **kwargs) -> list[str]:
    """``bash -c``: the block's ``source``/``export`` lines so far, then the command."""
    return ["bash", "-c", "set -e\n" + "\n".join([*prelude, text])]


class _Service:
    """A documented ``duet serve``, started in the background as the document says,
    stopped with Ctrl-C's signal at the end of the block."""

    def __init__(self, argv: list[str], cwd: Path):
        env = {**_newcomer_env(), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"duet serve never printed {pattern!r}:\n{''.join(self.lines)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def _one_job_through_the_api(url: str, key: str, prompt: str) -> None:
    from serve.client import DuetClient

    with DuetClient(url, key) as client:
        job = client.submit({"prompt": prompt, "quality": "fast", "duration_s": 1.0, "seed": 0})
        status = client.wait(job.id, timeout_s=300)
        assert status["status"] == "succeeded", status
        assert len(client.video(job.id)) > 1000


def _expect_outputs(words: list[str], cwd: Path, result: subprocess.CompletedProcess) -> None:
    """What each step of the chain must leave for the next one (relative to ``cwd``)."""
    args = duet_argv(words) or []
    name = " ".join(args[:2])
    if args[:1] == ["synth"]:
        assert list((cwd / args[1]).glob("*.mp4")) and list((cwd / args[1]).glob("*.json"))
    elif args[:1] == ["probe"]:
        assert json.loads(result.stdout)["num_frames"] > 0
    elif args[:1] == ["curate"]:
        out = cwd / args[args.index("--out") + 1]
        assert list((out / "manifest").glob("v=*/clips.parquet")), name
    elif args[:2] == ["train", "all"]:
        run = cwd / args[args.index("--run") + 1]
        for stage in ("vae", "pretrain", "sft", "rlhf", "distill"):
            assert (run / stage / "final" / "config.json").exists(), stage
    elif args[:1] == ["generate"]:
        out = cwd / args[args.index("--out") + 1]
        assert out.stat().st_size > 1000 and out.with_suffix(".json").exists()
    elif args[:1] == ["batch"]:
        import pyarrow.parquet as pq

        rows = pq.read_table(cwd / args[args.index("--out") + 1] / "results.parquet").to_pylist()
        assert rows and all(r["status"] == "succeeded" for r in rows), rows


def run_readme_chain(
    clone: Path, quick_demo: subprocess.CompletedProcess, commands: list[Command], port: int
) -> list[str]:
    """Run ``commands`` in order in ``clone``, serving on ``port``; returns what ran."""
    (clone / "quick-train.toml").write_text(QUICK_TRAIN)
    values = {"port": str(port), "key": "", "quick_train": "quick-train.toml"}
    prelude: list[str] = []
    services: list[_Service] = []
    ran: list[str] = []
    try:
        for cmd in commands:
            text = _with_smallest(cmd.text, values)
            words = shlex.split(text)
            args = duet_argv(words)
            if words[0] in ("source", "export"):
                prelude.append(text)
                continue
            if words[0] == "make":
                continue  # the suite itself (`make test`, `make demo`): parsed above
            if args is not None and ("--ray-address" in args or args[:1] == ["deploy"]):
                parse_duet(args)  # needs a cluster: parsed here, run by test_stack_e2e
                continue
            ran.append(text)
            if args is not None and args[:1] == ["serve"]:
                assert cmd.background, f"{cmd.where()}: without & the chain stops here"
                service = _Service(_bash(prelude, text, clone), clone)
                services.append(service)
                key = service.wait_for(r"generated one for this run: (\S+)").group(1)
                url = service.wait_for(r"web page: (http://\S+)").group(1)
                values["key"] = key
                assert f":{values['port']}/" in url, url
                prompt = next(shlex.split(c.text) for c in commands if "--prompt" in c.text)
                _one_job_through_the_api(url, key, prompt[prompt.index("--prompt") + 1])
                continue
            if (
                args is not None
                and args[:1] == ["demo"]
                and words[1:] == ["demo", *SMALLEST["duet demo"].split()]
            ):
                result = quick_demo  # the same command in the same folder: run once
            else:
                result = subprocess.run(
                    _bash(prelude, text, clone), cwd=clone, capture_output=True, text=True,
                    timeout=900, env=_newcomer_env(),
                )  # fmt: skip
            assert result.returncode == 0, (
                f"{cmd.where()}\nran: {text}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
            _expect_outputs(words, clone, result)
    finally:
        codes = [service.stop() for service in services]
    assert codes == [0] * len(services), "\n".join("".join(s.lines) for s in services)
    return ran


@pytest.mark.slow
def test_the_readme_chain_runs_as_written_with_relative_paths(clone, quick_demo, listen_port):
    """synth -> probe -> curate -> train -> generate -> probe -> serve (one job through
    the HTTP API) -> batch through it -> demo, each reading what the one before wrote."""
    chain = [c for c in document_commands("README.md") if c.text.split()[0] != "make"]
    ran = run_readme_chain(clone, quick_demo, chain, listen_port())
    steps = [shlex.split(t)[1] for t in ran if duet_argv(shlex.split(t)) is not None]
    for step in ("synth", "probe", "curate", "train", "generate", "serve", "batch", "demo"):
        assert step in steps, (step, ran)
    # `duet probe clip.mp4` read the generation metadata `duet generate` wrote beside it.
    meta = json.loads((clone / "clip.json").read_text())
    assert meta["kind"] == "generation" and meta["checkpoint"].endswith("run/sft/final")


def commands_of_help() -> Iterator[str]:
    """The example commands ``duet --help`` shows (continuation lines joined)."""
    result = _duet(["--help"], REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80  # as tests/test_cli.py
    pending = ""
    for line in result.stdout.splitlines():
        line = line.strip()
        if pending or line.startswith("duet "):
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            yield _strip_comment(pending + line)
            pending = ""


def _parsed(args: list[str]) -> tuple:
    """A duet command as the CLI reads it: the same command in another option order
    or spelling parses the same."""
    return tuple(sorted((k, str(v)) for k, v in parse_duet(args).items())) + (args[0],)


def test_the_help_examples_are_the_readme_chain():
    """``duet --help`` shows commands of the README's chain (so they run in the slow
    test above)."""
    readme = {
        _parsed(args)
        for c in document_commands("README.md")
        if (args := duet_argv(shlex.split(c.text))) and "--help" not in args
    }
    examples = list(commands_of_help())
    assert len(examples) >= 5, examples
    for example in examples:
        assert _parsed(shlex.split(example)[1:]) in readme, example
