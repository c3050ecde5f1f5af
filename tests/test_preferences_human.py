"""Human preferences: pairwise judgements from the /rank page and from imported files
become versioned rows beside the candidate table, and the reward model's loader reads
them back as weighted pairs.

The candidate table here is small and real: five MP4 candidates in two groups, and
three that must never be shown (a clip outside the table's folder, a link out of it,
no clip). The page test drives headless Chromium (Debian's ``chromium`` through
Playwright) with the keyboard only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app as cli_app
from core.media import AVClip, write_mp4
from pipelines.align.config import HEADS
from pipelines.align.preferences import (
    NO_REFERENCES,
    PreferenceDataError,
    append_judgements,
    candidate_id,
    judgement_parts,
    make_judgement,
    read_judgements,
    read_preferences,
    weighted_pairs,
    write_preferences,
)
from serve.api import build_api
from serve.config import serve_config_from

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FACTS = {"fps": 8.0, "resolutions": ["64x64"], "models": ["default"]}
PROMPTS = {"g0": "two red circles bounce", "g1": "a blue square slides", "g2": "a green ball"}
SECRET = b"SECRET: a file outside the table, never to be served"


def _row(group: str, candidate: int, clip_uri: str, sync: float | None = None) -> dict:
    row = {
        "group_id": group, "candidate": candidate, "prompt": PROMPTS[group],
        "references": NO_REFERENCES, "seed": 0, "noise_seed": candidate, "clip_uri": clip_uri,
        "latent_uri": "", "rater_id": "probe-rater-v1", "split": "train",
    }  # fmt: skip
    for h in HEADS:
        row[f"score_{h}"] = sync if h == "sync" else None
        row[f"rank_{h}"] = None
    return row


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The candidate table with its clips, encoded once; each test gets a copy."""
    root = tmp_path_factory.mktemp("prefs")
    cand = root / "table" / "candidates"
    cand.mkdir(parents=True)
    (root / "secret.mp4").write_bytes(SECRET)
    (cand / "link.mp4").symlink_to(root / "secret.mp4")
    rows = []
    t = np.arange(8000, dtype=np.float32) / 8000
    for group, n in (("g0", 3), ("g1", 2)):
        for c in range(n):
            frames = np.full((8, 32, 32, 3), 40 + 60 * c, np.uint8)
            audio = (0.2 * np.sin(2 * np.pi * (220 + 110 * c) * t))[None]
            uri = str(cand / f"{group}-c{c}.mp4")
            write_mp4(uri, AVClip(frames, 8.0, audio, 8000))
            rows.append(_row(group, c, uri, sync=(0.9, 0.5, 0.1)[c] if group == "g0" else None))
    rows.append(_row("g2", 0, str(root / "secret.mp4")))  # outside the table's folder
    rows.append(_row("g2", 1, str(cand / "link.mp4")))  # inside, but a link out of it
    rows.append(_row("g2", 2, ""))  # no clip
    write_preferences(str(root / "table" / "preferences.parquet"), rows)
    return root


@pytest.fixture
def table(built, tmp_path) -> str:
    root = tmp_path / "t"
    shutil.copytree(built, root, symlinks=True)
    (root / "table" / "candidates" / "link.mp4").unlink()
    (root / "table" / "candidates" / "link.mp4").symlink_to(root / "secret.mp4")
    uri = str(root / "table" / "preferences.parquet")
    rows = read_preferences(uri)
    for row in rows:  # the copy's clips, not the originals
        row["clip_uri"] = row["clip_uri"].replace(str(built), str(root))
    return write_preferences(uri, rows)


def _loaded(table: str) -> tuple[list[dict], list[dict]]:
    """What the rlhf stage's reward model reads (pipelines/align/stages.py)."""
    return read_preferences(table), read_judgements(table)


def _pairs(rows, head, judgements, **weights):
    return sorted(
        (candidate_id(p.winner), candidate_id(p.loser), p.weight, p.source)
        for p in weighted_pairs(rows, head, 0.05, judgements, **weights)
    )


def test_judgements_are_versioned_rows_read_back_as_weighted_pairs(table):
    rows = read_preferences(table)
    shown = {candidate_id(r): r for r in rows}
    raw = {"left": "g0-c2", "right": "g0-c0", "rater_id": "ann", "choice_sync": "left",
           "choice_adherence": "right", "choice_motion": "tie", "choice_visual": "skip"}  # fmt: skip
    part = append_judgements(table, [make_judgement(raw, shown, tenant="default")])
    rows, judgements = _loaded(table)
    assert [j["source"] for j in judgements] == ["human"]
    assert judgements[0]["prompt"] == PROMPTS["g0"] and judgements[0]["choice_audio"] is None
    # The rater's score pairs at rater_weight, the person's judgement at human_weight.
    w = {"human_weight": 3.0, "rater_weight": 0.5}
    assert _pairs(rows, "sync", judgements, **w) == [
        ("g0-c0", "g0-c1", 0.5, "rater"),
        ("g0-c0", "g0-c2", 0.5, "rater"),
        ("g0-c1", "g0-c2", 0.5, "rater"),
        ("g0-c2", "g0-c0", 3.0, "human"),
    ]
    assert _pairs(rows, "adherence", judgements, **w) == [("g0-c0", "g0-c2", 3.0, "human")]
    for head in ("motion", "visual", "audio"):  # tie, skip, not asked: no order
        assert _pairs(rows, head, judgements, **w) == []
    # Winners are the table's own row objects (the reward model indexes them so).
    pair = weighted_pairs(rows, "adherence", 0.05, judgements)[0]
    assert any(pair.winner is r for r in rows)
    assert _pairs(rows, "sync", judgements, human_weight=0.0) == _pairs(rows, "sync", [])
    # Rows of another split without g0-c0: the judgement orders nothing there.
    subset = [r for r in rows if candidate_id(r) != "g0-c0"]
    assert _pairs(subset, "adherence", judgements) == []

    # A part written without a head's column (an older head set) reads as not asked;
    # a part of a version this reader does not know is refused, naming it.
    old = pq.read_table(part).drop_columns(["choice_audio"])
    pq.write_table(old, part)
    assert read_judgements(table)[0]["choice_audio"] is None
    pq.write_table(
        old.replace_schema_metadata({"schema_version": "2", "table": "judgements"}), part
    )
    with pytest.raises(PreferenceDataError, match="judgements schema version 2"):
        read_judgements(table)


def _cli(*args):
    return CliRunner().invoke(cli_app, ["prefs", "import", *args])


def test_import_csv_and_parquet(table, tmp_path):
    csv_file = tmp_path / "ranks.csv"
    csv_file.write_text(
        "left,right,rater_id,choice_sync,choice_adherence,prompt,created_at\n"
        "g0-c0,g0-c1,ann,left,,two red circles bounce,2026-12-01T10:00:00Z\n"
        "g1-c1,g1-c0,bob@lab,tie,right,,\n"
    )
    result = _cli(str(csv_file), "--table", table)
    assert result.exit_code == 0, result.output
    assert "imported 2 judgement(s)" in result.output
    first, second = read_judgements(table)
    assert first["created_at"] == datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.UTC)
    assert (first["choice_sync"], first["choice_adherence"]) == ("left", None)
    assert second["prompt"] == PROMPTS["g1"] and second["choice_adherence"] == "right"
    assert {first["tenant"], second["tenant"]} == {"default"}

    pq_file = tmp_path / "ranks.parquet"
    pq.write_table(
        pa.table({"left": ["g0-c2"], "right": ["g0-c1"], "rater_id": ["vlm-7"],
                  "choice_motion": ["left"], "source": ["rater"]}),
        pq_file,
    )  # fmt: skip
    result = _cli(str(pq_file), "--table", table, "--tenant", "brand-a")
    assert result.exit_code == 0, result.output
    rows, judgements = _loaded(table)
    assert len(judgements) == 3 and len(judgement_parts(table)) == 2
    motion = _pairs(rows, "motion", judgements, rater_weight=0.25)
    assert motion == [("g0-c2", "g0-c1", 0.25, "rater")]
    assert [j["tenant"] for j in judgements if j["rater_id"] == "vlm-7"] == ["brand-a"]


GOOD = "g0-c0,g0-c1,ann,left"
BAD_FILES = {
    "unknown column": ("left,right,rater_id,choice_snyc\n" + GOOD, "unknown column(s) ['choice_snyc']"),
    "no rater_id column": ("left,right,choice_sync\ng0-c0,g0-c1,left", "missing column(s) ['rater_id']"),
    "no choice column": ("left,right,rater_id\ng0-c0,g0-c1,ann", "choice_<head>"),
    "bad choice on row 3": (f"left,right,rater_id,choice_sync\n{GOOD}\n{GOOD}\ng0-c0,g0-c1,ann,lft",
                            "row 3: choice_sync 'lft' is not one of"),
    "unknown candidate": ("left,right,rater_id,choice_sync\ng0-c9,g0-c1,ann,left", "left 'g0-c9' is no candidate"),
    "bad rater id": ("left,right,rater_id,choice_sync\ng0-c0,g0-c1,ann smith,left", "rater_id 'ann smith'"),
    "different prompts": ("left,right,rater_id,choice_sync\ng0-c0,g1-c0,ann,left", "different prompts"),
    "same candidate": ("left,right,rater_id,choice_sync\ng0-c0,g0-c0,ann,left", "the same candidate"),
    "wrong prompt": ("left,right,rater_id,choice_sync,prompt\n" + GOOD + ",a cat", "is not the candidates' prompt"),
    "bad time": ("left,right,rater_id,choice_sync,created_at\n" + GOOD + ",yesterday", "not an ISO 8601"),
    "no choice in a row": ("left,right,rater_id,choice_sync\ng0-c0,g0-c1,ann,", "no head has a choice"),
    "extra cell": ("left,right,rater_id,choice_sync\n" + GOOD + ",x", "more cells than the header"),
    "repeated id": ("left,right,rater_id,choice_sync,judgement_id\n" + GOOD + ",j1\n" + GOOD + ",j1",
                    "row 2: judgement_id 'j1' is already"),
    "bad source": ("left,right,rater_id,choice_sync,source\n" + GOOD + ",robot", "source 'robot'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_import_refuses_a_bad_file_in_one_line_and_writes_nothing(table, tmp_path, case):
    text, message = BAD_FILES[case]
    bad = tmp_path / "bad.csv"
    bad.write_text(text + "\n")
    result = _cli(str(bad), "--table", table)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output, result.output
    assert judgement_parts(table) == []


def test_import_is_all_or_nothing_across_files_and_tables(table, tmp_path):
    once = tmp_path / "once.csv"
    once.write_text("left,right,rater_id,choice_sync,judgement_id\n" + GOOD + ",j1\n")
    assert _cli(str(once), "--table", table).exit_code == 0
    again = _cli(str(once), "--table", table)  # imported twice: refused whole
    assert again.exit_code == 2 and "already in the table" in again.output
    other = tmp_path / "ranks.txt"
    other.write_text("left\n")
    assert "expected a .csv or .parquet" in _cli(str(other), "--table", table).output
    missing = _cli(str(once), "--table", str(tmp_path / "none.parquet"))
    assert missing.exit_code == 2 and "no preference table" in missing.output
    assert len(read_judgements(table)) == 1


class _IdleBackend:
    """Runs no job: the ranking routes never reach a model."""

    async def run(self, job_id: str, quality: str, model: str) -> dict:
        raise AssertionError("the ranking tests never dispatch a job")

    async def ready(self) -> dict[str, bool]:
        return {"fast": True, "full": True}


def _api(tmp_path, rank: dict | None):
    config = {
        "jobs_uri": str(tmp_path / "jobs"),
        "tenants": {
            "a": {"api_keys": ["key-a"]},
            "b": {"api_keys": ["key-b"]},
            "ops": {"api_keys": ["key-ops"], "admin": True},
        },
    }
    if rank is not None:
        config["rank"] = rank
    return build_api(serve_config_from(config), _IdleBackend(), FACTS)


A, B, OPS = ({"X-API-Key": k} for k in ("key-a", "key-b", "key-ops"))
OFFERED = {"g0-c0", "g0-c1", "g0-c2", "g1-c0", "g1-c1"}


def test_rank_routes_authenticate_validate_and_serve_only_the_tables_clips(table, tmp_path):
    with TestClient(_api(tmp_path, {"table_uri": table})) as client:
        page = client.get("/rank")  # the page itself is public; its data is not
        assert page.status_code == 200 and "Rank candidates" in page.text
        for method, path in (("GET", "/v1/rank/next?rater_id=ann"), ("GET", "/v1/rank/judgements"),
                             ("GET", "/v1/rank/media/g0-c0"), ("POST", "/v1/rank/judgements")):  # fmt: skip
            assert client.request(method, path).status_code == 401, path

        first = client.get("/v1/rank/next", params={"rater_id": "ann"}, headers=A).json()
        assert not first["done"] and first["heads"] == list(HEADS) and first["pairs"] == 4
        pair = {first["left"]["id"], first["right"]["id"]}
        assert pair <= OFFERED and len({c[:2] for c in pair}) == 1
        media = client.get(first["left"]["media_url"], headers=A)
        clip = Path(table).parent / "candidates" / f"{first['left']['id']}.mp4"
        assert media.status_code == 200 and media.content == clip.read_bytes()
        assert media.headers["content-type"] == "video/mp4"
        # Only the table's candidates, under its folder: no path, no link, no other file.
        for path in ("g2-c0", "g2-c1", "g2-c2", "..%2F..%2Fsecret.mp4", "..%2Fsecret.mp4",
                     "%2e%2e", "..", "g0-c0%00", "g0-c0%2F..%2F..%2Fsecret.mp4",
                     "..%5C..%5Csecret.mp4", "candidates%2Flink.mp4"):  # fmt: skip
            got = client.get(f"/v1/rank/media/{path}", headers=A)
            assert got.status_code in (404, 422), (path, got.status_code)
            assert b"SECRET" not in got.content, path
        assert client.get("/v1/rank/media/g2-c1", headers=A).status_code == 404

        # Bad judgements are refused before anything is written.
        ok = {"left": first["left"]["id"], "right": first["right"]["id"], "rater_id": "ann",
              "choices": {h: "left" for h in HEADS}}  # fmt: skip
        bad = [
            {**ok, "choices": {"smell": "left"}},
            {**ok, "choices": {"sync": "maybe"}},
            {**ok, "choices": {}},
            {**ok, "left": "g0-c9"},
            {**ok, "left": "g2-c0", "right": "g2-c2"},
            {**ok, "left": "../secret.mp4"},
            {**ok, "right": ok["left"]},
            {**ok, "left": "g0-c0", "right": "g1-c0"},
            {**ok, "rater_id": "ann smith"},
            {**ok, "rater_id": "a" * 65},
            {**ok, "rater_id": ""},
            {**ok, "tenant": "b"},
            {key: v for key, v in ok.items() if key != "rater_id"},
        ]
        for body in bad:
            got = client.post("/v1/rank/judgements", json=body, headers=A)
            assert got.status_code == 422, (body, got.text)
        assert (
            client.post("/v1/rank/judgements", content=b"{not json", headers=A).status_code == 422
        )
        big = {**ok, "pad": "x" * 5000}
        assert client.post("/v1/rank/judgements", json=big, headers=A).status_code == 413
        assert judgement_parts(table) == []

        saved = client.post("/v1/rank/judgements", json=ok, headers=A)
        assert saved.status_code == 201, saved.text
        assert saved.json()["tenant"] == "a" and saved.json()["source"] == "human"
        row = read_judgements(table)[0]
        assert (row["left"], row["right"], row["choice_sync"]) == (ok["left"], ok["right"], "left")

        # Tenant-scoped: b's raters and lists do not see a's rows; an admin lists all.
        after = client.get("/v1/rank/next", params={"rater_id": "ann"}, headers=A).json()
        assert {after["left"]["id"], after["right"]["id"]} != pair
        assert after["judged_by_rater"] == 1
        other = client.get("/v1/rank/next", params={"rater_id": "ann"}, headers=B).json()
        assert {other["left"]["id"], other["right"]["id"]} == pair
        assert other["judged_by_rater"] == 0
        assert client.get("/v1/rank/judgements", headers=B).json() == {"judgements": []}
        listed = client.get("/v1/rank/judgements", headers=OPS).json()["judgements"]
        assert [j["tenant"] for j in listed] == ["a"]
        assert client.get("/v1/rank/next", params={"rater_id": "a b"}, headers=A).status_code == 422

        # A rater who has judged every pair is told so.
        for _ in range(4):
            nxt = client.get("/v1/rank/next", params={"rater_id": "cy"}, headers=A).json()
            body = {**ok, "rater_id": "cy", "left": nxt["left"]["id"], "right": nxt["right"]["id"]}
            assert client.post("/v1/rank/judgements", json=body, headers=A).status_code == 201
        done = client.get("/v1/rank/next", params={"rater_id": "cy"}, headers=A).json()
        assert done["done"] and done["judged_by_rater"] == done["pairs"] == 4

    with TestClient(_api(tmp_path, None)) as client:
        got = client.get("/v1/rank/next", params={"rater_id": "ann"}, headers=A)
        assert got.status_code == 404 and "rank.table_uri" in got.json()["detail"]


@contextlib.contextmanager
def _serving(app):
    """The app on a loopback port for the browser (uvicorn on a thread; serve.local's
    ServerThread would import the model stack, seconds this test does not need)."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="system chromium missing (make installs it)")
def test_the_ranking_page_saves_a_keyboard_judgement_the_loader_reads(table, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    app = _api(tmp_path, {"table_uri": table})
    with _serving(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(url + "rank")
            expect(page).to_have_title("Duet: rank candidates")
            expect(page.locator("#keys")).to_contain_text("Enter")
            page.fill("#api-key", "key-a")
            page.fill("#rater-id", "ann")
            page.press("#rater-id", "Enter")  # Enter in the rater field loads a pair
            left, right = page.locator("#left-video"), page.locator("#right-video")
            expect(left).to_have_attribute("data-candidate", re.compile(r"g\d-c\d"))
            expect(right).to_have_attribute("data-candidate", re.compile(r"g\d-c\d"))
            pair = (left.get_attribute("data-candidate"), right.get_attribute("data-candidate"))
            assert int(left.get_attribute("data-bytes")) > 1000
            duration = page.evaluate(
                """() => new Promise((resolve) => {
                    const v = document.getElementById("left-video");
                    if (v.readyState >= 1) resolve(v.duration);
                    v.addEventListener("loadedmetadata", () => resolve(v.duration));
                    v.addEventListener("error", () => resolve(-1));
                })"""
            )
            assert 0.5 < duration < 1.5, duration  # the browser decodes the served MP4
            heads = page.locator("fieldset.head")
            expect(heads).to_have_count(len(HEADS))
            # sync: left, adherence: right, motion: tie, visual: skip; back up to
            # visual and make it right; audio: left; Enter saves.
            for key in ("1", "2", "0", "s", "ArrowUp", "2", "1"):
                page.keyboard.press(key)
            expect(heads.nth(len(HEADS) - 1)).to_have_class(re.compile("focused"))
            page.keyboard.press("Enter")
            expect(page.locator("#status")).to_contain_text("saved judgement")
            expect(page.locator("#error")).to_have_text("")
            # The next pair follows, counted as the rater's second.
            expect(page.locator("#progress")).to_contain_text("1 of 4 pairs judged by you")
        finally:
            browser.close()
    rows, judgements = _loaded(table)
    assert len(judgements) == 1
    j = judgements[0]
    assert (j["left"], j["right"], j["rater_id"], j["tenant"], j["source"]) == (
        *pair, "ann", "a", "human",
    )  # fmt: skip
    choices = {h: j[f"choice_{h}"] for h in HEADS}
    assert choices == {"sync": "left", "adherence": "right", "motion": "tie",
                       "visual": "right", "audio": "left"}  # fmt: skip
    human = [p for p in weighted_pairs(rows, "adherence", 0.05, judgements, human_weight=2.0)]
    assert [(candidate_id(p.winner), candidate_id(p.loser), p.weight) for p in human] == [
        (pair[1], pair[0], 2.0)
    ]
    assert json.dumps(j, default=str)  # a plain row, nothing pickled
