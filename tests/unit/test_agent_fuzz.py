"""parse_reply against hostile input: it raises AgentError or returns a sane report, nothing else."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import fields

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rescoin.hosts.agent import AgentError, AgentReport, parse_reply

KEY = b"fuzz-key-0123456789abcdef"
NOW = 1_700_000_000.0
#: RESCOIN_FUZZ_EXAMPLES=5000 for a longer run
FUZZ = settings(max_examples=int(os.environ.get("RESCOIN_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def valid_reply(nonce: str = "n0") -> dict:
    return {
        "v": 1, "ts": NOW, "nonce": nonce,
        "mem": {"total_kib": 4_000_000, "available_kib": 3_000_000, "free_kib": 2_000_000,
                "swap_total_kib": 1_000_000, "swap_free_kib": 900_000},
        "vmstat": {"pgmajfault": 12345, "pswpin": 678},
        "cpu": {"total_ticks": 10_000_000, "steal_ticks": 4321},
        "psi": {
            "memory": {"some_avg10": 1.5, "some_avg60": 1.0, "some_avg300": 0.5, "some_total": 999,
                       "full_avg10": 0.5, "full_avg60": 0.2, "full_avg300": 0.1, "full_total": 99},
            "cpu": {"some_avg10": 20.0, "some_avg60": 10.0, "some_avg300": 5.0, "some_total": 12345},
            "io": {"some_avg10": 3.0, "some_avg60": 2.0, "some_avg300": 1.0, "some_total": 4567},
        },
    }


def sign(payload: str, key: bytes = KEY) -> bytes:
    mac = hmac.new(key, payload.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return json.dumps({"payload": payload, "hmac": mac}).encode()


def assert_sane(report: AgentReport) -> None:
    assert isinstance(report, AgentReport)
    for f in fields(AgentReport):
        value = getattr(report, f.name)
        assert isinstance(value, float), f.name
        assert math.isnan(value) or (math.isfinite(value) and value >= 0), (f.name, value)
    for name in ("psi_memory_some", "psi_memory_full", "psi_cpu_some", "psi_io_some"):
        value = getattr(report, name)
        assert math.isnan(value) or value <= 100.0
    if not math.isnan(report.used_mib):
        assert report.used_mib >= 0


def outcome(line, **kw):
    """parse_reply's result, or None if it raised AgentError. Anything else fails the test."""
    try:
        report = parse_reply(line, **kw)
    except AgentError as e:
        assert str(e), "an AgentError says why"
        return None
    assert_sane(report)
    return report


def every_way(line):
    outcome(line)
    outcome(line, nonce="n0")
    outcome(line, key=KEY, nonce="n0", now=NOW)


# JSON-ish values, including what Python's json writes for NaN/Infinity and huge ints
scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
)


def nested(leaves):
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


junk = nested(scalars)
#: standard JSON only (no NaN/Infinity constants, which are rejected wherever they appear)
plain_junk = nested(st.one_of(st.none(), st.booleans(), st.text(max_size=20),
                              st.integers(min_value=-(10**30), max_value=10**30),
                              st.floats(allow_nan=False, allow_infinity=False)))

FIELD_PATHS = [
    ("v",), ("ts",), ("nonce",), ("mem",), ("vmstat",), ("cpu",), ("psi",),
    *(("mem", k) for k in valid_reply()["mem"]),
    ("vmstat", "pgmajfault"), ("vmstat", "pswpin"),
    ("cpu", "total_ticks"), ("cpu", "steal_ticks"),
    ("psi", "memory"), ("psi", "io"),
    *(("psi", "memory", k) for k in valid_reply()["psi"]["memory"]),
    ("psi", "cpu", "some_avg10"), ("psi", "io", "some_avg10"),
]


def with_value(path, value) -> dict:
    reply = valid_reply()
    target = reply
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return reply


@FUZZ
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\n")
@example(b"[" * 50_000)
@example(b'{"v":1,"ts":' + b"9" * 5000 + b"}")
@example(b'{"v":1,"ts":1e400}')
@example(b'{"v":1,"ts":-0.0}')
@example(b'{"payload":"\\ud800","hmac":"' + b"0" * 64 + b'"}')
def test_random_bytes(data):
    every_way(data)


@FUZZ
@given(st.integers(min_value=0, max_value=2000), st.booleans())
def test_truncated_valid_replies(cut, signed):
    text = json.dumps(valid_reply())
    line = (sign(text) if signed else text.encode())
    every_way(line[:cut])


@FUZZ
@given(st.sampled_from(FIELD_PATHS), junk)
def test_any_field_any_value(path, value):
    text = json.dumps(with_value(path, value))  # NaN/Infinity are written as bare constants
    every_way(text.encode())
    every_way(sign(text))


@FUZZ
@given(st.sampled_from(FIELD_PATHS),
       st.one_of(st.floats(), st.integers(min_value=-(2**80), max_value=2**80),
                 st.sampled_from([float("nan"), float("inf"), -float("inf"), -1, -1e-300, 1e308, 2**64, 2**64 + 1])))
def test_numbers_out_of_range(path, number):
    every_way(json.dumps(with_value(path, number)).encode())


@FUZZ
@given(junk, st.dictionaries(st.text(max_size=10), plain_junk, max_size=5))
def test_nested_junk(top, extra):
    every_way(json.dumps(top).encode())
    reply = valid_reply()
    reply.update(extra)
    report = outcome(json.dumps(reply).encode(), nonce="n0")
    known = {"v", "ts", "nonce", "mem", "vmstat", "cpu", "psi", "error", "payload", "hmac"}
    if not set(extra) & known:
        assert report is not None  # unknown keys are ignored


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=63), st.text(max_size=40))
def test_envelopes_with_bad_hmac(other_key, flip, junk_text):
    payload = json.dumps(valid_reply())
    good = json.loads(sign(payload))
    assert outcome(json.dumps(good).encode(), key=KEY, nonce="n0", now=NOW) is not None

    mac = good["hmac"]
    flipped = mac[:flip] + ("0" if mac[flip] != "0" else "1") + mac[flip + 1:]
    for envelope in (
        {"payload": payload, "hmac": flipped},
        {"payload": payload, "hmac": hmac.new(other_key, payload.encode(), hashlib.sha256).hexdigest()},
        {"payload": payload, "hmac": junk_text},
        {"payload": payload, "hmac": mac, "extra": 1},
        {"payload": json.loads(payload), "hmac": mac},
        {"payload": payload + junk_text, "hmac": mac},
    ):
        if envelope == good:  # e.g. empty junk_text, or other_key happened to be KEY
            continue
        assert outcome(json.dumps(envelope).encode(), key=KEY, nonce="n0", now=NOW) is None


@FUZZ
@given(st.fixed_dictionaries({
    "total": st.integers(min_value=0, max_value=2**50),
    "avail_frac": st.floats(min_value=0, max_value=1),
    "psi": st.floats(min_value=0, max_value=100),
    "ticks": st.integers(min_value=0, max_value=2**63),
}), st.text(max_size=40))
def test_signed_valid_replies_parse(values, nonce):
    reply = valid_reply(nonce)
    reply["mem"] = {"total_kib": values["total"], "available_kib": int(values["total"] * values["avail_frac"])}
    reply["psi"]["io"]["some_avg10"] = values["psi"]
    reply["cpu"] = {"total_ticks": values["ticks"], "steal_ticks": values["ticks"] // 3}
    report = outcome(sign(json.dumps(reply)), key=KEY, nonce=nonce, now=NOW + 5)
    assert report is not None
    assert report.mem_total_mib == values["total"] / 1024
    assert report.psi_io_some == values["psi"]
