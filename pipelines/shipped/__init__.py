"""The shipped default checkpoint: what a one-GPU training run carries, the run, its quality.

An offline GPU host may start bare (no PyAV to decode clips, no text-encoder weights, no
Ray) and take only a small bundle of files (64 MiB by default). :mod:`.carry` packs the curated clips (cut to
the one frame bucket trained on), the text encoder's embeddings of their captions and
PyAV's wheel; :mod:`.gpu_job` installs them there and runs the ``vae -> pretrain ->
sft`` stages of :mod:`pipelines.train` unchanged inside a wall-clock budget, exporting
bf16 weights in shards small enough to come back. :mod:`.trim_encoder` writes a
copy of the text encoder cut to the vocabulary a run uses, for hosts without it. :mod:`.quality` and
:mod:`.eval_job` measure a checkpoint on held-out prompts with the world's probes.
"""
