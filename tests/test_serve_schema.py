"""schemathesis against the served OpenAPI: no 500s, responses match the schema.

The app is served by uvicorn on loopback (the same FastAPI app the Serve ingress
wraps, jobs on an in-process worker). Valid submissions start real (one-step, tiny)
generations; the pending-job cap keeps that bounded, so many submissions are
answered 429, which the schema documents.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from serve.config import serve_config_from
from serve.local import ServerThread, build_local_app

KEY = "schema-test-key"


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": str(tmp_path_factory.mktemp("serve_schema") / "jobs"),
            "api_keys": [KEY],
            "fast": {"steps": 1, "sampler": "euler"},
            "full": {"steps": 1, "sampler": "euler"},
            "limits": {"max_duration_s": 1.0, "max_pending_jobs": 2, "max_upload_bytes": 100_000},
        }
    )
    app, backend = build_local_app(config)
    with ServerThread(app) as server:
        yield server.url
    backend.close()


def test_api_conforms_to_its_openapi(served):
    schema = schemathesis.openapi.from_url(served + "openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8  # every route of the API is in the schema
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            # Whole-request rules the schema cannot state (a prompt unless multi-shot,
            # the URI policy, references that must decode as media) answer 422 to some
            # schema-valid bodies: positive-data acceptance is the one check left out.
            case.call_and_validate(
                headers={"X-API-Key": KEY}, excluded_checks=[checks.positive_data_acceptance]
            )

        check()
