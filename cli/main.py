"""``duet``: one command with a subcommand per job.

Each subcommand lives in its own module and imports its heavy dependencies
inside the command body, so ``duet --help`` stays fast.
"""

from __future__ import annotations

import typer

from cli import curate, demo, generate, model, prefs, probe, sequences, serve, stack, synth, train
from cli.common import one_line_errors

app = typer.Typer(
    name="duet",
    help="Duet: curate footage, train and serve a joint audio-video diffusion model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Click's plain help: option names are never cut, text wraps under them at 80
    # columns (rich's boxed panels cut names such as --caption-backend there).
    rich_markup_mode=None,
    # The README's newcomer chain (tests/test_docs.py checks each line is one of it);
    # "\b" keeps Click from rewrapping the lines.
    epilog="\b\nFrom footage to a served model, each step reading the one before:\n"
    "  duet synth raw --num-videos 20 --seed 0\n"
    "  duet curate 'raw/*.mp4' --out curated\n"
    "  duet train all --data curated --run run\n"
    "  duet generate --checkpoint run/sft/final --out clip.mp4 \\\n"
    '      --prompt "two red circles bounce on a gray floor"\n'
    "  duet probe clip.mp4\n"
    "  duet serve --config serve/example.toml --checkpoint run/sft/final\n"
    "Every path is a URI (local, file://, s3://); the README shows the whole chain.",
)

app.command("synth")(synth.synth)
app.command("probe")(probe.probe)
app.add_typer(model.app, name="model")
app.add_typer(prefs.app, name="prefs")
app.command("generate")(generate.generate)
app.command("curate")(curate.curate)
app.command("sequences")(sequences.sequences)
app.command("train")(train.train)
app.command("serve")(serve.serve)
app.command("batch")(serve.batch)
app.command("demo")(demo.demo)
app.add_typer(stack.app, name="stack")
app.command("deploy")(stack.deploy)
app.command("manifests")(stack.manifests)


def _one_line_errors_everywhere(typer_app: typer.Typer) -> None:
    """Every command, of every group, prints the errors a user can cause as one line
    (cli/common.py), including commands added later."""
    for info in typer_app.registered_commands:
        if not getattr(info.callback, "__wrapped__", None):
            info.callback = one_line_errors(info.callback)
    for group in typer_app.registered_groups:
        _one_line_errors_everywhere(group.typer_instance)


_one_line_errors_everywhere(app)


if __name__ == "__main__":
    app()
