"""Did a stage help? Probe scores of checkpoints on held-out prompts, paired over (prompt, seed).

    python -m bench.stage_gains --base RUN/pretrain/final --models RUN/sft/final --seeds 32
    python -m bench.stage_gains --base RUN/rlhf/final --models RUN/distill/final --fast RUN/distill/final

Every model generates every (prompt, seed) pair through the users' path
(``model.generate``; Full = Heun, 20 steps, text guidance 4; a model named in
``--fast`` = its Fast path, 4 Euler steps, guidance distilled in) and the
programmatic rater scores the clips (``pipelines.align.rater``). Printed per model:
the mean and standard error of each head over the pairs; per model after the base:
the paired difference from the base (mean +- se over the same prompt and seed, which
removes the prompt-to-prompt spread that dominates unpaired errors) and the ratio of
means; and adherence per prompt.

Prompts: ``--prompts "a;b"``, else the held-out alignment prompts of the base's run
(``pipelines.align.stages.prompt_sets`` on the run's training config, whose manifest
must be readable). ``--train-prompts`` also scores the training prompts, which tells
a generalisation gap (a student that keeps its teacher's scores on the prompts it was
distilled on but not on held-out ones) from a model that is simply worse.

On a machine without the text encoder (an offline GPU host), ``--text-table FILE``
serves token embeddings from a safetensors table made here with ``--make-text-table``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(";") if p.strip()]


def run_prompts(base_uri: str) -> tuple[list[str], list[str]]:
    """(training, held-out) alignment prompts of the run that wrote ``base_uri``."""
    from core import storage
    from pipelines.align.stages import prompt_sets
    from pipelines.train.config import train_config_from

    extra = storage.read_json(f"{base_uri}/config.json").get("extra", {})
    if "train_config" not in extra:
        raise SystemExit(f"{base_uri} records no training config: pass --prompts")
    return prompt_sets(train_config_from(extra["train_config"]))


def make_text_table(path: str, prompts: list[str]) -> None:
    """Embeddings of ``prompts`` and of the empty prompt (unconditional branch), fp16."""
    from safetensors.torch import save_file

    from model.text_encoder import FrozenTextEncoder

    encoder = FrozenTextEncoder()
    texts = dict.fromkeys(["", *prompts])
    save_file({t: encoder.embed_tokens(t).half().contiguous() for t in texts}, path)
    print(f"wrote {len(texts)} embeddings to {path}")


def per_prompt(result: dict, key: str = "adherence") -> dict[str, float]:
    values = collections.defaultdict(list)
    for row in result["rows"]:
        values[row["prompt"]].append(row[key])
    return {p: round(statistics.fmean(v), 3) for p, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="checkpoint the others are compared with")
    parser.add_argument("--models", nargs="*", default=[], help="checkpoints to compare")
    parser.add_argument("--fast", nargs="*", default=[], help="of those, the Fast students")
    parser.add_argument("--prompts", default="", help="';'-separated (default: held-out)")
    parser.add_argument("--train-prompts", action="store_true")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--text-table", default="")
    parser.add_argument("--make-text-table", default="", help="write the table and stop")
    parser.add_argument("--json", default="", help="also write every rated row here")
    args = parser.parse_args()

    import torch

    from model.pipeline import DuetPipeline
    from pipelines.align.config import HEADS
    from pipelines.align.evaluate import EvalSettings, evaluate_prompts, paired_difference

    if args.threads:
        torch.set_num_threads(args.threads)
    train_prompts, held_out = run_prompts(args.base) if not args.prompts else ([], [])
    held_out = _split(args.prompts) or held_out
    if args.make_text_table:
        make_text_table(args.make_text_table, held_out + train_prompts)
        return
    if args.text_table:
        from pipelines.shipped.carry import use_text_table_file

        use_text_table_file(args.text_table)
    prompt_sets = {"held_out": held_out}
    if args.train_prompts:
        if not train_prompts:
            raise SystemExit("--train-prompts needs the run's prompts (no --prompts)")
        prompt_sets["train"] = train_prompts

    full = EvalSettings(seeds=tuple(range(args.seeds)))
    fast = EvalSettings(seeds=full.seeds, quality="fast", steps=4, sampler="euler")
    report = {"seeds": args.seeds, "device": args.device, "prompts": prompt_sets, "models": {}}
    for uri in [args.base, *args.models]:
        pipeline = DuetPipeline.from_checkpoint(uri).to(args.device)
        settings = fast if uri in args.fast else full
        started = time.perf_counter()
        report["models"][uri] = {
            name: evaluate_prompts(pipeline, prompts, settings)
            for name, prompts in prompt_sets.items()
        }
        print(f"{uri}: {settings.quality}, {time.perf_counter() - started:.0f} s")

    base = report["models"][args.base]
    for set_name in prompt_sets:
        print(f"\n## {set_name} prompts, {args.seeds} seeds each")
        for uri, results in report["models"].items():
            summary = results[set_name]["summary"]
            cells = [f"{h} {summary[h]['mean']:.3f} +- {summary[h]['se']:.3f}" for h in HEADS]
            print(f"{uri}: " + "; ".join(cells))
            print(f"  adherence per prompt: {per_prompt(results[set_name])}")
            if uri == args.base:
                continue
            for h in HEADS:
                diff, se = paired_difference(base[set_name], results[set_name], h)
                mean_base = base[set_name]["summary"][h]["mean"]
                ratio = summary[h]["mean"] / mean_base if mean_base else float("nan")
                print(f"  {h}: {diff:+.3f} +- {se:.3f} paired over the base; ratio {ratio:.3f}")
    if args.json:
        from core import storage

        storage.write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
