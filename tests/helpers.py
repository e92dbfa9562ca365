"""Assertions and waiting shared by the test modules (plain functions: conftest.py holds
the fixtures)."""
import os
import time
from pathlib import Path


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


def proc_table():
    """pid -> dict(ppid, comm, uid (real, effective, saved, fs), cap_eff, state, cmdline)
    for every process on the host."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            table[int(name)] = {
                "ppid": int(fields["PPid"].strip()),
                "comm": fields["Name"].strip(),
                "uid": [int(x) for x in fields["Uid"].split()],
                "cap_eff": int(fields.get("CapEff", "0").strip(), 16),
                "state": fields.get("State", "").strip(),
                "cmdline": cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip(),
            }
        except (KeyError, ValueError):
            continue
    return table


def descendants(pid, table=None):
    table = table if table is not None else proc_table()
    children = {}
    for p, info in table.items():
        children.setdefault(info["ppid"], []).append(p)
    out, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out[child] = table[child]
                todo.append(child)
    return out
