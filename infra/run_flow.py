"""Run one flow by its deployment entrypoint with JSON parameters (a RayJob's entrypoint).

    python -m infra.run_flow flows/curate.py:curate --parameters '{"input_glob": ...}'

The parameters are the ones the Prefect deployment of the same flow schedules
(:func:`infra.kuberay.rayjob_entrypoint` writes them from the deploy config), so a
RayJob run and a Prefect run of a flow differ only in where they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Duet's Prefect settings (analytics off, a start-up timeout for the ephemeral server
# that a busy machine meets) are set when ``flows`` is imported, before Prefect is.
import flows  # noqa: F401
from infra.config import REPO_ROOT


def load_flow(entrypoint: str):
    """The flow object at ``path/to/file.py:name`` (relative to the repository root)."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = entrypoint.partition(":")
    if not path.endswith(".py") or not name:
        raise ValueError(f"entrypoint must look like flows/x.py:flow_name, got {entrypoint!r}")
    return load_flow_from_entrypoint(f"{REPO_ROOT / path}:{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entrypoint", help="flows/FILE.py:FLOW")
    parser.add_argument("--parameters", default="{}", help="the flow's parameters as JSON")
    args = parser.parse_args(argv)
    parameters = json.loads(args.parameters)
    if not isinstance(parameters, dict):
        parser.error("--parameters must be a JSON object")
    # Relative URIs in the parameters (config files shipped with the code) are
    # relative to the project root, as in a Prefect deployment's pull step.
    os.chdir(REPO_ROOT)
    result = load_flow(args.entrypoint)(**parameters)
    print(json.dumps(result, indent=2, default=str, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
