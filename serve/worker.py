"""The work a model replica does: jobs in the store -> clips in the store.

:class:`ModelWorker` is plain Python (no Ray): the Serve model deployment wraps it,
and so does the in-process backend that the API tests and ``duet serve --local``
use. It reads only what the ingress already checked and stored under the job
(references are never fetched here), runs compatible jobs as one denoising batch
(``pipelines.generation``), reports progress and a heartbeat into the job record,
stops a job whose cancel marker appears, and records every failure with a reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from core import storage
from model.configs import ModelConfig, get_config
from model.generate import EditSpec, GenerationRequest, GivenMedia, ReferenceSet
from model.multishot import ShotPlan
from model.pipeline import DuetPipeline
from pipelines.generation import (
    GenerationCancelled,
    aspect_size,
    center_crop,
    generate_many,
)
from serve.config import LimitsConfig, ModelDeploymentConfig, ServeConfig
from serve.examples import model_examples
from serve.jobs import JobRecord, JobStore

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.5
# Loading imports transformers lazily, which is not safe from two threads at once
# (the in-process backend has a thread per quality).
_LOAD_LOCK = threading.Lock()


class NoCheckpointError(RuntimeError):
    """Nothing to serve: no checkpoint configured, none shipped, random weights not allowed."""


def checkpoint_for(config: ServeConfig, model: str, quality: str) -> str | None:
    """The checkpoint URI for a model name (None: random weights of the allowed preset)."""
    from model.checkpoint import DEFAULT_CHECKPOINT_ENV, default_checkpoint

    if model != "default":
        if model not in config.models:
            raise KeyError(f"unknown model {model!r}; served models: {served_models(config)}")
        return config.models[model]
    deployment = config.deployment(quality)
    found = deployment.checkpoint or config.checkpoint or default_checkpoint()
    if found:
        return found
    if config.random_weights_preset:
        return None
    raise NoCheckpointError(
        "no checkpoint to serve: set checkpoint in the serve config, set "
        f"{DEFAULT_CHECKPOINT_ENV}, or ship checkpoints/default/ (random_weights_preset "
        "serves untrained weights for smoke tests)"
    )


def served_models(config: ServeConfig) -> list[str]:
    return ["default", *sorted(config.models)]


def model_config_for(config: ServeConfig, quality: str = "full") -> ModelConfig:
    """The served model's config without loading weights (fps, size, rates)."""
    from model.checkpoint import model_config, read_meta

    uri = checkpoint_for(config, "default", quality)
    if uri is None:
        return get_config(config.random_weights_preset)
    return model_config(read_meta(uri), uri)


def distilled_modes(config: ServeConfig, model: str, quality: str) -> list[str] | None:
    """The request modes a distilled Fast student serving ``model`` at ``quality`` learnt
    (``extra.fast.modes`` of its checkpoint; a student records none: plain
    text-to-audio-video, ``["t2av"]``), or None when that checkpoint is not a student."""
    from model.checkpoint import read_meta

    uri = checkpoint_for(config, model, quality)
    if uri is None:
        return None
    fast = read_meta(uri).get("extra", {}).get("fast")
    if not fast:
        return None
    return [str(m) for m in fast.get("modes", ["t2av"])]


def serving_facts(config: ServeConfig) -> dict:
    """What the API states and checks about the served models (no weights loaded)."""
    cfg = model_config_for(config)
    models = served_models(config)
    return {
        "fps": float(cfg.fps),
        "resolutions": allowed_resolutions(cfg),
        "models": models,
        "fast_modes": {m: distilled_modes(config, m, "fast") for m in models},
        "full_is_student": {m: distilled_modes(config, m, "full") is not None for m in models},
        # The web page's example prompts: what the default model was trained on.
        "examples": model_examples(checkpoint_for(config, "default", "full")),
    }


def load_pipeline(config: ServeConfig, model: str, quality: str) -> DuetPipeline:
    uri = checkpoint_for(config, model, quality)
    if uri is None:
        return DuetPipeline.from_preset(config.random_weights_preset).eval()
    return DuetPipeline.from_checkpoint(uri).eval()


@dataclass
class _Prepared:
    record: JobRecord
    request: GenerationRequest
    negative: str


class ModelWorker:
    """Runs jobs of one quality on pipelines it loads (one per model name)."""

    def __init__(self, config: ServeConfig, quality: str, replica: str | None = None):
        import torch

        self.config = config
        self.quality = quality
        self.deployment: ModelDeploymentConfig = config.deployment(quality)
        self.store = JobStore(config.jobs_uri)
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.pipelines: dict[str, DuetPipeline] = {}
        self.lock = threading.Lock()  # one generation at a time per replica
        self.last_error: str | None = None
        torch.set_num_threads(max(1, self.deployment.torch_threads))

    def pipeline(self, model: str = "default") -> DuetPipeline:
        with _LOAD_LOCK:
            if model not in self.pipelines:
                pipeline = load_pipeline(self.config, model, self.quality)
                pipeline.encode_text(["warm-up"])  # loads the text encoder now
                self.pipelines[model] = pipeline
        return self.pipelines[model]

    # -- one batch -----------------------------------------------------------------
    def run_jobs(self, job_ids: list[str], model: str = "default") -> list[dict]:
        """Run the jobs (each once); returns ``{"id", "status", "error"}`` per job, in order."""
        return self.run_jobs_on(self.pipeline(model), job_ids)

    def run_jobs_on(self, pipeline: DuetPipeline, job_ids: list[str]) -> list[dict]:
        with self.lock:
            return self._run_jobs(job_ids, pipeline)

    def _run_jobs(self, job_ids: list[str], pipeline: DuetPipeline) -> list[dict]:
        outcome: dict[str, dict] = {}
        prepared: list[_Prepared] = []
        for job_id in job_ids:
            record = self.store.load(job_id)
            if record is None:
                outcome[job_id] = {"id": job_id, "status": "failed", "error": "no such job"}
                continue
            if record.terminal:
                outcome[job_id] = {"id": job_id, "status": record.status, "error": record.error}
                continue
            beat = record.heartbeat_at or 0.0
            if (
                record.status == "running"
                and record.replica != self.replica
                and time.time() - beat < self.config.stale_after_s
            ):
                # Dispatched twice (an ingress restarted): the other replica has it.
                outcome[job_id] = {"id": job_id, "status": "running", "error": None}
                continue
            if self.store.cancel_requested(job_id):
                self._finish(record, "cancelled", None)
                outcome[job_id] = {"id": job_id, "status": "cancelled", "error": None}
                continue
            now = time.time()
            record.status, record.started_at, record.heartbeat_at = "running", now, now
            record.replica, record.progress, record.error = self.replica, 0.0, None
            self.store.save(record)
            try:
                # A Fast job run here by fallback samples at the Fast deployment's steps.
                deployment = self.config.deployment(record.quality)
                request, negative = build_request(
                    record, self.store, pipeline, deployment, self.config.limits
                )
            except Exception as err:  # a bad stored input fails this job only
                self._finish(record, "failed", f"{type(err).__name__}: {err}")
                outcome[job_id] = {"id": job_id, "status": "failed", "error": record.error}
                continue
            prepared.append(_Prepared(record, request, negative))

        if prepared:
            self._generate(prepared, pipeline, outcome)
        return [outcome[j] for j in job_ids]

    def _generate(self, prepared: list[_Prepared], pipeline: DuetPipeline, outcome: dict) -> None:
        last_write = [0.0] * len(prepared)

        def progress(index: int, fraction: float) -> None:
            now = time.monotonic()
            if now - last_write[index] < PROGRESS_WRITE_INTERVAL_S and fraction < 1.0:
                return
            last_write[index] = now
            record = prepared[index].record
            if self.store.cancel_requested(record.id):
                raise GenerationCancelled(record.id)
            record.progress = round(0.95 * fraction, 4)
            record.heartbeat_at = time.time()
            self.store.save(record)

        started = time.perf_counter()
        results = generate_many(
            pipeline,
            [p.request for p in prepared],
            [p.negative for p in prepared],
            progress=progress,
            quality=self.quality,
            max_batch=self.deployment.max_batch_size,
        )
        per_job_s = (time.perf_counter() - started) / len(prepared)
        cpus = max(self.deployment.num_cpus, self.deployment.num_gpus)
        for item, result in zip(prepared, results, strict=True):
            record = item.record
            record.compute_s = round(per_job_s * cpus, 3)
            if isinstance(result, GenerationCancelled) or self.store.cancel_requested(record.id):
                self._finish(record, "cancelled", None)
            elif isinstance(result, Exception):
                self._finish(record, "failed", f"{type(result).__name__}: {result}")
            else:
                try:
                    self._write_output(record, result)
                    self._finish(record, "succeeded", None)
                except Exception as err:
                    self._finish(record, "failed", f"writing the output: {err}")
            outcome[record.id] = {"id": record.id, "status": record.status, "error": record.error}

    def _write_output(self, record: JobRecord, result) -> None:
        from core.media import AVClip, write_mp4

        clip = result.clip
        width, height = _resolution(record.spec, clip.width, clip.height)
        if (width, height) != (clip.width, clip.height):
            clip = AVClip(
                frames=center_crop(clip.frames, width, height),
                fps=clip.fps,
                audio=clip.audio,
                sample_rate=clip.sample_rate,
            )
        video_uri = self.store.output_uri(record.id)
        write_mp4(video_uri, clip)
        metadata = {
            **result.metadata,
            "job_id": record.id,
            "quality": record.quality,
            "model": record.model,
            "deployment": record.deployment,
            "width": width,
            "height": height,
            "video": video_uri,
        }
        if record.fallback:
            metadata["fallback"] = record.fallback
        meta_uri = self.store.metadata_uri(record.id)
        storage.write_json(meta_uri, metadata)
        record.output_uri, record.metadata_uri = video_uri, meta_uri

    def _finish(self, record: JobRecord, status: str, error: str | None) -> None:
        record.status, record.error = status, error
        record.finished_at = time.time()
        if status == "succeeded":
            record.progress = 1.0
        if error:
            self.last_error = error
            log.warning("job %s %s: %s", record.id, status, error)
        self.store.save(record)


def _resolution(spec: dict, native_w: int, native_h: int) -> tuple[int, int]:
    text = spec.get("resolution")
    if not text:
        return native_w, native_h
    w, h = (int(x) for x in text.lower().split("x"))
    return w, h


def allowed_resolutions(cfg: ModelConfig) -> list[str]:
    """The native size and centre crops of it at the common aspect ratios."""
    from pipelines.generation import ASPECT_RATIOS

    sizes = [f"{cfg.width}x{cfg.height}"]
    for aspect in ASPECT_RATIOS:
        w, h = aspect_size(cfg.width, cfg.height, aspect)
        if f"{w}x{h}" not in sizes:
            sizes.append(f"{w}x{h}")
    return sizes


def build_request(
    record: JobRecord,
    store: JobStore,
    pipeline: DuetPipeline,
    deployment: ModelDeploymentConfig,
    limits: LimitsConfig | None = None,
) -> tuple[GenerationRequest, str]:
    """The model request for a stored job (its inputs were probed at submit; they are
    decoded here within the same limits, frame by frame, in case a header lied)."""
    from serve.guards import (
        _probe_image,
        read_reference_audio,
        read_reference_video,
        read_source_clip,
    )

    spec = record.spec
    cfg = pipeline.config
    inputs = record.inputs or {}
    limits = limits or LimitsConfig()
    size = (cfg.width, cfg.height)
    references = None
    if any(inputs.get(k) for k in ("images", "videos", "audios")):
        references = ReferenceSet(
            images=[
                _probe_image(storage.read_bytes(u), limits, u) for u in inputs.get("images", [])
            ],
            videos=[read_reference_video(u, limits, size) for u in inputs.get("videos", [])],
            audios=[
                read_reference_audio(u, limits, cfg.sample_rate) for u in inputs.get("audios", [])
            ],
        )
    mode = spec.get("mode", "t2av")
    shots = None
    edit = None
    given = None
    if mode == "multishot":
        shots = ShotPlan.from_json({"subject": spec.get("subject") or "", "shots": spec["shots"]})
    elif mode == "v2v":
        (source_uri,) = inputs["source"]
        source = read_source_clip(source_uri, limits, cfg.sample_rate, size)
        keep = "audio" if spec.get("keep_audio") else "video" if spec.get("keep_video") else "none"
        edit = EditSpec(source=source, strength=float(spec.get("strength", 0.6)), keep=keep)
    elif mode == "v2a":
        (source_uri,) = inputs["source"]
        source = read_source_clip(source_uri, limits, cfg.sample_rate, size)
        given = GivenMedia("v2a", frames=source.frames, fps=source.fps)
    elif mode == "a2v":
        (source_uri,) = inputs["source"]
        audio = read_reference_audio(source_uri, limits, cfg.sample_rate)
        given = GivenMedia("a2v", audio=audio, sample_rate=cfg.sample_rate)
    request = GenerationRequest(
        prompt=spec.get("prompt") or "",
        duration_s=float(spec.get("duration_s", 2.0)),
        seed=int(spec.get("seed", 0)),
        steps=deployment.steps,
        sampler=deployment.sampler,
        references=references,
        shots=shots,
        edit=edit,
        given=given,
    )
    return request, spec.get("negative_prompt") or ""
