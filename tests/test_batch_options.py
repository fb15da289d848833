"""Batching and caching options: a bad declaration fails at import naming the task and the fix;
a batch task called with anything but one item is refused at submit; an unknown batch id is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from taskmesh import RequirementError, create_app
from taskmesh.core.batching import Batching, parse_seconds
from taskmesh.core.requirements import Requirement

from .conftest import ROOT


@pytest.fixture
def app():
    return create_app("myapp.tasks", broker="redis://127.0.0.1:1/0")


def declare(app, **options):
    @app.task(name="myapp.tasks.embed", **options)
    def embed(items):
        return items

    return embed


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, r"task 'myapp.tasks.embed': batch_size 0 must be a whole number >= 1"),
        ({"batch_size": "32"}, r"batch_size '32' must be a whole number"),
        ({"batch_wait": "50ms"}, r"batch_wait is set without batch_size; add batch_size=32 or remove batch_wait"),
        ({"batch_size": 8, "batch_wait": "soon"}, r"batch_wait: 'soon' is not a duration; write it like '50ms'"),
        ({"batch_size": 8, "vram_per_item": "1GiB"}, r"vram_per_item is set but profile 'cpu_light' runs on no GPU"),
        ({"profile": "gpu", "batch_size": 8, "vram_per_item": "lots"}, r"vram_per_item: .*write it like '6GiB'"),
        ({"cache_ttl": 0}, r"cache_ttl 0 must be above 0, such as '5m'"),
        ({"cache_ttl": "-5m"}, r"cache_ttl: '-5m' is not a duration"),
    ],
)
def test_bad_batching_options_fail_at_import_naming_the_task(app, options, message):
    with pytest.raises(RequirementError, match=message):
        declare(app, **options)


def test_durations_and_what_a_batch_needs():
    assert [parse_seconds(v) for v in ("50ms", "2s", "5m", "1h", 0.25, "3")] == [0.05, 2.0, 300.0, 3600.0, 0.25, 3.0]
    batching = Batching(size=32, vram_per_item_mib=256)
    base = Requirement.from_options("t", {"profile": "gpu", "vram": "4GiB"})
    assert batching.requirement(base, 10).vram_mib == 4096 + 2560
    assert batching.items_that_fit(base, 8192) == 16  # (8 GiB - 4 GiB) / 256 MiB
    assert batching.items_that_fit(base, 4096) == 1  # never less than one
    assert Batching(size=32).requirement(base, 32) == base  # declared vram covers the whole batch


def test_a_batch_task_takes_one_item_per_call(app):
    embed = declare(app, profile="gpu", vram="1GiB", batch_size=8)
    with pytest.raises(TypeError, match=r"send one item per call, as .delay\(item\)"):
        embed.delay(1, 2)
    with pytest.raises(TypeError, match="one item per call"):
        embed.apply_async((1,), {"x": 2})


def test_an_unknown_batch_id_is_one_line_and_exit_2(broker_url):
    done = subprocess.run([sys.executable, "-m", "taskmesh", "-A", "tests.apps.batch_app", "batch", "status", "nope"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == ("taskmesh: error: no batch 'nope': check the id submit_batch returned (jobs are "
                                   "kept as long as their results, result_expires)")
