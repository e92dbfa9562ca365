"""Asynchronous calls on one server, on each store: submit (?async=1, Prefer), the record
(GET /calls/<id>, ?wait), its events (SSE replay and follow, Last-Event-ID), cancel,
idempotency, bounds (queue depth, queued age, retention), a restart of the SQLite server
with queued and running calls, drain, and callbacks (allowlist, signature, SSRF refusals)
against a receiver on loopback."""
import base64
import hashlib
import hmac
import http.client
import http.server
import json
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import assert_error, assert_ok, descendants, wait_until
from tests.test_attacks import server_cgroup_dirs

SLEEPER = "import time\ntime.sleep(float(event.get('s', 1)))\nreturn event.get('s', 1)"
PRINTER = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.2)\nreturn 'done'"
ECHO = "return event"
SMALL = {"FAAS_MAX_RUNS": "2", "FAAS_POOL_SIZE": "1", "FAAS_POOL_SIZE_NODE": "0"}


def submit(server, path, input=None, headers=None, query="?async=1", **extra):
    body = dict(extra)
    if input is not None:
        body["input"] = input
    return server.post(f"/run/{path}{query}", body, headers=headers)


def submitted(server, path, input=None, **extra):
    r = submit(server, path, input, **extra)
    assert r.status == 202, (r.status, r.body)
    return r.body["id"]


def final(server, call_id, timeout=30):
    r = server.get(f"/calls/{call_id}?wait={timeout}", timeout=timeout + 10)
    body = assert_ok(r)
    assert body["status"] not in ("queued", "running"), body
    return body


def record(server, call_id):
    return assert_ok(server.get(f"/calls/{call_id}"))


def until_status(server, call_id, statuses, timeout=20):
    seen = {}

    def check():
        seen["r"] = record(server, call_id)
        return seen["r"]["status"] in statuses
    assert wait_until(check, timeout=timeout), seen["r"]
    return seen["r"]


def sse_get(server, path, headers=None, timeout=30):
    """(event id or None, event) of a GET SSE stream until the server ends it."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read()[:300])
    events, event_id, data = [], None, []
    try:
        for raw in iter(resp.readline, b""):
            line = raw.decode().rstrip("\r\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                events.append((event_id, json.loads("\n".join(data))))
                event_id, data = None, []
    finally:
        conn.close()
    return events


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request, faas):
    s = faas.start(store=request.param, env={**SMALL, "FAAS_NODE_ID": f"one-{request.param}"})
    for path, code in (("sleep", SLEEPER), ("print", PRINTER), ("echo", ECHO)):
        s.upload(path, "python", code)
    yield s
    s.stop()
    text = s.stderr_text()
    assert "Traceback" not in text, text[text.find("Traceback") - 300:][:3000]
    assert not descendants(s.proc.pid) and not server_cgroup_dirs(s.proc.pid), "no process or cgroup left"


# --------------------------------------------------------------------------- the API

def test_async_round_trip_gives_the_sync_answer_with_times_and_node(server):
    sync = assert_ok(server.run("echo", {"a": [1, "x"]}))
    r = submit(server, "echo", {"a": [1, "x"]})
    assert r.status == 202, r.body
    call_id = r.body["id"]
    assert r.headers["location"] == f"/calls/{call_id}"
    assert r.body["status"] == "queued" and r.body["path"] == "echo" and r.body["version"] == sync["version"]
    assert r.body["status_url"] == f"/calls/{call_id}" and r.body["events_url"] == f"/calls/{call_id}/events"
    done = final(server, call_id)
    assert done["status"] == "ok" and done["data"] == sync["data"] and done["type"] == sync["type"]
    assert done["created"] <= done["started"] <= done["finished"], done
    assert done["node"] == server.env["FAAS_NODE_ID"] and done["attempt"] == 1
    for field in ("duration_ms", "stdout", "stderr", "exit_code", "truncated", "version"):
        assert field in done, field

    r = server.post("/run/echo", {"input": "7"}, headers={"Prefer": "respond-async"})
    assert r.status == 202 and r.headers["preference-applied"] == "respond-async", r.headers
    assert final(server, r.body["id"])["data"] == 7


def test_nothing_is_queued_for_a_call_that_can_never_run(server, uid):
    assert_error(submit(server, f"{uid}/nope"), 404)
    assert_error(submit(server, "echo", query="?async=1&version=12345"), 404)
    assert_error(submit(server, "echo", "{not json"), 400)
    assert_error(submit(server, "echo", stream=True), 400)
    assert_error(submit(server, "echo", timeout=10_000), 400)
    assert_error(submit(server, "echo", query="?async=maybe"), 400)
    assert_error(server.post("/run/echo", {}, headers={"Prefer": "respond-async, wait=soon"}), 400)
    listed = assert_ok(server.get(f"/calls?path={uid}/nope"))
    assert listed["calls"] == []


def test_prefer_wait_answers_the_result_when_ready_else_202(server):
    r = server.post("/run/sleep", {"input": {"s": 0.1}}, headers={"Prefer": "respond-async, wait=10"})
    assert r.status == 200, r.body
    assert r.body["status"] == "ok" and r.body["data"] == 0.1 and r.headers["location"] == f"/calls/{r.body['id']}"
    r = server.post("/run/sleep", {"input": {"s": 2}}, headers={"Prefer": "respond-async, wait=0.2"})
    assert r.status == 202 and r.body["status"] in ("queued", "running"), r.body
    assert final(server, r.body["id"])["status"] == "ok"


def test_get_wait_long_polls_and_unknown_ids_are_404(server):
    call_id = submitted(server, "sleep", {"s": 0.5})
    assert record(server, call_id)["status"] in ("queued", "running")
    assert final(server, call_id, timeout=10)["data"] == 0.5
    assert_error(server.get("/calls/" + "0" * 32), 404)
    assert_error(server.get("/calls/not-an-id"), 404)
    assert_error(server.get(f"/calls/{call_id}?wait=x"), 400)


def test_events_follow_then_replay_and_resume_after_last_event_id(server):
    call_id = submitted(server, "print")
    live = sse_get(server, f"/calls/{call_id}/events")
    kinds = [event["event"] for _, event in live]
    assert kinds[0] == "status" and kinds[-1] == "result", kinds
    logs = [(eid, event) for eid, event in live if event["event"] == "log"]
    assert [event["data"] for _, event in logs] == ["line 0", "line 1", "line 2"], live
    assert all(eid for eid, _ in logs) and live[-1][1]["data"] == "done"

    replay = sse_get(server, f"/calls/{call_id}/events")
    assert [e for _, e in replay if e["event"] != "status"] == [e for _, e in live if e["event"] != "status"]
    resumed = sse_get(server, f"/calls/{call_id}/events", headers={"Last-Event-ID": logs[0][0]})
    assert [e["data"] for _, e in resumed if e["event"] == "log"] == ["line 1", "line 2"]
    assert resumed[-1][1]["event"] == "result"
    r = server.get(f"/calls/{call_id}/events", headers={"Last-Event-ID": "junk"})
    assert_error(r, 400)


def test_cancel_a_queued_call_never_starts_it_and_a_running_one_is_killed(server):
    busy = [submitted(server, "sleep", {"s": 30}) for _ in range(2)]
    for call_id in busy:
        until_status(server, call_id, ("running",))
    queued = submitted(server, "sleep", {"s": 0.1})
    r = server.request("DELETE", f"/calls/{queued}")
    assert r.status == 200 and r.body["status"] == "cancelled" and r.body["started"] is None, r.body
    before = set(descendants(server.proc.pid))
    for call_id in busy:
        r = server.request("DELETE", f"/calls/{call_id}")
        assert r.status == 200 and r.body["status"] == "cancelled", r.body
        assert r.body["started"] is not None and r.body["finished"] - r.body["started"] < 20
    # the two runs' processes are gone (the pool may have started new ones meanwhile)
    assert wait_until(lambda: len(before - set(descendants(server.proc.pid))) >= 2, timeout=10), "sandboxes killed"
    assert_error(server.request("DELETE", f"/calls/{queued}"), 409)
    time.sleep(0.5)
    assert record(server, queued)["status"] == "cancelled" and record(server, queued)["started"] is None
    assert final(server, submitted(server, "echo", 1))["status"] == "ok", "the server still serves"


def test_a_call_whose_version_is_deleted_while_it_waits_ends_with_a_404_error(server, uid):
    """The claim checks that the version still exists (its code is in the server's memory
    since the submit), and the queued call after it still runs."""
    first, second = (server.upload(f"{uid}/f", "python", code).body["version"] for code in (ECHO, "return 'v2'"))
    busy = [submitted(server, "sleep", {"s": 1.5}) for _ in range(2)]
    for call_id in busy:
        until_status(server, call_id, ("running",))
    doomed = submitted(server, f"{uid}/f", 1, query=f"?async=1&version={first}")
    after = submitted(server, f"{uid}/f", 2, query=f"?async=1&version={second}")
    assert_ok(server.request("DELETE", f"/functions/{uid}/f?version={first}"))
    gone = final(server, doomed)
    assert gone["status"] == "error" and f"no version {first}" in gone["error"], gone
    assert final(server, after)["data"] == "v2"
    assert final(server, busy[0])["status"] == "ok"


def test_queued_calls_taken_as_the_call_before_them_ends_get_their_secrets(server, uid):
    """With both slots busy, each queued call is claimed by the final write of the call
    before it (on Redis that script also reads the function's secrets)."""
    path = f"{uid}/secretive"
    server.upload(path, "python", "import os\nreturn os.environ.get('TOKEN')")
    assert_ok(server.request("PUT", f"/functions/{path}/secrets", {"TOKEN": "t-" + uid}))
    busy = [submitted(server, "sleep", {"s": 1}) for _ in range(2)]
    for call_id in busy:
        until_status(server, call_id, ("running",))
    queued = [submitted(server, path) for _ in range(3)]
    for call_id in queued:
        assert final(server, call_id)["data"] == "t-" + uid


def test_a_sync_call_takes_the_next_free_slot_before_queued_async_calls(server):
    """A slot that frees while async calls are queued passes to the next of them, unless a
    sync call waits for one (on SQLite it waits for a slot; on Redis it is spilled to the
    sync queue, which is read first)."""
    queued = [submitted(server, "sleep", {"s": 1}) for _ in range(8)]
    until_status(server, queued[0], ("running",))
    assert assert_ok(server.run("echo", {"now": 1}))["data"] == {"now": 1}
    statuses = [record(server, call_id)["status"] for call_id in queued]
    assert statuses.count("queued") >= 2, statuses
    for call_id in queued:
        assert final(server, call_id)["status"] == "ok"


def test_idempotency_key_gives_the_same_call_and_refuses_a_different_body(server, uid):
    server.upload(f"{uid}/f", "python", ECHO)
    headers = {"Idempotency-Key": f"order-{uid}"}
    first = submit(server, f"{uid}/f", {"n": 1}, headers=headers)
    again = submit(server, f"{uid}/f", {"n": 1}, headers=headers)
    assert first.status == again.status == 202, (first.body, again.body)
    assert first.body["id"] == again.body["id"] and again.headers.get("idempotent-replayed") == "true"
    assert_error(submit(server, f"{uid}/f", {"n": 2}, headers=headers), 422)
    assert final(server, first.body["id"])["attempt"] == 1
    assert len(assert_ok(server.get(f"/calls?path={uid}/f"))["calls"]) == 1
    assert_error(submit(server, f"{uid}/f", {"n": 1}, headers={"Idempotency-Key": "x" * 300}), 400)


def test_calls_list_is_newest_first_and_filtered(server, uid):
    server.upload(f"{uid}/g", "python", ECHO)
    ids = [submitted(server, f"{uid}/g", i) for i in range(3)]
    for call_id in ids:
        final(server, call_id)
    listed = assert_ok(server.get(f"/calls?path={uid}/g&status=ok&limit=2"))["calls"]
    assert [c["id"] for c in listed] == ids[::-1][:2]
    assert assert_ok(server.get(f"/calls?path={uid}/g&status=queued"))["calls"] == []
    assert_error(server.get("/calls?status=done"), 400)
    assert_error(server.get("/calls?limit=0"), 400)


def test_queue_state_in_healthz_nodes_and_metrics(server):
    assert final(server, submitted(server, "echo", 1))["status"] == "ok"   # whatever ran before
    health = assert_ok(server.get("/healthz"))["calls"]
    assert health["node"] == server.env["FAAS_NODE_ID"] and "depth" in health["queue"]
    nodes = assert_ok(server.get("/nodes"))
    assert server.env["FAAS_NODE_ID"] in [n["id"] for n in nodes["nodes"]] and "oldest_queued_s" in nodes["queue"]
    text = server.get("/metrics").body
    for name in ("faas_async_queue_depth", "faas_async_oldest_queued_seconds", "faas_calls_final_total",
                 "faas_call_queue_wait_seconds_count", "faas_async_submitted_total"):
        assert name in text, name


# --------------------------------------------------------------------------- bounds

@pytest.fixture(scope="module", params=["sqlite", "redis"])
def bounded(request, faas):
    s = faas.start(store=request.param, env={
        "FAAS_MAX_RUNS": "1", "FAAS_POOL_SIZE": "0", "FAAS_ASYNC_MAX_QUEUE": "2",
        "FAAS_ASYNC_MAX_AGE": "1", "FAAS_CALL_TTL": "4"})
    s.upload("sleep", "python", SLEEPER)
    yield s
    s.stop()


def test_queue_depth_is_bounded_and_a_call_queued_too_long_expires(bounded):
    busy = submitted(bounded, "sleep", {"s": 2.5})
    until_status(bounded, busy, ("running",))
    waiting = [submitted(bounded, "sleep", {"s": 0.1}) for _ in range(2)]
    r = submit(bounded, "sleep", {"s": 0.1})
    assert_error(r, 429)
    assert r.headers.get("retry-after")
    for call_id in waiting:
        done = final(bounded, call_id)
        assert done["status"] == "expired" and done["started"] is None, done
        assert "FAAS_ASYNC_MAX_AGE" in done["error"], done   # the same message on both stores
    assert final(bounded, busy)["status"] == "ok"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_concurrent_submits_to_a_full_queue_each_get_their_own_answer(faas, store):
    """Submits that arrive together may share one commit (SQLite): exactly
    FAAS_ASYNC_MAX_QUEUE of them are accepted, each accepted one runs, and nothing refused
    is kept."""
    s = faas.start(store=store, env={"FAAS_MAX_RUNS": "1", "FAAS_POOL_SIZE": "0",
                                     "FAAS_ASYNC_MAX_QUEUE": "3", "FAAS_ASYNC_MAX_AGE": "60"})
    try:
        s.upload("sleep", "python", SLEEPER)
        busy = submitted(s, "sleep", {"s": 2})
        until_status(s, busy, ("running",))
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda n: submit(s, "sleep", {"s": 0, "n": n}), range(16)))
        accepted = {r.body["id"]: r.body for r in answers if r.status == 202}
        assert len(accepted) == 3 and all(r.status in (202, 429) for r in answers), \
            [(r.status, r.body) for r in answers]
        assert all(record(s, call_id)["status"] in ("queued", "running", "ok") for call_id in accepted)
        assert final(s, busy)["status"] == "ok"
        for call_id in accepted:
            assert final(s, call_id)["status"] == "ok"
        assert len([c for c in s.get("/calls?limit=100").body["calls"]
                    if c["path"] == "sleep"]) == 4   # nothing refused was kept
    finally:
        s.stop()


def test_records_go_after_their_retention(bounded):
    call_id = submitted(bounded, "sleep", {"s": 0})
    final(bounded, call_id)
    assert wait_until(lambda: bounded.get(f"/calls/{call_id}").status == 404, timeout=15)
    assert call_id not in [c["id"] for c in bounded.get("/calls").body["calls"]]


# --------------------------------------------------------------------------- restart, drain

@pytest.fixture
def runtime_base():
    """A runtime base the sandbox user can traverse (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="faas-test-runtime-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sqlite_restart_requeues_running_calls_runs_queued_ones_and_sweeps(faas, runtime_base):
    runtime = runtime_base
    env = {"FAAS_MAX_RUNS": "1", "FAAS_POOL_SIZE": "0", "RUNTIME_DIRECTORY": str(runtime)}
    first = faas.start(store="sqlite", env=env)
    first.upload("sleep", "python", SLEEPER)
    running = submitted(first, "sleep", {"s": 3})
    until_status(first, running, ("running",))
    queued = submitted(first, "sleep", {"s": 0.2})
    first.proc.kill()
    first.proc.wait()
    assert list(runtime.glob("faas-runtime-*")), "kill -9 leaves the runtime directory"

    again = faas.start(store=None, env={**env, "FAAS_DATA_DIR": first.env["FAAS_DATA_DIR"]})
    try:
        assert [p.name for p in runtime.glob("faas-runtime-*")] == \
            [p.name for p in runtime.glob(f"faas-runtime-{again.proc.pid}-*")], "the dead server's dir was swept"
        rerun = final(again, running)
        assert rerun["status"] == "ok" and rerun["attempt"] == 2, rerun
        assert final(again, queued)["status"] == "ok"
    finally:
        again.stop()


def test_sqlite_restart_marks_running_calls_lost_without_retries(faas):
    env = {"FAAS_MAX_RUNS": "1", "FAAS_POOL_SIZE": "0", "FAAS_ASYNC_RETRIES": "0"}
    first = faas.start(store="sqlite", env=env)
    first.upload("sleep", "python", SLEEPER)
    running = submitted(first, "sleep", {"s": 5})
    until_status(first, running, ("running",))
    first.proc.kill()
    first.proc.wait()
    again = faas.start(store=None, env={**env, "FAAS_DATA_DIR": first.env["FAAS_DATA_DIR"]})
    try:
        lost = final(again, running)
        assert lost["status"] == "lost" and "stopped" in lost["error"] and lost["attempt"] == 1, lost
    finally:
        again.stop()


def test_drain_finishes_running_calls_and_leaves_queued_ones_for_the_next_start(faas):
    env = {"FAAS_MAX_RUNS": "1", "FAAS_POOL_SIZE": "0"}
    first = faas.start(store="sqlite", env=env)
    first.upload("sleep", "python", SLEEPER)
    running = submitted(first, "sleep", {"s": 1.5})
    until_status(first, running, ("running",))
    queued = submitted(first, "sleep", {"s": 0.1})
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    again = faas.start(store=None, env={**env, "FAAS_DATA_DIR": first.env["FAAS_DATA_DIR"]})
    try:
        done = record(again, running)
        assert done["status"] == "ok" and done["attempt"] == 1, done
        assert final(again, queued)["status"] == "ok"
    finally:
        again.stop()


# --------------------------------------------------------------------------- callbacks

class Receiver(http.server.ThreadingHTTPServer):
    """A callback target on loopback: records what it is sent; /redirect answers 302."""

    def __init__(self):
        received = self.received = []

        class Handle(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, dict(self.headers), body))
                if self.path.startswith("/hook/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/elsewhere")
                else:
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handle)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


SECRET = "whsec_" + base64.b64encode(b"callback-test-secret").decode()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.shutdown()
    r.server_close()


@pytest.fixture(scope="module")
def hooked(faas, receiver):
    allow = f"http://127.0.0.1:{receiver.port}/hook,http://localhost:{receiver.port}/named"
    s = faas.start(store="sqlite", env={**SMALL, "FAAS_CALLBACK_ALLOW": allow, "FAAS_CALLBACK_SECRET": SECRET,
                                        "FAAS_CALLBACK_BACKOFF": "0.1"})
    s.upload("echo", "python", ECHO)
    yield s
    s.stop()


def callback_state(server, call_id, statuses=("delivered", "failed")):
    seen = {}

    def check():
        seen["r"] = record(server, call_id)
        return (seen["r"].get("callback") or {}).get("status") in statuses
    assert wait_until(check, timeout=20), seen["r"]
    return seen["r"]["callback"]


def test_callback_is_signed_as_standard_webhooks_say(hooked, receiver):
    url = f"http://127.0.0.1:{receiver.port}/hook/done"
    call_id = submitted(hooked, "echo", {"v": 1}, callback_url=url)
    state = callback_state(hooked, call_id)
    assert state["status"] == "delivered" and state["attempts"] == 1, state
    path, headers, body = [r for r in receiver.received if json.loads(r[2])["id"] == call_id][0]
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/hook/done" and headers["webhook-id"] == call_id
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{call_id}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert json.loads(body)["status"] == "ok" and json.loads(body)["data"] == {"v": 1}
    header_id = submitted(hooked, "echo", 2, headers={"X-Callback-Url": url})
    assert callback_state(hooked, header_id)["status"] == "delivered"


def test_callbacks_outside_the_allowlist_or_to_internal_addresses_are_refused(hooked, receiver):
    for url in (f"http://127.0.0.1:{receiver.port}/other", f"http://127.0.0.1:{receiver.port}/hookx",
                "http://169.254.169.254/latest/meta-data/", f"ftp://127.0.0.1:{receiver.port}/hook",
                f"http://user@127.0.0.1:{receiver.port}/hook/x"):
        assert_error(submit(hooked, "echo", 1, callback_url=url), 400)
    # listed by name, but the name resolves to loopback, which only an address prefix allows
    named = submitted(hooked, "echo", 1, callback_url=f"http://localhost:{receiver.port}/named/x")
    state = callback_state(hooked, named, ("failed",))
    assert state["attempts"] == 3 and "not an address" in state["error"], state
    assert not [r for r in receiver.received if r[0].startswith("/named")]


def test_callback_redirects_are_not_followed_and_failures_are_retried(hooked, receiver):
    call_id = submitted(hooked, "echo", 1, callback_url=f"http://127.0.0.1:{receiver.port}/hook/redirect")
    state = callback_state(hooked, call_id, ("failed",))
    assert state["attempts"] == 3 and state["response_status"] == 302, state
    assert not [r for r in receiver.received if r[0] == "/elsewhere"]
    assert final(hooked, submitted(hooked, "echo", 1))["status"] == "ok"


def test_a_call_that_ends_without_running_still_calls_back(hooked, receiver):
    hooked.upload("sleep", "python", SLEEPER)
    busy = [submitted(hooked, "sleep", {"s": 30}) for _ in range(2)]
    for call_id in busy:
        until_status(hooked, call_id, ("running",))
    url = f"http://127.0.0.1:{receiver.port}/hook/cancelled"
    queued = submitted(hooked, "sleep", {"s": 0}, callback_url=url)
    assert assert_ok(hooked.request("DELETE", f"/calls/{queued}"))["status"] == "cancelled"
    assert callback_state(hooked, queued)["status"] == "delivered"
    sent = [json.loads(body) for path, _, body in receiver.received if path == "/hook/cancelled"]
    assert [(c["id"], c["status"]) for c in sent] == [(queued, "cancelled")]
    for call_id in busy:
        hooked.request("DELETE", f"/calls/{call_id}")


def test_callbacks_are_off_unless_the_operator_allows_them(server, receiver):
    assert_error(submit(server, "echo", 1, callback_url=f"http://127.0.0.1:{receiver.port}/hook"), 400)
