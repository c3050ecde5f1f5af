"""The shipped default checkpoint: what a one-GPU training run carries, and the run itself.

The lent GPU machine starts bare (no PyAV to decode clips, no text-encoder weights, no
Ray) and takes at most 64 MiB of files. So the CPU side does what needs those
(curation, the ``vae`` stage, encoding every clip into the trainer's latent cache) and
:mod:`.carry` packs the result compactly (fp16 latents, one text-embedding table);
:mod:`.gpu_job` unpacks it there into the trainer's own layout and runs the
``pretrain -> sft`` stages of :mod:`pipelines.train` inside a wall-clock budget,
exporting bf16 weights in shards small enough to come back.
"""
