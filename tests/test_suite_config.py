"""The test suite's own machinery: strict pytest settings and the xdist work units."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from xdist.scheduler import LoadScopeScheduling


def _conftest(config):
    return next(
        p for p in config.pluginmanager.get_plugins()
        if hasattr(p, "pytest_xdist_make_scheduler") and hasattr(p, "_scheduler_class")
    )  # fmt: skip


def test_pytest_is_strict_about_markers_and_xfails(pytestconfig):
    assert pytestconfig.getini("xfail_strict") is True
    assert pytestconfig.option.strict_markers


def test_xdist_scheduler_keeps_modules_of_one_shared_fixture_together(pytestconfig):
    """conftest's scheduler overrides xdist's private ``_split_scope``: if xdist stops
    calling it (or renames it), whole-module units and shared fixtures silently stop
    working (every worker would build the expensive fixtures), so this fails first."""
    assert "self._split_scope(" in inspect.getsource(LoadScopeScheduling)
    cls = _conftest(pytestconfig)._scheduler_class()
    assert issubclass(cls, LoadScopeScheduling)
    scheduler = cls.__new__(cls)  # _split_scope reads no state; __init__ needs a live session
    unit = scheduler._split_scope
    assert unit("tests/test_align.py::a") == unit("tests/test_learning_signal.py::b[x]")
    assert unit("tests/test_train_e2e.py::a") == unit("tests/test_flow_train.py::b")
    assert unit("tests/test_cli.py::a") == unit("tests/test_cli.py::b")
    assert unit("tests/test_cli.py::a") != unit("tests/test_media.py::a")


# conftest's expensive session fixtures and the work unit that builds each one once.
_UNIT_OF_SESSION_FIXTURE = {
    "tiny_chain_run": "tiny_chain_run",
    "tiny_curated_corpus": "tiny_curated_corpus",
    "tiny_vae_run": "tiny_curated_corpus",
}

# Known crossings: test_align.py's grammar-prompt test needs the curated corpus's
# many captions (the chain's corpus has too few) and sits in the chain's unit; the
# corpus unit's worker is usually the first free one, so the chain's unit follows it
# there, and when it does not the corpus is curated twice (~35 s).
_CROSSES_UNITS = {("tests/test_align.py", "tiny_curated_corpus")}


def test_every_test_of_a_shared_session_fixture_runs_in_its_unit(request):
    """A module that asks for an expensive session fixture (directly or through another
    fixture) but is left out of conftest's units builds it a second time on the other
    worker (test_contrast_pairs.py rebuilt the one-minute chain, ~40 s, until it was
    listed). Checks the items this session collected: all of them under `make test`."""
    work_unit = _conftest(request.config)._work_unit
    for item in request.session.items:
        module = item.nodeid.split("::", 1)[0]
        for fixture, unit in _UNIT_OF_SESSION_FIXTURE.items():
            if fixture in item.fixturenames and (module, fixture) not in _CROSSES_UNITS:
                assert work_unit(item.nodeid) == unit, (item.nodeid, fixture)


def test_fast_suite_refuses_to_start_ray_or_prefect(pytestconfig, monkeypatch):
    """`make test-fast` promises no Ray and no Prefect server: under ``-m "not slow"``
    conftest makes starting either an error that names the missing `slow` mark."""
    import ray
    from prefect.server.api import server

    # Setting each attribute to itself makes monkeypatch restore it after the test.
    monkeypatch.setattr(ray, "init", ray.init)
    monkeypatch.setattr(server.SubprocessASGIServer, "start", server.SubprocessASGIServer.start)
    fast = SimpleNamespace(getoption=lambda name, default=None: "not slow")
    _conftest(pytestconfig).pytest_configure(fast)
    with pytest.raises(RuntimeError, match="must not start Ray: mark this test `slow`"):
        ray.init(num_cpus=1)
    with pytest.raises(RuntimeError, match="must not start a Prefect API server"):
        server.SubprocessASGIServer.start(None)
