"""``duet``: one command with a subcommand per job.

Each subcommand lives in its own module and imports its heavy dependencies
inside the command body, so ``duet --help`` stays fast.
"""

from __future__ import annotations

import typer

from cli import curate, demo, generate, model, probe, serve, stack, synth, train

app = typer.Typer(
    name="duet",
    help="Duet: curate footage, train and serve a joint audio-video diffusion model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Click's plain help: option names are never cut, text wraps under them at 80
    # columns (rich's boxed panels cut names such as --caption-backend there).
    rich_markup_mode=None,
)

app.command("synth")(synth.synth)
app.command("probe")(probe.probe)
app.add_typer(model.app, name="model")
app.command("generate")(generate.generate)
app.command("curate")(curate.curate)
app.command("train")(train.train)
app.command("serve")(serve.serve)
app.command("batch")(serve.batch)
app.command("demo")(demo.demo)
app.add_typer(stack.app, name="stack")
app.command("deploy")(stack.deploy)
app.command("manifests")(stack.manifests)


if __name__ == "__main__":
    app()
