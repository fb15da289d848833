"""Property-based tests (hypothesis) for what users and the wire hand taskmesh: sizes,
requirement headers and the config file. Each property says what must hold for *every*
input: a round trip is exact, and garbage gets taskmesh's own error, never another exception."""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskmesh.core.config import load_config
from taskmesh.core.config_schema import SCHEMA
from taskmesh.core.errors import ConfigError, RequirementError
from taskmesh.core.profiles import Profile
from taskmesh.core.requirements import Requirement
from taskmesh.core.sizes import SizeError, format_mib, parse_mib

# no example database in the checkout, no deadline on a loaded machine
settings.register_profile("taskmesh", database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("taskmesh")

# the edges that break arithmetic: not-a-number, infinities, integers too large for a float
edges = st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400, -(10**400), 0, -1, 1e308, ""])
json_values = st.recursive(
    edges | st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# what kombu's JSON encoder carries and rebuilds on the worker, beyond plain JSON
kombu_values = st.datetimes() | st.decimals(allow_nan=False) | st.uuids() | st.binary(max_size=8)
anything = json_values | kombu_values


# --- sizes ---------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=2**40))
def test_a_formatted_size_reads_back_as_the_same_size_or_within_its_rounding(mib):
    back = parse_mib(format_mib(mib))
    if mib < 1024 or mib % 1024 == 0:
        assert back == mib
    else:
        assert abs(back - mib) <= 0.05 * 1024 + 1  # one decimal of GiB, as people read GPU memory


@given(st.integers(min_value=1, max_value=2**40), st.sampled_from(["", "MiB", "mib", " MiB"]))
def test_whole_mib_read_exactly(mib, unit):
    assert parse_mib(f"{mib}{unit}") == mib == parse_mib(mib)


@given(st.integers(min_value=1, max_value=2**20), st.sampled_from([("GiB", 1024), ("TiB", 1024**2)]))
def test_binary_units_multiply_exactly(count, unit):
    name, factor = unit
    assert parse_mib(f"{count}{name}") == count * factor


@given(st.text(max_size=30) | st.from_regex(r"\s*\d{1,400}(\.\d{1,40})?\s*[a-zA-Z]{0,4}\s*", fullmatch=True)
       | st.sampled_from(["9" * 400, "1" + "0" * 310 + "GiB", "0.000001", "1e400", "inf", "nan"]))
def test_any_text_is_a_positive_size_or_a_size_error(text):
    try:
        mib = parse_mib(text)
    except SizeError as exc:
        assert "write it like '6GiB'" in str(exc)
    else:
        assert isinstance(mib, int) and mib >= 1


@given(anything)
def test_any_value_is_a_positive_size_or_a_size_error(value):
    try:
        mib = parse_mib(value)
    except SizeError:
        return
    assert isinstance(mib, int) and mib >= 1


# --- requirement headers ----------------------------------------------------------------


@st.composite
def requirements(draw) -> Requirement:
    profile = draw(st.sampled_from(list(Profile)))
    gpu = profile.uses_gpu
    return Requirement(
        profile=profile,
        vram_mib=draw(st.none() | st.integers(1, 2**22)) if gpu else None,
        min_compute_capability=draw(st.none() | st.tuples(st.integers(0, 12), st.integers(0, 9))) if gpu else None,
        cpu_cores=draw(st.none() | st.floats(0.01, 1024, allow_nan=False)),
        cpu_threads=draw(st.integers(1, 512)),
        memory_mib=draw(st.none() | st.integers(1, 2**24)),
        gpus=draw(st.integers(1, 16)) if gpu else 0,
        exclusive=draw(st.booleans()),
        fallback=draw(st.none() | st.sampled_from([p for p in Profile if p is not profile])),
        model=draw(st.none() | st.text(min_size=1, max_size=20).filter(str.strip)),
        priority=draw(st.none() | st.integers(0, 9)),
    )


@given(requirements())
def test_a_requirement_survives_the_header_and_json_exactly(requirement):
    header = json.loads(json.dumps(requirement.to_header()))  # what a worker gets from Redis
    assert Requirement.from_header(header) == requirement


FIELDS = ["profile", "vram_mib", "min_compute_capability", "cpu_cores", "cpu_threads", "memory_mib", "gpus",
          "exclusive", "fallback", "model", "priority"]


@settings(max_examples=400)
@given(anything | st.dictionaries(st.sampled_from(FIELDS), anything, max_size=6)
       | requirements().flatmap(lambda r: st.fixed_dictionaries(
           {}, optional={f: anything for f in FIELDS}).map(lambda bad: {**r.to_header(), **bad})))
def test_any_header_is_a_requirement_or_a_requirement_error(header):
    try:
        requirement = Requirement.from_header(header, "t")
    except RequirementError as exc:
        assert str(exc).startswith("task 't': header")
        return
    assert isinstance(requirement, Requirement)
    # what it read is one to_header could have written: reading it back changes nothing
    assert Requirement.from_header(json.loads(json.dumps(requirement.to_header()))) == requirement
    if requirement.profile.uses_gpu:
        assert requirement.gpus >= 1  # a GPU task never reads as one that needs no GPU


EDGES = [float("nan"), float("inf"), -1.5, 10**400, -(10**400), 0, True, "", "2", [], {}, [1, 2, 3],
         datetime(2026, 1, 1), Decimal("2"), uuid.UUID(int=3), b"8"]


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_holding_an_edge_value_is_read_or_refused_by_name(field):
    for value in EDGES:
        try:
            Requirement.from_header({"profile": "gpu", field: value}, "t")
        except RequirementError as exc:
            assert f"taskmesh.{field}" in str(exc) or "GPU resources" in str(exc) or "own profile" in str(exc)


def test_kombu_carried_types_in_a_header_are_refused_by_name():
    for value in (datetime(2026, 1, 1), Decimal("2"), uuid.UUID(int=3), b"8"):
        try:
            Requirement.from_header({"profile": "gpu", "vram_mib": value}, "t")
        except RequirementError as exc:
            assert "taskmesh.vram_mib is" in str(exc)
        else:
            raise AssertionError(f"{value!r} was read as a size")


# --- config -------------------------------------------------------------------------


def _leaves(schema, path=()):
    for key, rule in schema.items():
        key = {"*": "somename"}.get(key, key)
        if callable(rule):
            yield (*path, key)
        else:
            yield (*path, key)  # a whole section replaced by a bad value, too
            yield from _leaves(rule, (*path, key))


LEAVES = sorted(set(_leaves(SCHEMA)))
yaml_values = st.recursive(
    edges | st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10) | st.integers(), inner,
                                                                max_size=3),
    max_leaves=8,
)


@settings(max_examples=400)
@given(st.lists(st.tuples(st.sampled_from(LEAVES), yaml_values), min_size=1, max_size=3))
def test_any_value_under_known_keys_loads_or_is_a_config_error(entries):
    data: dict = {}
    for path, value in entries:
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):  # an earlier entry replaced this section by a bad value
                break
        else:
            node[path[-1]] = value
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "hw.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            config = load_config(path)
        except ConfigError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
    admission = config.admission
    assert math.isfinite(admission.reservation_ttl_s) and admission.reservation_ttl_s >= 6
    assert math.isfinite(config.rebalance.interval_s) and config.rebalance.interval_s >= 0.5
    assert admission.registry_memory_s >= admission.reservation_ttl_s


def test_every_known_key_holding_an_edge_value_loads_or_is_a_config_error():
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "hw.yaml"
        for leaf in LEAVES:
            for value in [float("nan"), float("inf"), 10**400, 1e308, -1, 0, "", [], {}, "lots"]:
                data: dict = value
                for key in reversed(leaf):
                    data = {key: data}
                path.write_text(yaml.safe_dump(data))
                try:
                    load_config(path)
                except ConfigError:
                    pass
