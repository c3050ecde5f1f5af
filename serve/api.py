"""The HTTP API and web page (FastAPI), independent of how jobs are run.

``build_api(config, backend)`` returns the FastAPI app that the Serve ingress
deployment wraps (``serve.app``) and that tests drive in-process. Request models are
built from the configured limits, so the served OpenAPI states them; limits that
depend on the request as a whole (references, uploads, shots) are checked in code
and refused with a 4xx that names the limit.
"""

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import storage
from serve.config import ServeConfig
from serve.dispatch import Backend, Dispatcher
from serve.guards import (
    KINDS,
    GuardError,
    api_key_matches,
    check_reference_uri,
    probe_reference,
    read_reference_bytes,
)
from serve.jobs import JobRecord, JobStore, new_job_id

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
_EXTENSIONS = {"images": ".img", "videos": ".video", "audios": ".audio", "source": ".video"}


class ErrorBody(BaseModel):
    detail: str


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    quality: Literal["fast", "full"]
    model: str
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int
    error: str | None = None
    compute_s: float | None = None
    prompt: str
    video_url: str | None = None
    metadata_url: str | None = None


class JobList(BaseModel):
    jobs: list[JobStatus]


class ServiceInfo(BaseModel):
    qualities: list[str]
    modes: list[str]
    models: list[str]
    fps: float
    resolutions: list[str]
    limits: dict[str, Any]


def request_models(config: ServeConfig, model_facts: dict[str, Any]):
    """Pydantic request models carrying the configured limits and the served models and
    sizes (shown in OpenAPI)."""
    limits = config.limits
    Resolution = Literal[tuple(model_facts["resolutions"])]  # noqa: N806
    ModelName = Literal[tuple(model_facts["models"])]  # noqa: N806
    text = Annotated[str, Field(max_length=limits.max_prompt_chars)]

    class Shot(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars)]
        duration_s: Annotated[float, Field(gt=0, le=limits.max_duration_s)]
        transition: Literal["cut", "fade"] = "cut"
        fade_s: Annotated[float, Field(gt=0, le=limits.max_duration_s)] = 0.5

    class References(BaseModel):
        model_config = ConfigDict(extra="forbid")
        images: Annotated[
            list[Annotated[str, Field(max_length=2048)]], Field(max_length=limits.max_images)
        ] = []  # noqa: E501
        videos: Annotated[
            list[Annotated[str, Field(max_length=2048)]], Field(max_length=limits.max_videos)
        ] = []  # noqa: E501
        audios: Annotated[
            list[Annotated[str, Field(max_length=2048)]], Field(max_length=limits.max_audios)
        ] = []  # noqa: E501

    class JobRequest(BaseModel):
        """One generation job. URIs in ``references``/``source`` must pass the server's
        URI policy; files can be uploaded instead with ``POST /v1/jobs/upload``."""

        model_config = ConfigDict(extra="forbid")
        prompt: text = ""
        negative_prompt: text = ""
        duration_s: Annotated[float, Field(gt=0, le=limits.max_duration_s)] = 2.0
        fps: Annotated[float, Field(gt=0, le=120)] | None = None
        resolution: Resolution | None = None  # type: ignore[valid-type]
        seed: Annotated[int, Field(ge=0, le=limits.max_seed)] = 0
        quality: Literal["fast", "full"] = "fast"
        mode: Literal["t2av", "v2v", "multishot"] = "t2av"
        strength: Annotated[float, Field(gt=0, le=1)] = 0.6
        keep_audio: bool = False
        keep_video: bool = False
        subject: text = ""
        shots: Annotated[list[Shot], Field(max_length=limits.max_shots)] = []
        references: References = References()
        source: Annotated[str, Field(max_length=2048)] | None = None
        model: ModelName = "default"  # type: ignore[valid-type]

    return JobRequest, References, Shot


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 422:
        body = {"detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


_ERRORS = {
    400: {"model": ErrorBody, "description": "Bad request"},
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    403: {"model": ErrorBody, "description": "A reference URI the server may not read"},
    413: {"model": ErrorBody, "description": "Over a size limit"},
    415: {"model": ErrorBody, "description": "An upload that is not the media it claims"},
    429: {"model": ErrorBody, "description": "Queue full: retry after Retry-After seconds"},
    503: {"model": ErrorBody, "description": "Not ready: retry after Retry-After seconds"},
}
_JOB_ERRORS = {**_ERRORS, 404: {"model": ErrorBody, "description": "No such job"}}


def build_api(config: ServeConfig, backend: Backend, model_facts: dict[str, Any]) -> FastAPI:
    """The FastAPI app. ``model_facts``: ``fps``, ``resolutions``, ``models`` served."""
    store = JobStore(config.jobs_uri)
    dispatcher = Dispatcher(config, store, backend)
    keys = config.all_api_keys()
    if not keys:
        raise ValueError(
            "no API keys configured: set api_keys in the serve config or DUET_API_KEYS"
        )
    JobRequest, _, _ = request_models(config, model_facts)
    limits = config.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Jobs accepted by an earlier ingress and never finished are picked up.
        dispatcher.start_sweeper(every_s=max(1.0, min(5.0, config.stale_after_s / 4)))
        yield
        await dispatcher.close()

    app = FastAPI(
        title="Duet generation API",
        version="1",
        description="Submit audio-video generation jobs, poll them, fetch the MP4.",
        lifespan=lifespan,
    )
    app.state.dispatcher = dispatcher
    app.state.store = store
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    def require_key(provided: str | None) -> None:
        if not api_key_matches(provided, keys):
            raise GuardError(401, f"missing or wrong API key (send it in {API_KEY_HEADER})")

    @app.exception_handler(GuardError)
    async def guard_error(request: Request, err: GuardError):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        # FastAPI's own shape, minus the echoed input (it can be a large upload).
        errors = [
            {
                "loc": list(e.get("loc", [])),
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type")),
            }
            for e in err.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_request_bytes):
            return _error(413, f"request body over the limit of {limits.max_request_bytes} bytes")
        return await call_next(request)

    def status_of(record: JobRecord) -> JobStatus:
        done = record.status == "succeeded"
        return JobStatus(
            id=record.id, status=record.status, progress=record.progress,
            quality=record.quality, model=record.model, created_at=record.created_at,
            updated_at=record.updated_at, started_at=record.started_at,
            finished_at=record.finished_at, attempts=record.attempts, error=record.error,
            compute_s=record.compute_s, prompt=str(record.spec.get("prompt", ""))[:200],
            video_url=f"v1/jobs/{record.id}/video" if done else None,
            metadata_url=f"v1/jobs/{record.id}/metadata" if done else None,
        )  # fmt: skip

    def storage_down(err: Exception) -> GuardError:
        log.warning("job storage unavailable: %s", err)
        return GuardError(
            503,
            f"job storage is unavailable ({type(err).__name__}); retry in {limits.retry_after_s} s",
            {"Retry-After": str(limits.retry_after_s)},
        )

    def check_request(job) -> None:
        """Whole-request rules the schema cannot state."""
        if job.model not in model_facts["models"]:
            raise GuardError(422, f"unknown model {job.model!r}; served: {model_facts['models']}")
        if job.fps is not None and abs(job.fps - model_facts["fps"]) > 1e-6:
            raise GuardError(
                422, f"fps {job.fps:g} is not served; this model renders {model_facts['fps']:g} fps"
            )  # noqa: E501
        if job.resolution is not None and job.resolution not in model_facts["resolutions"]:
            raise GuardError(
                422,
                f"resolution {job.resolution} is not served; choose one of {model_facts['resolutions']}",  # noqa: E501
            )
        if job.mode == "multishot":
            if not job.shots:
                raise GuardError(422, "mode multishot needs a shot plan in 'shots'")
            total = sum(s.duration_s for s in job.shots)
            if total > limits.max_duration_s:
                raise GuardError(
                    422, f"the shots last {total:g} s; the limit is {limits.max_duration_s:g} s"
                )  # noqa: E501
        elif not job.prompt.strip():
            raise GuardError(422, "a prompt is required (or mode multishot with shots)")
        if job.mode == "v2v":
            if job.keep_audio and job.keep_video:
                raise GuardError(
                    422, "keep_audio and keep_video cannot both be set: nothing would change"
                )  # noqa: E501
        elif job.keep_audio or job.keep_video:
            raise GuardError(422, "keep_audio / keep_video apply to mode v2v only")
        if job.mode != "multishot" and job.shots:
            raise GuardError(422, "shots apply to mode multishot only")

    async def accept(job, uploads: dict[str, list[tuple[str, bytes]]]) -> JobStatus:
        check_request(job)
        dispatcher.admit(job.quality)
        refs = {k: list(getattr(job.references, k)) for k in KINDS}
        counts = {k: len(refs[k]) + len(uploads.get(k, [])) for k in KINDS}
        maxima = {
            "images": limits.max_images,
            "videos": limits.max_videos,
            "audios": limits.max_audios,
        }  # noqa: E501
        for kind in KINDS:
            if counts[kind] > maxima[kind]:
                raise GuardError(
                    422, f"{counts[kind]} {kind} references; the limit is {maxima[kind]}"
                )  # noqa: E501
        has_source = job.source is not None or bool(uploads.get("source"))
        if job.mode == "v2v" and not has_source:
            raise GuardError(422, "mode v2v needs a source video ('source' URI or upload)")
        if job.mode != "v2v" and has_source:
            raise GuardError(422, "a source video applies to mode v2v only")
        for kind in KINDS:
            for uri in refs[kind]:
                check_reference_uri(uri, config.uri_policy)
        if job.source is not None:
            check_reference_uri(job.source, config.uri_policy)
        job_id = new_job_id()
        try:
            inputs = await asyncio.to_thread(_store_inputs, job_id, job, refs, uploads)
        except GuardError:
            raise
        except OSError as err:
            raise storage_down(err) from err
        record = JobRecord(
            id=job_id, spec=job.model_dump(mode="json"), quality=job.quality, model=job.model,
            inputs=inputs,
        )  # fmt: skip
        try:
            await asyncio.to_thread(store.save, record)
        except OSError as err:
            raise storage_down(err) from err
        dispatcher.start(record)
        return status_of(record)

    def _store_inputs(job_id, job, refs, uploads) -> dict[str, list[str]]:
        """Fetch URI references (policy-checked), probe everything, keep it with the job."""
        stored: dict[str, list[str]] = {}
        items: list[tuple[str, str, bytes]] = []
        for kind in KINDS:
            for i, uri in enumerate(refs[kind]):
                data = read_reference_bytes(uri, config.uri_policy, limits.max_upload_bytes)
                items.append((kind, f"{kind} reference {i} ({uri})", data))
            for name, data in uploads.get(kind, []):
                items.append((kind, f"uploaded {kind[:-1]} {name!r}", data))
        if job.source is not None:
            data = read_reference_bytes(job.source, config.uri_policy, limits.max_upload_bytes)
            items.append(("source", f"source ({job.source})", data))
        for name, data in uploads.get("source", []):
            items.append(("source", f"uploaded source {name!r}", data))
        for kind, label, data in items:
            probe_reference(data, "videos" if kind == "source" else kind, limits, label)
        for kind, _, data in items:
            index = len(stored.setdefault(kind, []))
            uri = store.input_uri(job_id, f"{kind}-{index}{_EXTENSIONS[kind]}")
            storage.write_bytes(uri, data)
            stored[kind].append(uri)
        return stored

    # -- routes ------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("serve").joinpath("static/index.html").read_text()
        return HTMLResponse(html)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: _ERRORS[503]})
    async def readyz():
        try:
            ready = await asyncio.wait_for(backend.ready(), timeout=5.0)
            await asyncio.to_thread(storage.makedirs, config.jobs_uri)
        except Exception as err:
            return _error(503, f"not ready: {err}", {"Retry-After": str(limits.retry_after_s)})
        if not all(ready.values()):
            down = [k for k, v in ready.items() if not v]
            return _error(
                503, f"not ready: {down} unavailable", {"Retry-After": str(limits.retry_after_s)}
            )  # noqa: E501
        return {"status": "ready", **{k: "up" for k in ready}}

    @app.get("/v1/info", response_model=ServiceInfo, responses={401: _ERRORS[401]})
    async def info(api_key: str | None = Security(key_header)) -> ServiceInfo:
        require_key(api_key)
        return ServiceInfo(
            qualities=["fast", "full"], modes=["t2av", "v2v", "multishot"],
            models=model_facts["models"], fps=model_facts["fps"],
            resolutions=model_facts["resolutions"],
            limits={k: v for k, v in vars(limits).items()},
        )  # fmt: skip

    @app.post("/v1/jobs", status_code=202, response_model=JobStatus, responses=_ERRORS)
    async def submit(job: JobRequest, api_key: str | None = Security(key_header)) -> JobStatus:  # type: ignore[valid-type]
        require_key(api_key)
        return await accept(job, {})

    @app.post("/v1/jobs/upload", status_code=202, response_model=JobStatus, responses=_ERRORS)
    async def submit_upload(
        request: Annotated[str, Form(description="The JobRequest as JSON text")] = "{}",
        images: Annotated[list[UploadFile], File()] = [],  # noqa: B006
        videos: Annotated[list[UploadFile], File()] = [],  # noqa: B006
        audios: Annotated[list[UploadFile], File()] = [],  # noqa: B006
        source: Annotated[list[UploadFile], File(max_length=1)] = [],  # noqa: B006
        api_key: str | None = Security(key_header),
    ) -> JobStatus:
        require_key(api_key)
        try:
            job = JobRequest.model_validate(json.loads(request))
        except (json.JSONDecodeError, ValidationError, TypeError) as err:
            raise GuardError(422, f"field 'request' is not a valid JobRequest: {err}") from err
        uploads: dict[str, list[tuple[str, bytes]]] = {}
        for kind, files in (
            ("images", images),
            ("videos", videos),
            ("audios", audios),
            ("source", source),
        ):  # noqa: E501
            for upload in files:
                data = await upload.read(limits.max_upload_bytes + 1)
                if len(data) > limits.max_upload_bytes:
                    raise GuardError(
                        413,
                        f"uploaded file {upload.filename!r} is over the limit of {limits.max_upload_bytes} bytes",
                    )  # noqa: E501
                uploads.setdefault(kind, []).append((upload.filename or "upload", data))
        if len(uploads.get("source", [])) > 1:
            raise GuardError(422, "only one source video can be uploaded")
        return await accept(job, uploads)

    @app.get("/v1/jobs", response_model=JobList, responses={401: _ERRORS[401]})
    async def list_jobs(
        limit: Annotated[int, Query(ge=1, le=100)] = 20, api_key: str | None = Security(key_header)
    ) -> JobList:
        require_key(api_key)
        records = await asyncio.to_thread(store.recent, limit)
        return JobList(jobs=[status_of(r) for r in records])

    async def load_job(job_id: str) -> JobRecord:
        try:
            record = await asyncio.to_thread(store.load, job_id)
        except OSError as err:
            raise storage_down(err) from err
        if record is None:
            raise GuardError(404, f"no job {job_id}")
        return record

    job_path = Path(pattern=JOB_ID_PATTERN, description="32 hex characters")

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=_JOB_ERRORS)
    async def job_status(
        job_id: Annotated[str, job_path], api_key: str | None = Security(key_header)
    ) -> JobStatus:
        require_key(api_key)
        return status_of(await load_job(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus, responses=_JOB_ERRORS)
    async def cancel(
        job_id: Annotated[str, job_path], api_key: str | None = Security(key_header)
    ) -> JobStatus:
        require_key(api_key)
        record = await load_job(job_id)
        if record.terminal:
            return status_of(record)
        await asyncio.to_thread(store.request_cancel, job_id)
        if record.status == "queued":
            # Not on a replica yet: the record is the ingress's to write.
            record.status, record.finished_at = "cancelled", record.updated_at
            await asyncio.to_thread(store.save, record)
        return status_of(record)

    @app.get(
        "/v1/jobs/{job_id}/video",
        response_class=Response,
        responses={**_JOB_ERRORS, 409: {"model": ErrorBody, "description": "Not finished"},
                   200: {"content": {"video/mp4": {}}, "description": "The MP4"}},
    )  # fmt: skip
    async def video(job_id: Annotated[str, job_path], api_key: str | None = Security(key_header)):
        require_key(api_key)
        record = await load_job(job_id)
        if record.status != "succeeded" or not record.output_uri:
            raise GuardError(409, f"job {job_id} is {record.status}, not succeeded")
        data = await asyncio.to_thread(storage.read_bytes, store.output_uri(job_id))
        return Response(data, media_type="video/mp4")

    @app.get(
        "/v1/jobs/{job_id}/metadata",
        responses={**_JOB_ERRORS, 409: {"model": ErrorBody, "description": "Not finished"}},
    )
    async def metadata(
        job_id: Annotated[str, job_path], api_key: str | None = Security(key_header)
    ) -> dict[str, Any]:
        require_key(api_key)
        record = await load_job(job_id)
        if record.status != "succeeded":
            raise GuardError(409, f"job {job_id} is {record.status}, not succeeded")
        data = await asyncio.to_thread(storage.read_json, store.metadata_uri(job_id))
        data.pop("video", None)  # a storage path: server-side only
        return data

    return app
