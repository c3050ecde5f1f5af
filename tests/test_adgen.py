"""Ad-variant briefs and the ``adgen`` flow.

Expansion is checked on its own; the flow runs against the job API served on
loopback (in-process worker, random ``tiny`` weights): MP4s and a results table
come out, one bad variant is recorded without stopping the others, and a rerun
skips what is finished."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.adgen import BriefError, load_brief, read_results
from serve.config import serve_config_from
from serve.local import ServerThread, build_local_app

KEY = "adgen-test-key"

BRIEF = """
name = "sneaker"
prompt_templates = ["a {colour} ball bounces on a {setting}"]
seeds = [0, 1]
durations = [1.0]
aspect_ratios = ["1:1", "9:16"]
quality = "fast"
[slots]
colour = ["red", "blue"]
setting = ["beach"]
"""


def test_a_brief_expands_to_every_combination(tmp_path):
    (tmp_path / "b.toml").write_text(BRIEF)
    name, variants = load_brief(str(tmp_path / "b.toml"))
    assert name == "sneaker"
    assert len(variants) == 2 * 1 * 2 * 1 * 2
    assert {v.prompt for v in variants} == {
        "a red ball bounces on a beach",
        "a blue ball bounces on a beach",
    }
    # Ids are a hash of what decides the clip: the same brief gives the same ids.
    again = [v.variant_id for v in load_brief(str(tmp_path / "b.toml"))[1]]
    assert again == [v.variant_id for v in variants] and len(set(again)) == 8


def test_csv_brief_rows_are_variants(tmp_path):
    (tmp_path / "rows.csv").write_text(
        "prompt,colour,seed,aspect_ratio,variant_id\n"
        "a {colour} ball,red,3,16:9,red-wide\n"
        "a {colour} ball,blue,,1:1,\n"
    )
    _, variants = load_brief(str(tmp_path / "rows.csv"))
    assert [v.prompt for v in variants] == ["a red ball", "a blue ball"]
    assert variants[0].variant_id == "red-wide" and variants[0].seed == 3
    assert variants[1].seed == 0 and variants[1].variant_id.startswith("v-")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('prompt_templates = ["a {shape}"]\n[slots]\ncolour = ["red"]', "unknown slot"),
        ('prompt_templates = ["a ball"]\nquality = "ultra"', "quality must be one of"),
        ('prompt_templates = ["a ball"]\nseedz = [1]', "unknown field"),
        ("prompt_templates = []", "at least one template"),
    ],
)
def test_bad_briefs_say_what_is_wrong(tmp_path, text, needle):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(BriefError, match=needle):
        load_brief(str(tmp_path / "bad.toml"))


@pytest.fixture
def served(tiny_checkpoint, tmp_path):
    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": str(tmp_path / "jobs"),
            "api_keys": [KEY],
            "fast": {"steps": 1, "sampler": "euler"},
            "price_per_compute_s": 0.5,
        }
    )
    app, backend = build_local_app(config)
    with ServerThread(app) as server:
        yield server.url, app
    backend.close()


@pytest.mark.slow
def test_adgen_flow_writes_videos_and_results_and_reruns_skip(served, tmp_path):
    from flows.adgen import adgen

    url, app = served
    brief = tmp_path / "brief.csv"
    brief.write_text(
        "prompt,colour,aspect_ratio,duration_s,variant_id,product_references\n"
        "a {colour} ball bounces,red,1:1,1.0,red-square,\n"
        "a {colour} ball bounces,blue,9:16,1.0,blue-tall,\n"
        # Not allowed by the URI policy: this variant fails, the others do not.
        "a {colour} ball bounces,green,1:1,1.0,green-bad,file:///etc/passwd\n"
        "a {colour} ball bounces,pink,1:1,1.0,../escape,\n"
    )
    out = tmp_path / "out"
    summary = adgen(str(brief), str(out), serve_url=url, api_key=KEY, concurrency=2,
                    price_per_compute_s=0.5)  # fmt: skip
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (2, 2, 0)
    table = pq.read_table(out / "results.parquet")
    assert table.schema.metadata[b"schema_version"] == b"1"
    rows = {r["variant_id"]: r for r in table.to_pylist()}
    assert rows["red-square"]["status"] == "succeeded"
    assert (rows["blue-tall"]["probe_width"], rows["blue-tall"]["probe_height"]) == (36, 64)
    assert rows["red-square"]["probe_has_audio"] and rows["red-square"]["compute_s"] > 0
    assert rows["red-square"]["cost_estimate"] == pytest.approx(
        0.5 * rows["red-square"]["compute_s"], rel=1e-3
    )
    assert (out / "videos" / "red-square.mp4").stat().st_size > 1000
    assert "HTTP 403" in rows["green-bad"]["error"] and "not allowed" in rows["green-bad"]["error"]
    assert "not allowed" in rows["../escape"]["error"]  # output names cannot escape
    assert not (tmp_path / "escape.mp4").exists()

    jobs_before = len(app.state.store.job_ids())
    again = adgen(str(brief), str(out), serve_url=url, api_key=KEY, concurrency=2)
    assert (again["skipped"], again["ran"]) == (2, 2)  # only the failed ones ran again
    assert len(app.state.store.job_ids()) == jobs_before  # both failed before any job
    rerun = {r["variant_id"]: r for r in read_results(str(out / "results.parquet"))}
    assert rerun["red-square"]["job_id"] == rows["red-square"]["job_id"]
