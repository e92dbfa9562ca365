"""Assertions and waiting shared by the test modules (plain functions: conftest.py holds
the fixtures)."""
import time


def assert_error(r, status):
    """An error answer: the status, JSON, with an "error" sentence."""
    assert r.status == status, f"expected {status}, got {r.status}: {r.body!r}"
    assert "json" in r.headers.get("content-type", ""), \
        f"error answer is not JSON: {r.headers.get('content-type')!r} {r.raw[:300]!r}"
    assert isinstance(r.body, dict), r.body
    assert isinstance(r.body.get("error"), str) and r.body["error"].strip(), r.body
    return r.body


def assert_ok(r):
    assert r.status == 200, f"expected 200, got {r.status}: {r.body!r}"
    assert "json" in r.headers.get("content-type", ""), r.headers
    assert isinstance(r.body, dict), r.body
    return r.body


def wait_until(pred, timeout=10.0, step=0.05):
    """pred()'s first true value, or its last value once timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)
