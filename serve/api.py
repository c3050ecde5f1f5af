"""The HTTP API and web page (FastAPI), independent of how jobs are run.

``build_api(config, backend)`` returns the FastAPI app that the Serve ingress
deployment wraps (``serve.app``) and that tests drive in-process. Request models are
built from the configured limits, so the served OpenAPI states them; limits that
depend on the request as a whole (references, uploads, shots) are checked in code
and refused with a 4xx that names the limit.

Who may call: :class:`serve.gate.RequestGate` wraps the whole app and refuses any
non-public path without a configured key before a body byte is read, and limits the
bytes received; every ``/v1`` route is on one router whose dependency
(:func:`require_principal`) hands the route its caller. Each key belongs to a tenant:
a tenant's jobs are invisible (404) to other tenants' keys, visible to an admin's.
"""

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    Path,
    Query,
    Request,
    Security,
    UploadFile,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import storage
from serve.config import Principal, ServeConfig
from serve.dispatch import Backend, Dispatcher
from serve.gate import PRINCIPAL_SCOPE_KEY, RequestGate
from serve.guards import (
    KINDS,
    GuardError,
    check_reference_uri,
    probe_reference,
    read_reference_bytes,
    resolve_key,
)
from serve.jobs import JobRecord, JobStore, new_job_id
from serve.rank import add_rank_routes

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
# JobRequest.mode; the page offers those it has fields for. v2a: sound for the source
# video; a2v: a picture for the source audio track.
MODES = ("t2av", "v2v", "multishot", "v2a", "a2v")
# Modes that need a source ("source" URI or upload), and the media it must be.
SOURCE_KIND = {"v2v": "videos", "v2a": "videos", "a2v": "audios"}
_EXTENSIONS = {"images": ".img", "videos": ".video", "audios": ".audio", "source": ".video"}


class ErrorBody(BaseModel):
    detail: str


class JobStatus(BaseModel):
    id: str
    tenant: str
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
    # Models whose Fast deployment is a distilled student, and the modes it learnt
    # ("references" counts as one); other modes are refused or run on Full (see
    # fast_unsupported_modes).
    fast_modes: dict[str, list[str]] = {}
    fast_unsupported_modes: Literal["refuse", "full_model"] = "refuse"


_KEY_HEADER = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

# Every string field of a JobRequest, by path ("[]": items of a list), is either a
# URI the server reads (checked by the one URI guard, walked by reference_uris) or
# plain text; tests/test_serve_guards.py fails on a field that is neither, so a new
# URI-bearing field cannot be added without the guard seeing it.
URI_FIELDS = ("references.images[]", "references.videos[]", "references.audios[]", "source")
TEXT_FIELDS = (
    "prompt", "negative_prompt", "subject", "resolution", "quality", "mode", "model",
    "shots[].prompt", "shots[].transition",
)  # fmt: skip


def reference_uris(job) -> list[tuple[str, str]]:
    """``(kind, uri)`` of every URI-bearing field of a JobRequest (``URI_FIELDS``), in
    the order they are stored: the guard and the fetch both walk this one list."""
    out = [(kind, uri) for kind in KINDS for uri in getattr(job.references, kind)]
    if job.source is not None:
        out.append(("source", job.source))
    return out


def require_principal(
    request: Request, api_key: Annotated[str | None, Security(_KEY_HEADER)] = None
) -> Principal:
    """The caller: the dependency of every ``/v1`` route (set on the router).

    :class:`serve.gate.RequestGate` has already authenticated the request before its
    body was read and left the principal in the scope; checking the key again here
    keeps a route safe even in an app built without the gate."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:
        principal = resolve_key(api_key, request.app.state.principals)
    if principal is None:
        raise GuardError(401, f"missing or wrong API key (send it in {API_KEY_HEADER})")
    return principal


Caller = Annotated[Principal, Depends(require_principal)]


class GuardedFastAPI(FastAPI):
    """FastAPI with :class:`serve.gate.RequestGate` outside everything else (outside
    Starlette's error middleware, which would otherwise answer a cut-off body 500)."""

    gate_options: dict[str, Any] | None = None

    def build_middleware_stack(self):
        stack = super().build_middleware_stack()
        if self.gate_options is None:
            raise RuntimeError("GuardedFastAPI needs gate_options before serving")
        return RequestGate(stack, **self.gate_options)


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
        mode: Literal[MODES] = "t2av"  # type: ignore[valid-type]
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
    config.validate()
    store = JobStore(config.jobs_uri)
    dispatcher = Dispatcher(config, store, backend)
    principals = config.principals()
    if not principals:
        raise ValueError(
            "no API keys configured: set api_keys or tenants in the serve config, or DUET_API_KEYS"
        )
    JobRequest, _, _ = request_models(config, model_facts)
    limits = config.limits
    fast_modes: dict[str, list[str] | None] = model_facts.get("fast_modes", {})
    full_is_student: dict[str, bool] = model_facts.get("full_is_student", {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Jobs accepted by an earlier ingress and never finished are picked up.
        dispatcher.start_sweeper(every_s=max(1.0, min(5.0, config.stale_after_s / 4)))
        yield
        await dispatcher.close()

    app = GuardedFastAPI(
        title="Duet generation API",
        version="1",
        description="Submit audio-video generation jobs, poll them, fetch the MP4.",
        lifespan=lifespan,
    )
    app.gate_options = {
        "authenticate": lambda key: resolve_key(key, principals),
        "max_body_bytes": limits.max_request_bytes,
        "max_part_bytes": limits.max_upload_bytes,
        # Every reference and the source as files, the request field, and a few
        # empty parts a browser form may add.
        "max_parts": limits.max_images + limits.max_videos + limits.max_audios + 8,
        "key_header": API_KEY_HEADER,
    }
    app.state.dispatcher = dispatcher
    app.state.store = store
    app.state.principals = principals

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

    def status_of(record: JobRecord) -> JobStatus:
        done = record.status == "succeeded"
        return JobStatus(
            id=record.id, tenant=record.tenant, status=record.status, progress=record.progress,
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
        elif not job.prompt.strip() and job.mode not in ("v2a", "a2v"):
            raise GuardError(
                422, "a prompt is required (or mode multishot with shots, or v2a / a2v)"
            )
        if job.mode == "v2v":
            if job.keep_audio and job.keep_video:
                raise GuardError(
                    422, "keep_audio and keep_video cannot both be set: nothing would change"
                )  # noqa: E501
        elif job.keep_audio or job.keep_video:
            raise GuardError(422, "keep_audio / keep_video apply to mode v2v only")
        if job.mode != "multishot" and job.shots:
            raise GuardError(422, "shots apply to mode multishot only")

    def fast_fallback(job, uploads) -> str | None:
        """None when the job's deployment can serve it as asked; the reason when a Fast
        job runs on the Full model instead; 422 when the config says refuse."""
        learnt = fast_modes.get(job.model)
        if job.quality != "fast" or learnt is None:
            return None
        needed = [job.mode] if job.mode != "t2av" else []
        if any(getattr(job.references, k) or uploads.get(k) for k in KINDS):
            needed.append("references")
        missing = [m for m in needed if m not in learnt]
        if not missing:
            return None
        reason = (
            f"the Fast model of {job.model!r} was distilled for {learnt} only, not for {missing}"
        )
        if config.fast.unsupported_modes == "full_model" and not full_is_student.get(job.model):
            return (
                f"{reason}: run by the Full model at the Fast deployment's "
                f"{config.fast.steps} {config.fast.sampler} steps"
            )
        raise GuardError(422, f"{reason}; ask for quality 'full'")

    async def accept(job, uploads: dict[str, list[tuple[str, bytes]]], who: Principal) -> JobStatus:
        check_request(job)
        fallback = fast_fallback(job, uploads)
        dispatcher.admit("full" if fallback else job.quality, who.tenant)
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
        needs = SOURCE_KIND.get(job.mode)
        if needs and not has_source:
            what = "audio track" if needs == "audios" else "video"
            raise GuardError(422, f"mode {job.mode} needs a source {what} ('source' URI or upload)")
        if not needs and has_source:
            raise GuardError(422, "a source applies to modes v2v, v2a and a2v only")
        for _, uri in reference_uris(job):
            check_reference_uri(uri, config.uri_policy)
        job_id = new_job_id()
        try:
            inputs = await asyncio.to_thread(_store_inputs, job_id, job, uploads)
        except GuardError:
            raise
        except OSError as err:
            raise storage_down(err) from err
        record = JobRecord(
            id=job_id, spec=job.model_dump(mode="json"), quality=job.quality, model=job.model,
            inputs=inputs, tenant=who.tenant, fallback=fallback,
        )  # fmt: skip
        try:
            await asyncio.to_thread(store.save, record)
        except OSError as err:
            raise storage_down(err) from err
        dispatcher.start(record)
        return status_of(record)

    def _store_inputs(job_id, job, uploads) -> dict[str, list[str]]:
        """Fetch URI references (policy-checked), probe everything, keep it with the job."""
        stored: dict[str, list[str]] = {}
        items: list[tuple[str, str, bytes]] = []
        for kind, uri in reference_uris(job):
            data = read_reference_bytes(uri, config.uri_policy, limits.max_upload_bytes)
            items.append((kind, f"{kind} reference ({uri})", data))
        for kind in (*KINDS, "source"):
            for name, data in uploads.get(kind, []):
                items.append((kind, f"uploaded {kind.rstrip('s')} {name!r}", data))
        # The source is a video (v2v, v2a) or an audio track (a2v).
        source_kind = SOURCE_KIND.get(job.mode, "videos")
        for kind, label, data in items:
            probe_reference(data, source_kind if kind == "source" else kind, limits, label)
        for kind, _, data in items:
            index = len(stored.setdefault(kind, []))
            ext = _EXTENSIONS[source_kind if kind == "source" else kind]
            uri = store.input_uri(job_id, f"{kind}-{index}{ext}")
            storage.write_bytes(uri, data)
            stored[kind].append(uri)
        return stored

    # -- routes ------------------------------------------------------------------
    # What the page offers: the served model's example prompts and vocabulary (its
    # training captions, serve/examples.py) and the API's modes, as JSON in the page.
    page_facts = {
        "examples": model_facts.get("examples") or {"prompts": [], "vocabulary": []},
        "modes": list(MODES),
        "limits": {"max_shots": limits.max_shots, "max_duration_s": limits.max_duration_s},
    }
    page_json = json.dumps(page_facts)
    for char in "<>&":  # inside <script>: no "</script>" from a caption can close it
        page_json = page_json.replace(char, f"\\u{ord(char):04x}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("serve").joinpath("static/index.html").read_text()
        return HTMLResponse(html.replace("__DUET_PAGE_FACTS__", page_json))

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

    # Every /v1 route is on this router: its dependency names the caller (the gate
    # has already refused anyone else before the body was read).
    v1 = APIRouter(
        prefix="/v1", dependencies=[Depends(require_principal)], responses={401: _ERRORS[401]}
    )

    @v1.get("/info", response_model=ServiceInfo)
    async def info(who: Caller) -> ServiceInfo:
        return ServiceInfo(
            qualities=["fast", "full"], modes=list(MODES),
            models=model_facts["models"], fps=model_facts["fps"],
            resolutions=model_facts["resolutions"],
            limits={k: v for k, v in vars(limits).items()},
            fast_modes={k: v for k, v in fast_modes.items() if v is not None},
            fast_unsupported_modes=config.fast.unsupported_modes,
        )  # fmt: skip

    @v1.post("/jobs", status_code=202, response_model=JobStatus, responses=_ERRORS)
    async def submit(job: JobRequest, who: Caller) -> JobStatus:  # type: ignore[valid-type]
        return await accept(job, {}, who)

    @v1.post("/jobs/upload", status_code=202, response_model=JobStatus, responses=_ERRORS)
    async def submit_upload(
        who: Caller,
        request: Annotated[str, Form(description="The JobRequest as JSON text")] = "{}",
        images: Annotated[list[UploadFile], File()] = [],  # noqa: B006
        videos: Annotated[list[UploadFile], File()] = [],  # noqa: B006
        audios: Annotated[list[UploadFile], File()] = [],  # noqa: B006
        source: Annotated[list[UploadFile], File(max_length=1)] = [],  # noqa: B006
    ) -> JobStatus:
        try:
            job = JobRequest.model_validate(json.loads(request))
        except (json.JSONDecodeError, ValidationError, TypeError) as err:
            raise GuardError(422, f"field 'request' is not a valid JobRequest: {err}") from err
        uploads: dict[str, list[tuple[str, bytes]]] = {}
        parts = {"images": images, "videos": videos, "audios": audios, "source": source}
        for kind, files in parts.items():
            for upload in files:
                # The gate already cut off any part over the limit as it arrived.
                data = await upload.read(limits.max_upload_bytes + 1)
                if len(data) > limits.max_upload_bytes:
                    raise GuardError(
                        413,
                        f"uploaded file {upload.filename!r} is over the limit of "
                        f"{limits.max_upload_bytes} bytes",
                    )
                uploads.setdefault(kind, []).append((upload.filename or "upload", data))
        if len(uploads.get("source", [])) > 1:
            raise GuardError(422, "only one source video can be uploaded")
        return await accept(job, uploads, who)

    @v1.get("/jobs", response_model=JobList)
    async def list_jobs(who: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
        # An admin sees every tenant's jobs; anyone else only their own tenant's.
        tenant = None if who.admin else who.tenant
        records = await asyncio.to_thread(store.recent, limit, tenant)
        return JobList(jobs=[status_of(r) for r in records])

    async def load_job(job_id: str, who: Principal) -> JobRecord:
        try:
            record = await asyncio.to_thread(store.load, job_id)
        except OSError as err:
            raise storage_down(err) from err
        # Another tenant's job answers exactly as a job that does not exist: 404, so
        # a key cannot even learn which ids are taken.
        if record is None or not (who.admin or record.tenant == who.tenant):
            raise GuardError(404, f"no job {job_id}")
        return record

    job_path = Path(pattern=JOB_ID_PATTERN, description="32 hex characters")

    @v1.get("/jobs/{job_id}", response_model=JobStatus, responses=_JOB_ERRORS)
    async def job_status(job_id: Annotated[str, job_path], who: Caller) -> JobStatus:
        return status_of(await load_job(job_id, who))

    @v1.post("/jobs/{job_id}/cancel", response_model=JobStatus, responses=_JOB_ERRORS)
    async def cancel(job_id: Annotated[str, job_path], who: Caller) -> JobStatus:
        record = await load_job(job_id, who)
        if record.terminal:
            return status_of(record)
        await asyncio.to_thread(store.request_cancel, job_id)
        if record.status == "queued":
            # Not on a replica yet: the record is the ingress's to write.
            record.status, record.finished_at = "cancelled", record.updated_at
            await asyncio.to_thread(store.save, record)
        return status_of(record)

    @v1.get(
        "/jobs/{job_id}/video",
        response_class=Response,
        responses={**_JOB_ERRORS, 409: {"model": ErrorBody, "description": "Not finished"},
                   200: {"content": {"video/mp4": {}}, "description": "The MP4"}},
    )  # fmt: skip
    async def video(job_id: Annotated[str, job_path], who: Caller):
        record = await load_job(job_id, who)
        if record.status != "succeeded" or not record.output_uri:
            raise GuardError(409, f"job {job_id} is {record.status}, not succeeded")
        data = await asyncio.to_thread(storage.read_bytes, store.output_uri(job_id))
        return Response(data, media_type="video/mp4")

    @v1.get(
        "/jobs/{job_id}/metadata",
        responses={**_JOB_ERRORS, 409: {"model": ErrorBody, "description": "Not finished"}},
    )
    async def metadata(job_id: Annotated[str, job_path], who: Caller) -> dict[str, Any]:
        record = await load_job(job_id, who)
        if record.status != "succeeded":
            raise GuardError(409, f"job {job_id} is {record.status}, not succeeded")
        data = await asyncio.to_thread(storage.read_json, store.metadata_uri(job_id))
        data.pop("video", None)  # a storage path: server-side only
        return data

    # The /rank page and /v1/rank routes (serve/rank.py): people judge candidate pairs.
    add_rank_routes(app, v1, config.rank, Caller, ErrorBody)
    app.include_router(v1)
    return app
