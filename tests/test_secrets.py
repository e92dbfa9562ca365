"""Per-function secrets: PUT /functions/<path>/secrets (admin), write-only, encrypted at rest
apart from the code in both stores, handed to that function's calls only as environment
variables. Everything through the real server, real bwrap, real redis-server."""
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

import pytest

from conftest import assert_clean_log
from tests.helpers import assert_error, assert_ok

VALUE = "s3cr3t-" + uuid.uuid4().hex        # what must never leave except into its function
OTHER = "other-" + uuid.uuid4().hex

READ_PY = "import os\nreturn {k: os.environ.get(k) for k in ('API_KEY', 'TOKEN_2', 'GONE')}"
READ_JS = "return {API_KEY: process.env.API_KEY || null, TOKEN_2: process.env.TOKEN_2 || null}"
# What another function could look at: every environ it can read, its own and pid 1's.
SNOOP_PY = """import os
seen = dict(os.environ)
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            seen[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode('latin-1')
        except OSError as e:
            seen[pid] = str(e)
return seen"""


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def srv(request, faas):
    s = faas.start(store=request.param, env={"FAAS_POOL_SIZE": "1"})
    yield s
    s.stop()
    assert_clean_log(s)


def put(server, path, secrets, headers=None):
    return server.request("PUT", f"/functions/{path}/secrets", secrets, headers=headers)


def stored_bytes(server):
    """Everything the store holds, as bytes: the SQLite files, or every Redis value."""
    if server.store == "sqlite":
        return b"".join(p.read_bytes() for p in Path(server.env["FAAS_DATA_DIR"]).glob("faas.sqlite3*"))
    import redis
    r = redis.Redis.from_url(server.env["REDIS_URL"])
    out = []
    for key in r.scan_iter(server.env["FAAS_REDIS_PREFIX"] + "*"):
        kind = r.type(key)
        if kind == b"hash":
            out += [k + b"=" + v for k, v in r.hgetall(key).items()]
        elif kind == b"string":
            out.append(r.get(key))
        else:
            out.append(repr(r.dump(key)).encode())
    return b"\n".join(out)


def test_a_function_reads_its_secrets_and_no_other_function_does(srv, uid):
    owner, js_owner, other = f"{uid}/owner", f"{uid}/jsowner", f"{uid}/other"
    srv.upload(owner, "python", READ_PY)
    srv.upload(js_owner, "javascript", READ_JS)
    srv.upload(other, "python", SNOOP_PY)
    answer = assert_ok(put(srv, owner, {"API_KEY": VALUE, "TOKEN_2": OTHER}))
    assert answer == {"path": owner, "secrets": ["API_KEY", "TOKEN_2"]}
    assert_ok(put(srv, js_owner, {"API_KEY": VALUE}))
    for _ in range(3):   # pooled and cold sandboxes alike, interleaved with the other function
        assert assert_ok(srv.run(owner))["data"] == {"API_KEY": VALUE, "TOKEN_2": OTHER, "GONE": None}
        snooped = assert_ok(srv.run(other))
        assert VALUE not in str(snooped) and OTHER not in str(snooped), snooped
        assert "API_KEY" not in snooped["data"]
    assert assert_ok(srv.run(js_owner))["data"] == {"API_KEY": VALUE, "TOKEN_2": None}
    events = srv.sse(f"/run/{owner}", {}).all_events()
    assert events[-1]["event"] == "result" and events[-1]["data"]["API_KEY"] == VALUE
    # run-now and the pooled sandboxes it uses never get them
    assert assert_ok(srv.run_now("python", READ_PY))["data"]["API_KEY"] is None


def test_an_asynchronous_call_reads_its_functions_secrets(srv, uid):
    """A queued call runs through the same needs as a sync one: its secrets reach it. (It
    answers a digest: a record keeps the answer, and the function's answer is its own.)"""
    owner = f"{uid}/async-owner"
    srv.upload(owner, "python", "import hashlib, os\n"
                                "return hashlib.sha256(os.environ.get('API_KEY', '').encode()).hexdigest()")
    assert_ok(put(srv, owner, {"API_KEY": VALUE}))
    r = srv.post(f"/run/{owner}?async=1", {})
    assert r.status == 202, (r.status, r.body)
    done = assert_ok(srv.get(f"/calls/{r.body['id']}?wait=30", timeout=40))
    assert done["status"] == "ok" and done["data"] == hashlib.sha256(VALUE.encode()).hexdigest(), done
    assert VALUE not in json.dumps(done)


def test_values_never_leave_through_routes_logs_metrics_or_the_store(srv, uid):
    path = f"{uid}/f"
    srv.upload(path, "python", "import os\nprint('working')\nraise ValueError('failed on purpose')")
    assert_ok(put(srv, path, {"API_KEY": VALUE}))
    failed = srv.run(path)
    assert_error(failed, 500)
    assert "failed on purpose" in failed.body["error"] and VALUE not in failed.raw.decode()
    version = srv.get(f"/functions/{path}").body["latest"]
    seen = [srv.get(f"/functions/{path}"), srv.get(f"/functions/{path}?version={version}"),
            srv.get("/functions"), srv.get("/metrics"), srv.get("/healthz")]
    function = seen[0].body
    assert function["secrets"] == ["API_KEY"]
    for answer in seen:
        assert answer.status == 200 and VALUE.encode() not in answer.raw, answer.raw[:300]
    assert VALUE not in srv.stderr_text() + srv.stdout_text()
    stored = stored_bytes(srv)
    assert b"API_KEY" in stored, "the names are stored"
    assert VALUE.encode() not in stored, "a value is stored in clear"


def test_a_replacing_put_and_an_empty_put(srv, uid):
    path = f"{uid}/f"
    srv.upload(path, "python", READ_PY)
    assert_ok(put(srv, path, {"API_KEY": VALUE, "GONE": "x"}))
    assert_ok(put(srv, path, {"TOKEN_2": OTHER}))
    assert srv.get(f"/functions/{path}").body["secrets"] == ["TOKEN_2"]
    assert assert_ok(srv.run(path))["data"] == {"API_KEY": None, "TOKEN_2": OTHER, "GONE": None}
    assert assert_ok(put(srv, path, {}))["secrets"] == []
    assert srv.get(f"/functions/{path}").body["secrets"] == []
    assert assert_ok(srv.run(path))["data"] == {"API_KEY": None, "TOKEN_2": None, "GONE": None}
    assert_ok(put(srv, path, {"API_KEY": VALUE}))
    assert assert_ok(srv.get(f"/functions/{path}/secrets")) == {"path": path, "secrets": ["API_KEY"]}
    assert assert_ok(srv.request("DELETE", f"/functions/{path}/secrets"))["secrets"] == []
    assert assert_ok(srv.run(path))["data"]["API_KEY"] is None
    assert assert_error(srv.request("PATCH", f"/functions/{path}/secrets", {}), 405)
    assert_ok(put(srv, path, {"API_KEY": VALUE}))
    assert "JSON object" in assert_error(put(srv, path, None), 400)["error"]   # no body: kept
    assert assert_ok(srv.get(f"/functions/{path}/secrets"))["secrets"] == ["API_KEY"]


def test_no_function_path_ends_in_secrets(srv, uid):
    r = srv.post("/upload", {"path": f"{uid}/secrets", "language": "python", "code": "return 1"})
    assert "secrets" in assert_error(r, 400)["error"]
    srv.upload(f"{uid}-secrets/secretsx", "python", "return 1")
    srv.upload("secrets", "python", "return 1")


def test_deleting_the_function_deletes_its_secrets(srv, uid):
    path = f"{uid}/f"
    srv.upload(path, "python", READ_PY)
    assert_ok(put(srv, path, {"API_KEY": VALUE}))
    assert_ok(srv.request("DELETE", f"/functions/{path}"))
    srv.upload(path, "python", READ_PY)
    assert srv.get(f"/functions/{path}").body["secrets"] == []
    assert assert_ok(srv.run(path))["data"]["API_KEY"] is None


@pytest.mark.parametrize("body,status", [
    ({"1ABC": "x"}, 400), ({"A-B": "x"}, 400), ({"": "x"}, 400), ({"A" * 129: "x"}, 400),
    ({"PATH": "/evil"}, 400), ({"LD_PRELOAD": "/tmp/x.so"}, 400), ({"A": 1}, 400),
    ({"A": None}, 400), ({"A": ["x"]}, 400), ({"A": "x\u0000y"}, 400), ({"A": "x" * 40000}, 400),
    ({f"K{i}": "v" for i in range(65)}, 400), ([["A", "x"]], 400), ("not json", 400),
])
def test_bad_secrets_are_a_400(srv, uid, body, status):
    path = f"{uid}/f"
    srv.upload(path, "python", READ_PY)
    assert_error(put(srv, path, body), status)
    assert srv.get(f"/functions/{path}").body["secrets"] == []


def test_secrets_of_an_unknown_function_are_a_404(srv, uid):
    assert_error(put(srv, f"{uid}/missing", {"A": "x"}), 404)
    assert_error(srv.get(f"/functions/{uid}/missing/secrets"), 404)
    assert_error(srv.request("DELETE", f"/functions/{uid}/missing/secrets"), 404)
    assert_error(put(srv, "../etc", {"A": "x"}), 400)


def test_only_the_admin_token_sets_secrets(faas, uid):
    server = faas.start(store="sqlite", env={"FAAS_TOKEN": "admin-" + uid, "FAAS_INVOKE_TOKEN": "call-" + uid,
                                             "FAAS_POOL_SIZE": "0"})
    try:
        admin = {"Authorization": f"Bearer admin-{uid}"}
        assert server.post("/upload", {"path": "f", "language": "python", "code": READ_PY}, headers=admin).status == 200
        assert_error(put(server, "f", {"API_KEY": VALUE}), 401)
        assert_error(put(server, "f", {"API_KEY": VALUE}, {"Authorization": f"Bearer call-{uid}"}), 403)
        assert_ok(put(server, "f", {"API_KEY": VALUE}, admin))
        r = server.post("/run/f", {}, headers={"Authorization": f"Bearer call-{uid}"})
        assert assert_ok(r)["data"]["API_KEY"] == VALUE
    finally:
        server.stop()


def test_the_key_file_is_created_0600_and_survives_a_restart(faas, uid):
    server = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "0"})
    data_dir = Path(server.env["FAAS_DATA_DIR"])
    assert not (data_dir / "secret.key").exists(), "created before first use"
    server.upload("f", "python", READ_PY)
    assert_ok(put(server, "f", {"API_KEY": VALUE}))
    key = data_dir / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == os.geteuid()
    server.stop()
    again = faas.start(store="sqlite", env={"FAAS_DATA_DIR": str(data_dir), "FAAS_POOL_SIZE": "0"})
    try:
        assert assert_ok(again.run("f"))["data"]["API_KEY"] == VALUE
    finally:
        again.stop()


def test_servers_sharing_redis_need_the_same_key(faas, uid):
    key = uuid.uuid4().hex + uuid.uuid4().hex
    shared = {"FAAS_REDIS_PREFIX": f"faastest-{uid}:", "FAAS_POOL_SIZE": "0"}
    first = faas.start(store="redis", env={**shared, "FAAS_SECRET_KEY": key})
    second = faas.start(store="redis", env={**shared, "FAAS_SECRET_KEY": key})
    stranger = faas.start(store="redis", env={**shared, "FAAS_SECRET_KEY": "x" * 64})
    try:
        first.upload("f", "python", READ_PY)
        assert_ok(put(first, "f", {"API_KEY": VALUE}))
        assert assert_ok(second.run("f"))["data"]["API_KEY"] == VALUE
        refused = assert_error(stranger.run("f"), 500)
        assert "cannot be decrypted" in refused["error"] and "FAAS_SECRET_KEY" in refused["error"]
        assert VALUE not in str(refused)
    finally:
        for server in (first, second, stranger):
            server.stop()
            assert_clean_log(server)


def test_an_unreadable_key_file_is_a_500_with_a_sentence(faas):
    server = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "0"})
    try:
        server.upload("f", "python", READ_PY)
        (Path(server.env["FAAS_DATA_DIR"]) / "secret.key").write_text("not hex\n")
        body = assert_error(put(server, "f", {"API_KEY": VALUE}), 500)
        assert "secrets key cannot be read" in body["error"]
        assert "does not hold a key" in server.stderr_text()
        assert server.get("/functions/f").body["secrets"] == []
    finally:
        server.stop()
        assert_clean_log(server)


def test_a_short_secret_key_stops_the_server(faas):
    server = faas.start(store="sqlite", env={"FAAS_SECRET_KEY": "short"}, wait=False)
    assert server.proc.wait(20) == 2
    assert "FAAS_SECRET_KEY" in server.stderr_text()
