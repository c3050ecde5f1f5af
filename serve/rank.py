"""People judge pairs of candidates: the ``/rank`` page and its ``/v1/rank`` routes.

The server is configured with one candidate table (``rank.table_uri``, the versioned
table of :mod:`pipelines.align.preferences`). The page shows two candidates of one
group (same prompt, same initial noise) side by side and asks, per reward head,
which is better (left, right, tie, skip); each answer is appended as a versioned
judgement row beside the table, which the rlhf stage's reward model trains on
(:func:`pipelines.align.preferences.read_judgements`, ``weighted_pairs``).

What may be read: only clips of the table's candidates, looked up by candidate id
(never a path built from the request), and only those lying under the media root
(the table's folder unless ``rank.media_root`` says otherwise; symbolic links are
resolved first), so a table naming ``/etc/passwd`` serves nothing. Who: every route
is on the authenticated ``/v1`` router; judgements carry the caller's tenant, and a
tenant's next pair, and its list of judgements, count its own rows only (an admin
lists all). How much: a judgement body is read up to ``rank.max_judgement_bytes``
and refused past it, before any parsing.
"""

import asyncio
import hashlib
import json
import os
import posixpath
import threading
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import storage
from pipelines.align.config import HEADS
from pipelines.align.preferences import (
    CHOICES,
    RATER_ID_PATTERN,
    PreferenceDataError,
    append_judgements,
    candidate_id,
    groups,
    judgement_parts,
    make_judgement,
    read_judgement_part,
    read_preferences,
)
from serve.config import RankConfig
from serve.guards import GuardError

CANDIDATE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,160}$"
NO_TABLE = "no preference table to rank: set rank.table_uri in the serve config"


class RankCandidate(BaseModel):
    id: str
    media_url: str


class RankPair(BaseModel):
    """The next pair for a rater, or ``done`` when they have judged every pair."""

    done: bool
    heads: list[str]
    choices: list[str]
    prompt: str | None = None
    left: RankCandidate | None = None
    right: RankCandidate | None = None
    judged_by_rater: int
    pairs: int


class JudgementIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    left: Annotated[str, Field(pattern=CANDIDATE_ID_PATTERN)]
    right: Annotated[str, Field(pattern=CANDIDATE_ID_PATTERN)]
    rater_id: Annotated[str, Field(pattern=RATER_ID_PATTERN)]
    # Head -> choice; heads left out were not asked.
    choices: Annotated[
        dict[Literal[HEADS], Literal[CHOICES]],  # type: ignore[valid-type]
        Field(min_length=1, max_length=len(HEADS)),
    ]


class JudgementOut(BaseModel):
    judgement_id: str
    left: str
    right: str
    prompt: str
    choices: dict[str, str]
    rater_id: str
    source: str
    tenant: str
    created_at: str


class JudgementList(BaseModel):
    judgements: list[JudgementOut]


class RefusedJudgement(BaseModel):
    """422: FastAPI's validation shape (``detail``: a list of ``loc``, ``msg``, ``type``)."""

    detail: list[dict[str, Any]]


_WHY = {
    404: "No preference table configured, or no such candidate",
    413: "Over a size limit",
    422: "Not a valid judgement",
}


def inside(root: str, uri: str) -> bool:
    """Whether ``uri`` lies under the folder ``root`` (same scheme; local paths with
    links resolved, object keys normalised, so ``..`` cannot climb out)."""
    if not uri or storage.scheme_of(root) != storage.scheme_of(uri):
        return False
    if storage.scheme_of(uri) == "file":
        base = os.path.realpath(storage.strip_scheme(root))
        path = os.path.realpath(storage.strip_scheme(uri))
        return path != base and os.path.commonpath([base, path]) == base
    base = posixpath.normpath(storage.strip_scheme(root))
    return posixpath.normpath(storage.strip_scheme(uri)).startswith(base.rstrip("/") + "/")


def _out(row: dict) -> JudgementOut:
    return JudgementOut(
        judgement_id=row["judgement_id"], left=row["left"], right=row["right"],
        prompt=row["prompt"], rater_id=row["rater_id"], source=row["source"],
        tenant=row["tenant"], created_at=row["created_at"].isoformat(),
        choices={h: row[f"choice_{h}"] for h in HEADS if row.get(f"choice_{h}")},
    )  # fmt: skip


class RankTable:
    """The configured candidate table, the candidates it may show, and its judgements
    (each part read once; a refresh reads only parts it has not seen)."""

    def __init__(self, config: RankConfig):
        self.table_uri = config.table_uri
        rows = read_preferences(self.table_uri)
        root = config.media_root or posixpath.dirname(self.table_uri.rstrip("/"))
        if storage.scheme_of(self.table_uri) == "file" and not config.media_root:
            root = os.path.dirname(os.path.abspath(storage.strip_scheme(self.table_uri)))
        self.heads = list(HEADS)
        # Only candidates with a clip under the media root are shown or judged here.
        self.shown = {candidate_id(r): r for r in rows if inside(root, r["clip_uri"])}
        self.pairs = [
            (candidate_id(a), candidate_id(b))
            for members in groups(rows).values()
            for i, a in enumerate(members)
            for b in members[i + 1 :]
            if candidate_id(a) in self.shown and candidate_id(b) in self.shown
        ]
        self._parts: dict[str, list[dict]] = {}
        self._lock = threading.Lock()

    def judgements(self) -> list[dict]:
        with self._lock:
            for part in judgement_parts(self.table_uri):
                if part not in self._parts:
                    self._parts[part] = read_judgement_part(part)
            return [r for rows in self._parts.values() for r in rows]

    def next_pair(self, tenant: str, rater_id: str) -> RankPair:
        """The pair this rater has not judged that the tenant's raters judged least;
        ties and the side each candidate is shown on follow a hash of (rater, pair),
        so raters spread over pairs and no candidate always sits on the left."""
        mine, counts = set(), {}
        for j in self.judgements():
            if j["tenant"] != tenant:
                continue
            key = frozenset((j["left"], j["right"]))
            counts[key] = counts.get(key, 0) + 1
            if j["rater_id"] == rater_id:
                mine.add(key)

        def digest(pair) -> bytes:
            return hashlib.sha256(f"{rater_id}\0{pair[0]}\0{pair[1]}".encode()).digest()

        todo = [p for p in self.pairs if frozenset(p) not in mine]
        base = {"heads": self.heads, "choices": list(CHOICES), "pairs": len(self.pairs),
                "judged_by_rater": len(self.pairs) - len(todo)}  # fmt: skip
        if not todo:
            return RankPair(done=True, **base)
        pair = min(todo, key=lambda p: (counts.get(frozenset(p), 0), digest(p)))
        left, right = pair if digest(pair)[-1] % 2 == 0 else pair[::-1]
        return RankPair(
            done=False, prompt=self.shown[left]["prompt"], **base,
            left=RankCandidate(id=left, media_url=f"v1/rank/media/{left}"),
            right=RankCandidate(id=right, media_url=f"v1/rank/media/{right}"),
        )  # fmt: skip

    def record(self, judgement: JudgementIn, tenant: str) -> dict:
        raw = {"left": judgement.left, "right": judgement.right, "rater_id": judgement.rater_id}
        raw.update({f"choice_{h}": c for h, c in judgement.choices.items()})
        try:
            row = make_judgement(raw, self.shown, tenant=tenant, source="human")
        except PreferenceDataError as err:
            raise GuardError(422, str(err)) from err
        part = append_judgements(self.table_uri, [row])
        with self._lock:
            self._parts[part] = [row]
        return row


def add_rank_routes(
    app: FastAPI, v1: APIRouter, config: RankConfig, caller, error_model: type[BaseModel]
) -> None:
    """The public ``/rank`` page and the ``/v1/rank`` routes (``caller``: the ``/v1``
    router's principal dependency type; ``error_model``: the API's error body)."""
    table = RankTable(config) if config.table_uri else None

    def errors(*codes: int) -> dict:
        return {
            c: {"model": RefusedJudgement if c == 422 else error_model, "description": _WHY[c]}
            for c in codes
        }

    def need_table() -> RankTable:
        if table is None:
            raise GuardError(404, NO_TABLE)
        return table

    @app.get("/rank", response_class=HTMLResponse, include_in_schema=False)
    async def rank_page() -> HTMLResponse:
        return HTMLResponse(resources.files("serve").joinpath("static/rank.html").read_text())

    rater = Annotated[str, Query(pattern=RATER_ID_PATTERN, description="The rater's id")]

    @v1.get("/rank/next", response_model=RankPair, tags=["rank"], responses=errors(404))
    async def rank_next(who: caller, rater_id: rater) -> RankPair:
        return await asyncio.to_thread(need_table().next_pair, who.tenant, rater_id)

    @v1.get(
        "/rank/media/{candidate}",
        response_class=Response,
        tags=["rank"],
        responses={
            200: {"content": {"video/mp4": {}}, "description": "The candidate's MP4"},
            **errors(404, 413),
        },
    )
    async def rank_media(
        who: caller, candidate: Annotated[str, Path(pattern=CANDIDATE_ID_PATTERN)]
    ) -> Response:
        found = need_table().shown.get(candidate)
        if found is None:
            raise GuardError(404, f"no candidate {candidate} to rank")
        uri = found["clip_uri"]
        try:
            size = await asyncio.to_thread(storage.size, uri)
        except storage.StorageError as err:
            raise GuardError(404, f"candidate {candidate}'s clip is missing from storage") from err
        if size > config.max_clip_bytes:
            raise GuardError(413, f"candidate clip over rank.max_clip_bytes ({size} bytes)")
        data = await asyncio.to_thread(storage.read_bytes, uri)
        return Response(data, media_type="video/mp4")

    @v1.post(
        "/rank/judgements",
        status_code=201,
        response_model=JudgementOut,
        tags=["rank"],
        responses=errors(404, 413, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JudgementIn.model_json_schema()}},
            }
        },
    )
    async def rank_judge(request: Request, who: caller) -> JudgementOut:
        # Read at most the limit, then parse: the app-wide body limit is for uploads.
        limit = config.max_judgement_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise GuardError(413, f"a judgement is at most {limit} bytes")
        try:
            judgement = JudgementIn.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as err:
            msg = err.errors()[0]["msg"] if isinstance(err, ValidationError) else "not JSON"
            where = ""
            if isinstance(err, ValidationError):
                where = ".".join(str(x) for x in err.errors()[0]["loc"]) + ": "
            raise GuardError(422, f"not a judgement: {where}{msg}") from err
        row = await asyncio.to_thread(need_table().record, judgement, who.tenant)
        return _out(row)

    @v1.get("/rank/judgements", response_model=JudgementList, tags=["rank"], responses=errors(404))
    async def rank_judgements(
        who: caller, limit: Annotated[int, Query(ge=1, le=200)] = 20
    ) -> JudgementList:
        rows = await asyncio.to_thread(need_table().judgements)
        rows = [r for r in rows if who.admin or r["tenant"] == who.tenant]
        rows.sort(key=lambda r: (r["created_at"], r["judgement_id"]), reverse=True)
        return JudgementList(judgements=[_out(r) for r in rows[:limit]])
