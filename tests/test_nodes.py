"""Several servers on one Redis: the queue is shared, every server consumes with its free run
slots, a full server's sync calls overflow to the others, and every failure ends each call
with exactly one final record: kill -9 of a server mid-call, a server frozen (SIGSTOP) past
its lease, drain, Redis restarted with AOF (nothing accepted is lost) and without it (a
clear 503, then recovery). One loopback redis-server with AOF, started here; small pools."""
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import assert_error, assert_ok, proc_table, wait_until
from tests.test_attacks import server_cgroup_dirs
from tests.test_calls import SLEEPER, final, record, sse_get, submit, submitted, until_status

LEASE = "2"
NODE_ENV = {"FAAS_MAX_RUNS": "2", "FAAS_POOL_SIZE": "1", "FAAS_POOL_SIZE_NODE": "0", "FAAS_NODE_LEASE": LEASE,
            "FAAS_CALL_TTL": "120", "FAAS_QUEUE_TIMEOUT": "1"}
PRINTER = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.1)\nreturn 'done'"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of this module, restartable on the same port and directory."""

    def __init__(self, aof):
        self.aof = aof
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="faas-test-redis-"))
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec", "--dir", str(self.dir)],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        assert wait_until(self.ping, timeout=10), (self.dir / "redis.log").read_text()

    def ping(self):
        try:
            return self.client().ping()
        except Exception:
            return False

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self):
        self.proc.terminate()   # SIGTERM: redis writes what it must, then exits
        self.proc.wait(10)

    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self):
        if self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_aof():
    r = Redis(aof=True)
    yield r
    r.close()


def start_node(faas, redis, prefix, name, **env):
    return faas.start(store=None, env={**NODE_ENV, "REDIS_URL": redis.url(), "FAAS_REDIS_PREFIX": prefix,
                                       "FAAS_NODE_ID": name, **env})


@pytest.fixture(scope="module")
def cluster(faas, redis_aof):
    prefix = f"cl-{uuid.uuid4().hex[:8]}:"
    nodes = {name: start_node(faas, redis_aof, prefix, name) for name in ("a", "b", "c")}
    nodes["a"].upload("sleep", "python", SLEEPER)
    nodes["a"].upload("print", "python", PRINTER)
    yield nodes, prefix
    for node in nodes.values():
        node.stop()
    for node in nodes.values():
        text = node.stderr_text()
        assert "Traceback" not in text, text[text.find("Traceback") - 300:][:3000]


def wait_all(node, ids, timeout=60):
    return [final(node, call_id, timeout) for call_id in ids]


def test_async_calls_submitted_to_one_server_run_on_all(cluster):
    nodes, _ = cluster
    ids = [submitted(nodes["a"], "sleep", {"s": 1}) for _ in range(6)]
    done = wait_all(nodes["b"], ids)
    assert {d["status"] for d in done} == {"ok"}, done
    assert len({d["node"] for d in done}) >= 2, [d["node"] for d in done]
    listed = assert_ok(nodes["c"].get("/nodes"))
    assert {"a", "b", "c"} <= {n["id"] for n in listed["nodes"]}
    assert all(n["max_runs"] == 2 for n in listed["nodes"])


def test_a_full_server_hands_sync_calls_to_a_free_one(cluster):
    nodes, _ = cluster
    a = nodes["a"]
    busy = [threading.Thread(target=a.run, args=("sleep", {"s": 6})) for _ in range(2)]
    for thread in busy:
        thread.start()
    assert wait_until(lambda: a.get("/healthz").body["runs_active"] == 2, timeout=10)
    r = a.run("sleep", {"s": 0.2})
    assert r.status == 200 and r.body["data"] == 0.2, r.body
    assert r.headers["x-faas-node"] in ("b", "c") and r.body["node"] in ("b", "c"), r.headers
    events = a.sse("/run/print", {"stream": True})
    assert events.status == 200
    got = events.all_events()
    assert [e["data"] for e in got if e["event"] == "log"] == ["line 0", "line 1", "line 2"], got
    assert got[-1]["event"] == "result" and got[-1]["data"] == "done" and got[-1]["node"] in ("b", "c")
    for thread in busy:
        thread.join()


def test_sync_calls_get_429_only_when_no_server_starts_them_in_time(cluster):
    nodes, _ = cluster
    sleepers = [submitted(nodes[name], "sleep", {"s": 8}) for name in "abc" for _ in range(2)]
    assert wait_until(lambda: all(record(nodes["a"], i)["status"] == "running" for i in sleepers), timeout=15)
    r = nodes["a"].run("sleep", {"s": 0})
    assert_error(r, 429)

    def spilled():
        return [c for c in assert_ok(nodes["a"].get("/calls?path=sleep&limit=100"))["calls"] if c["kind"] == "sync"]
    assert any(c["status"] in ("cancelled", "expired") and c["started"] is None for c in spilled()), spilled()
    wait_all(nodes["a"], sleepers)
    time.sleep(0.5)
    assert all(c["started"] is None for c in spilled() if c["status"] != "ok"), "a refused call never runs later"


def test_events_of_a_call_run_elsewhere(cluster):
    nodes, _ = cluster
    call_id = submitted(nodes["a"], "print")
    events = sse_get(nodes["c"], f"/calls/{call_id}/events")
    assert [e["data"] for _, e in events if e["event"] == "log"] == ["line 0", "line 1", "line 2"], events
    assert events[-1][1]["event"] == "result"
    first_log = [eid for eid, e in events if e["event"] == "log"][0]
    resumed = sse_get(nodes["b"], f"/calls/{call_id}/events", headers={"Last-Event-ID": first_log})
    assert [e["data"] for _, e in resumed if e["event"] == "log"] == ["line 1", "line 2"]


def test_cancel_reaches_the_server_running_the_call(cluster):
    nodes, _ = cluster
    call_id = submitted(nodes["a"], "sleep", {"s": 20})
    running = until_status(nodes["a"], call_id, ("running",))
    other = next(name for name in "abc" if name != running["node"])
    r = nodes[other].request("DELETE", f"/calls/{call_id}")
    assert r.status == 200 and r.body["status"] == "cancelled", r.body
    assert r.body["node"] == running["node"] and r.body["finished"] - r.body["started"] < 15, r.body


def sandboxes_of(server):
    """Processes still running from the server's runtime directory (its sandboxes)."""
    base = f"{server.env['RUNTIME_DIRECTORY']}/faas-runtime-{server.proc.pid}-"
    return [p for p, info in proc_table().items() if base in info["cmdline"]]


@pytest.fixture
def pair(faas, redis_aof):
    """A victim server alone on a fresh prefix (so it takes the call), its survivor started later."""
    prefix = f"pair-{uuid.uuid4().hex[:8]}:"
    runtime = Path(tempfile.mkdtemp(prefix="faas-test-runtime-"))
    runtime.chmod(0o755)
    started = []

    def start(name, **env):
        node = start_node(faas, redis_aof, prefix, name, RUNTIME_DIRECTORY=str(runtime), **env)
        started.append(node)
        return node
    yield start, prefix
    for node in started:
        if node.alive():
            node.proc.send_signal(signal.SIGCONT)
            node.stop()
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("retries", ["1", "0"])
def test_kill_9_mid_call_reruns_or_loses_it_with_one_final_record(pair, retries):
    start, _ = pair
    victim = start("victim", FAAS_ASYNC_RETRIES=retries)
    victim.upload("sleep", "python", SLEEPER)
    call_id = submitted(victim, "sleep", {"s": 3})
    until_status(victim, call_id, ("running",))
    survivor = start("survivor", FAAS_ASYNC_RETRIES=retries)
    victim.proc.kill()
    victim.proc.wait()
    done = final(survivor, call_id, timeout=40)
    if retries == "1":
        assert done["status"] == "ok" and done["attempt"] == 2 and done["node"] == "survivor", done
    else:
        assert done["status"] == "lost" and "victim" in done["error"] and done["attempt"] == 1, done
    assert len(assert_ok(survivor.get("/calls?path=sleep"))["calls"]) == 1
    metric = "faas_calls_redelivered_total" if retries == "1" else "faas_calls_lost_total"
    assert re.search(rf"^{metric} [1-9]", survivor.get("/metrics").body, re.M), metric
    assert wait_until(lambda: "victim" not in {n["id"] for n in survivor.get("/nodes").body["nodes"]}, timeout=10)
    assert wait_until(lambda: not sandboxes_of(victim), timeout=10), "the dead server's sandboxes are gone"
    assert server_cgroup_dirs(victim.proc.pid) and list(Path(victim.env["RUNTIME_DIRECTORY"]).glob(
        f"faas-runtime-{victim.proc.pid}-*")), "kill -9 leaves the cgroups and the runtime directory"
    start("sweeper")
    assert not server_cgroup_dirs(victim.proc.pid), "the next start sweeps the dead server's cgroups"
    assert not list(Path(victim.env["RUNTIME_DIRECTORY"]).glob(f"faas-runtime-{victim.proc.pid}-*"))


def test_a_frozen_servers_late_result_is_refused(pair):
    start, _ = pair
    frozen = start("frozen")
    frozen.upload("sleep", "python", SLEEPER)
    call_id = submitted(frozen, "sleep", {"s": 2})
    until_status(frozen, call_id, ("running",))
    other = start("other")
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        rerun = final(other, call_id, timeout=40)
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    assert rerun["status"] == "ok" and rerun["attempt"] == 2 and rerun["node"] == "other", rerun
    assert wait_until(lambda: "late result refused" in frozen.stderr_text(), timeout=15), frozen.stderr_text()[-2000:]
    after = record(other, call_id)
    assert (after["status"], after["attempt"], after["node"], after["finished"]) == \
        (rerun["status"], rerun["attempt"], rerun["node"], rerun["finished"])


def test_drain_finishes_the_running_call_and_leaves_the_queue_to_others(pair):
    start, _ = pair
    leaving = start("leaving")
    leaving.upload("sleep", "python", SLEEPER)
    running = [submitted(leaving, "sleep", {"s": 2}) for _ in range(2)]
    for call_id in running:
        until_status(leaving, call_id, ("running",))
    queued = [submitted(leaving, "sleep", {"s": 0.1}) for _ in range(3)]
    staying = start("staying", FAAS_MAX_RUNS="1")
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(30) == 0
    for call_id in running:
        done = final(staying, call_id)
        assert done["status"] == "ok" and done["node"] == "leaving" and done["attempt"] == 1, done
    for call_id in queued:
        assert final(staying, call_id)["status"] == "ok"
    assert "leaving" not in {n["id"] for n in staying.get("/nodes").body["nodes"]}


def test_redis_restart_with_aof_loses_no_accepted_call(faas, redis_aof):
    prefix = f"aof-{uuid.uuid4().hex[:8]}:"
    node = start_node(faas, redis_aof, prefix, "solo", FAAS_MAX_RUNS="1")
    try:
        node.upload("sleep", "python", SLEEPER)
        health = assert_ok(node.get("/healthz"))["calls"]
        assert health["queue_durable"] is True and health["warnings"] == [], health
        running = submitted(node, "sleep", {"s": 2})
        until_status(node, running, ("running",))
        queued = [submitted(node, "sleep", {"s": 0.1}) for _ in range(3)]
        redis_aof.stop()
        time.sleep(0.5)
        redis_aof.start()
        for call_id in [running, *queued]:
            assert final(node, call_id)["status"] == "ok"
        assert assert_ok(node.get("/healthz"))["status"] == "ok"
    finally:
        node.stop()


def test_redis_restart_without_persistence_is_a_clear_503_then_recovers(faas):
    volatile = Redis(aof=False)
    node = start_node(faas, volatile, "vol:", "vol")
    try:
        health = assert_ok(node.get("/healthz"))["calls"]
        assert health["queue_durable"] is False and any("appendonly" in w for w in health["warnings"]), health
        node.upload("sleep", "python", SLEEPER)
        old = final(node, submitted(node, "sleep", {"s": 0}))["id"]
        volatile.stop()
        r = submit(node, "sleep", {"s": 0})
        assert_error(r, 503)
        volatile.start()
        node.upload("sleep", "python", SLEEPER)   # everything in that Redis is gone
        assert_error(node.get(f"/calls/{old}"), 404)
        assert wait_until(lambda: submit(node, "sleep", {"s": 0}).status == 202, timeout=15)
        fresh = submitted(node, "sleep", {"s": 0})
        assert final(node, fresh)["status"] == "ok"
    finally:
        node.stop()
        volatile.close()


def test_no_keys_without_ttl_and_no_queue_entries_left(cluster, redis_aof):
    nodes, prefix = cluster
    ids = [submitted(nodes[name], "print") for name in "abc" for _ in range(3)]
    wait_all(nodes["a"], ids)
    client = redis_aof.client()
    for kind in ("sync", "async"):
        stream = f"{prefix}calls:{kind}"
        assert wait_until(lambda: client.xlen(stream) == 0, timeout=10), client.xrange(stream)
        assert client.xpending(stream, "nodes")["pending"] == 0
    for key in client.scan_iter(f"{prefix}*"):
        if key.startswith(f"{prefix}function") or key in (f"{prefix}calls:sync", f"{prefix}calls:async"):
            continue
        assert client.ttl(key) > 0 or client.pttl(key) > 0, key


def test_a_queued_call_expires_even_while_no_server_reads_the_queue(faas, redis_aof):
    node = start_node(faas, redis_aof, f"exp-{uuid.uuid4().hex[:8]}:", "expiring", FAAS_MAX_RUNS="1",
                      FAAS_NODE_LEASE="1", FAAS_ASYNC_MAX_AGE="1")
    try:
        node.upload("sleep", "python", SLEEPER)
        busy = submitted(node, "sleep", {"s": 6})
        until_status(node, busy, ("running",))
        waiting = submitted(node, "sleep", {"s": 0})
        expired = until_status(node, waiting, ("expired",), timeout=5)
        assert expired["started"] is None
        assert record(node, busy)["status"] == "running", "expired by the sweep, not at a claim"
        client = redis_aof.client()
        assert final(node, busy)["status"] == "ok"
        assert client.xlen(f"{node.env['FAAS_REDIS_PREFIX']}calls:async") == 0
    finally:
        node.stop()
