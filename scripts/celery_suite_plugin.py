"""pytest plugin: run Celery's own integration suite (``t/integration/``) on a taskmesh app.

Loaded by ``scripts/celery-suite`` as ``-p celery_suite_plugin`` (``scripts/`` on
``PYTHONPATH``). Without ``--taskmesh`` it changes nothing, so the same command gives the
plain-Celery baseline.

The seam. Both apps the suite uses are built by ``celery.contrib.pytest._create_app``:
``celery_session_app`` (the embedded session worker runs on it) and the per-test
``celery_app`` (behind the suite's ``app`` and ``manager`` fixtures: the producer side,
``inspect``, results). ``_create_app`` looks up
``celery.contrib.testing.app.TestApp`` when it is called and hands it the suite's whole
configuration: its ``celery_config`` fixture merged with any ``@pytest.mark.celery``
overrides. Replacing that one factory is the cleanest place to swap the app:

- Overriding the ``celery_app``/``celery_session_app`` fixtures from a plugin does not
  work: the suite's ``t/integration/conftest.py`` imports both into its own namespace,
  and a conftest's fixtures shadow every plugin's.
- ``celery_parameters`` (with ``task_cls``/``app_cls``) only reaches ``Celery(**kwargs)``:
  it can set taskmesh's task base but not what ``create_app`` adds (its queues and
  router, its defaults, the admission bootstep, the rebalance task).

So with ``--taskmesh`` the factory below calls ``taskmesh.create_app`` with the suite's
configuration as keyword arguments, and ``create_app``'s keyword arguments win over its
own defaults: the suite's broker, backend and settings are kept, and everything the
suite does not set (JSON-only serialization, the four typed queues with ``cpu_light`` as
the default queue, late acks, prefetch 1, priority 6 by default, ...) stays taskmesh's.
Celery's test-harness defaults (``DEFAULT_TEST_CONFIG``) go under both, with
``add_defaults``, just as ``TestApp`` puts them under the suite's.
The suite's tasks are ``shared_task``s, so they register on whichever app finalizes: the
taskmesh apps here.

The queue guard. The suite's autouse ``ZZZZ_set_app_current`` fixture fails every test at
teardown unless both apps declare exactly the ``celery`` queue; a taskmesh app declares
its four typed queues, so in taskmesh mode every test errors there, and the suite's
``flaky`` reruns (up to five, each restarting the session worker) multiply the run time.
``--queue-guard=report`` (off by default: the suite as shipped) records that one failure
instead, listed at the end of the run, so the tests' own outcomes can be seen. Only a
teardown failure carrying the guard's message is changed; anything else fails as usual.

One setting at a time. ``--celery-conf KEY=VALUE`` (repeatable; VALUE is JSON, else a
string) goes over the suite's configuration in either mode, through the same factory, so
a difference can be pinned to one setting: e.g. ``--plain --celery-conf
task_track_started=true`` shows what plain Celery does with taskmesh's value.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

_original_test_app = None
_overrides: dict[str, Any] = {}
GUARD_MESSAGE = "must only use the shared celery queue"
_guarded = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-suite", "Celery's integration suite on taskmesh")
    group.addoption(
        "--taskmesh",
        action="store_true",
        default=False,
        help="build the suite's Celery apps with taskmesh.create_app (default: plain Celery)",
    )
    group.addoption(
        "--queue-guard",
        choices=("fail", "report"),
        default="fail",
        help="the suite's only-the-celery-queue teardown check: fail the test (default, as shipped) "
        "or report it at the end and keep the test's own outcome",
    )
    group.addoption(
        "--celery-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Celery setting over the suite's configuration, in either mode (VALUE is JSON, else a string)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to settings; a malformed pair is a usage error naming it."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise pytest.UsageError(
                f"celery-suite: --celery-conf {item!r} is not KEY=VALUE (e.g. task_track_started=true)"
            )
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        overrides[key.strip()] = value
    return overrides


def plain_test_app(*args: Any, config: dict[str, Any] | None = None, **kwargs: Any):
    """The suite's own ``TestApp``, with the ``--celery-conf`` settings over its configuration."""
    return _original_test_app(*args, config={**(config or {}), **_overrides}, **kwargs)


def taskmesh_test_app(
    name: str | None = None,
    config: dict[str, Any] | None = None,
    enable_logging: bool = False,
    set_as_current: bool = False,
    log: Any = None,
    backend: str | None = None,
    broker: str | None = None,
    **kwargs: Any,
):
    """``celery.contrib.testing.app.TestApp``'s signature, returning a taskmesh app."""
    from celery.contrib.testing import app as testing_app
    from celery.contrib.testing import tasks  # noqa: F401  registers celery.ping, as TestApp does

    from taskmesh import create_app

    if kwargs:
        # celery_parameters are Celery() constructor arguments, which create_app does not
        # take; the integration suite sets none.
        raise pytest.UsageError(f"celery-suite --taskmesh: celery_parameters {sorted(kwargs)} are not supported")
    conf = {**(config or {}), **_overrides}
    if broker is not None:
        conf["broker_url"] = broker
    if backend is not None:
        conf["result_backend"] = backend
    app = create_app(name or "celery.tests", broker=conf.get("broker_url"), **conf)
    harness = copy.deepcopy(testing_app.DEFAULT_TEST_CONFIG)
    for key in ("broker_url", "result_backend"):
        harness.pop(key, None)  # the suite's own, passed above, always wins here
    app.add_defaults(harness)
    if not enable_logging:
        app.log_cls = log or testing_app.UnitLogging  # what TestApp passes as Celery(log=...)
    return app


def pytest_configure(config: pytest.Config) -> None:
    global _original_test_app
    config.stash[_guarded] = []
    _overrides.clear()
    _overrides.update(parse_overrides(config.getoption("--celery-conf")))
    taskmesh = config.getoption("--taskmesh")
    if not taskmesh and not _overrides:
        return
    from celery.contrib.testing import app as testing_app

    _original_test_app = testing_app.TestApp
    testing_app.TestApp = taskmesh_test_app if taskmesh else plain_test_app


def pytest_unconfigure(config: pytest.Config) -> None:
    global _original_test_app
    if _original_test_app is not None:
        from celery.contrib.testing import app as testing_app

        testing_app.TestApp = _original_test_app
        _original_test_app = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if (
        report.when == "teardown"
        # on an xfail-marked test pytest has already turned the guard's failure into an xfail
        and (report.failed or hasattr(report, "wasxfail"))
        and item.config.getoption("--queue-guard") == "report"
        and call.excinfo is not None
        and GUARD_MESSAGE in str(call.excinfo.value)
    ):
        item.config.stash[_guarded].append((item.nodeid, str(call.excinfo.value).splitlines()[0]))
        report.outcome = "passed"
        report.longrepr = None
        if hasattr(report, "wasxfail"):
            del report.wasxfail
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    guarded = config.stash.get(_guarded, [])
    if guarded:
        terminalreporter.section("celery-suite: queue guard (reported, not failed)")
        messages = sorted({message for _, message in guarded})
        terminalreporter.write_line(f"{len(guarded)} test teardowns hit the suite's queue guard:")
        for message in messages:
            terminalreporter.write_line(f"  {message}")


def pytest_report_header(config: pytest.Config) -> str:
    extra = f", settings over the suite's: {_overrides}" if _overrides else ""
    if config.getoption("--taskmesh"):
        import taskmesh

        return f"celery-suite: taskmesh mode (taskmesh {taskmesh.__version__}, apps from taskmesh.create_app){extra}"
    return f"celery-suite: plain mode (the suite's own Celery apps){extra}"
