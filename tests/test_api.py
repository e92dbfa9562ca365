"""Function management, access control, metrics, request ids and the OpenAPI document (issue 6).

Everything runs against the real server (`python3 faas.py` started by conftest.py's `faas`
factory) on both stores, with a real redis-server. The OpenAPI document is checked by
fuzzing the running server with schemathesis; metrics are read with prometheus_client's
own text parser.
"""

import hashlib
import http.client
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.helpers import assert_error, assert_ok

REPO = Path(__file__).resolve().parent.parent
OPENAPI = REPO / "openapi.json"

ADMIN = "admin-7f3c9e1b5d"
INVOKE = "invoke-2a8d4c6e0f"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
INVOKE_H = {"Authorization": f"Bearer {INVOKE}"}
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


# --------------------------------------------------------------------------- helpers


def upload(server, path, code, language="python", headers=None):
    r = server.post("/upload", {"path": path, "language": language, "code": code}, headers=headers)
    return assert_ok(r)["version"]


def fn_url(path, version=None, encode=False):
    p = quote(path, safe="") if encode else path
    return f"/functions/{p}" + (f"?version={version}" if version is not None else "")


def sha(code):
    return hashlib.sha256(code.encode()).hexdigest()


def listed(server, path, headers=None):
    body = assert_ok(server.get("/functions", headers=headers))
    found = [f for f in body["functions"] if f["path"] == path]
    assert len(found) <= 1, found
    return found[0] if found else None


def remaining_records(server, redis_server, path):
    """What the store still holds about `path`: redis keys naming it (and membership in any
    set of the prefix), or rows of any SQLite table with a `path` column."""
    if server.store == "redis":
        r = redis_server.client()
        prefix = server.env["FAAS_REDIS_PREFIX"]
        left = []
        for key in r.scan_iter(match=prefix + "*", count=1000):
            if re.search(re.escape(path) + r"(:|$)", key):
                left.append(key)
            elif r.type(key) == "set" and r.sismember(key, path):
                left.append(f"{key} (member)")
            elif r.type(key) == "zset" and r.zscore(key, path) is not None:
                left.append(f"{key} (member)")
        return left
    db_file = Path(server.env["FAAS_DATA_DIR"])
    left = []
    for file in db_file.glob("*.sqlite*"):
        if file.suffix in (".sqlite-wal", ".sqlite-shm") or file.name.endswith(("-wal", "-shm")):
            continue
        con = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
        try:
            tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                cols = [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]
                if "path" in cols:
                    n = con.execute(f'SELECT count(*) FROM "{table}" WHERE path=?', (path,)).fetchone()[0]
                    if n:
                        left.append(f"{file.name}:{table} ({n} rows)")
        finally:
            con.close()
    return left


def metric_samples(server, headers=None):
    """GET /metrics parsed with prometheus_client: {(sample name, frozenset(labels)): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    r = server.get("/metrics", headers=headers)
    assert r.status == 200, (r.status, r.body)
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("text/plain") and "0.0.4" in ctype, ctype
    text = r.raw.decode()
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families, text


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def sample_names(samples):
    return {name for name, _ in samples}


# --------------------------------------------------------------------------- management (both stores)

class TestManagement:
    """`server` (conftest.py) is one running server per store, without tokens."""

    def test_list_functions(self, server, uid):
        a, b = f"{uid}/alpha", f"{uid}/beta/gamma"
        va1 = upload(server, a, "return 1")
        va2 = upload(server, a, "return 2")
        vb = upload(server, b, "return 'b'", language="javascript")
        body = assert_ok(server.get("/functions"))
        assert isinstance(body["functions"], list)
        paths = [f["path"] for f in body["functions"]]
        assert paths == sorted(paths), "functions must be sorted by path"
        fa, fb = listed(server, a), listed(server, b)
        assert fa is not None and fb is not None, body
        assert fa["language"] == "python" and fa["latest"] == va2 > va1 and fa["versions"] == 2, fa
        assert fb["language"] == "javascript" and fb["latest"] == vb and fb["versions"] == 1, fb
        for f in (fa, fb):
            assert isinstance(f["updated"], (int, float)) and abs(f["updated"] - time.time()) < 300, f

    def test_get_function_with_versions(self, server, uid):
        path = f"{uid}/dir/fn"
        codes = ["return 1", "# é ünïcode: size counts bytes\nreturn 'ß'"]
        versions = [upload(server, path, c) for c in codes]
        for encode in (False, True):   # a/b/c and a%2Fb%2Fc name the same function
            body = assert_ok(server.get(fn_url(path, encode=encode)))
            assert body["path"] == path and body["language"] == "python", body
            assert body["latest"] == versions[-1], body
            assert isinstance(body["updated"], (int, float)), body
            assert "code" not in body, "code only with ?version=N"
            got = body["versions"]
            assert [v["version"] for v in got] == versions, got
            for v, code in zip(got, codes):
                assert v["language"] == "python", v
                assert v["size"] == len(code.encode()), (v, len(code.encode()))
                assert v["sha256"] == sha(code), v
                assert isinstance(v["created"], (int, float)), v
                assert "limits" in v, v

    def test_get_version_returns_code(self, server, uid):
        path = f"{uid}/code"
        c1 = 'x = """keep\n    this indentation"""\nreturn x'
        v1 = upload(server, path, c1)
        v2 = upload(server, path, "return 2")
        body = assert_ok(server.get(fn_url(path, v1)))
        assert body["version"] == v1 and body["code"] == c1, body
        assert body["latest"] == v2 and len(body["versions"]) == 2, body
        body = assert_ok(server.get(fn_url(path, v2)))
        assert body["version"] == v2 and body["code"] == "return 2", body
        assert_error(server.get(fn_url(path, v2 + 1000)), 404)
        assert_error(server.get(fn_url(path, "abc")), 400)

    def test_patch_rolls_back_and_forward(self, server, uid):
        path = f"{uid}/roll"
        v1 = upload(server, path, "return 'one'")
        v2 = upload(server, path, "return 'two'")
        assert assert_ok(server.run(path))["data"] == "two"

        body = assert_ok(server.request("PATCH", fn_url(path), {"latest": v1}))
        assert (body["path"], body["latest"]) == (path, v1), body
        ran = assert_ok(server.run(path))
        assert ran["data"] == "one" and ran.get("version", v1) == v1, ran
        assert assert_ok(server.get(fn_url(path)))["latest"] == v1
        assert listed(server, path)["latest"] == v1
        assert assert_ok(server.run(path, version=v2))["data"] == "two", "explicit versions still run"

        assert_ok(server.request("PATCH", fn_url(path, encode=True), {"latest": v2}))
        assert assert_ok(server.run(path))["data"] == "two"

        # a new upload after a roll back becomes the latest
        server.request("PATCH", fn_url(path), {"latest": v1})
        v3 = upload(server, path, "return 'three'")
        assert v3 > v2
        assert assert_ok(server.run(path))["data"] == "three"

    def test_patch_bad_bodies(self, server, uid):
        path = f"{uid}/badpatch"
        v1 = upload(server, path, "return 1")
        for body in ({}, {"latest": None}, {"latest": "x"}, {"latest": str(v1)}, {"latest": True},
                     {"latest": 0}, {"latest": -1}, {"latest": 1.5}, {"latest": [v1]},
                     [v1], "not json", '{"latest": '):
            r = server.request("PATCH", fn_url(path), body)
            assert_error(r, 400)
        assert assert_ok(server.get(fn_url(path)))["latest"] == v1, "a bad PATCH changes nothing"

    def test_patch_unknown_is_404(self, server, uid):
        path = f"{uid}/patch404"
        v1 = upload(server, path, "return 1")
        assert_error(server.request("PATCH", fn_url(path), {"latest": v1 + 999}), 404)
        assert_error(server.request("PATCH", fn_url(f"{uid}/nothing"), {"latest": v1}), 404)
        assert assert_ok(server.get(fn_url(path)))["latest"] == v1
        assert listed(server, f"{uid}/nothing") is None, "PATCH must not create a function"

    def test_delete_one_version(self, server, redis_server, uid):
        path = f"{uid}/del1"
        v1 = upload(server, path, "return 1")
        v2 = upload(server, path, "return 2")
        v3 = upload(server, path, "return 3")

        body = assert_ok(server.request("DELETE", fn_url(path, v3)))
        assert body["path"] == path and body["deleted"] == 1 and body["latest"] == v2, body
        assert assert_ok(server.run(path))["data"] == 2, "latest moved to the newest remaining"
        assert_error(server.run(path, version=v3), 404)
        assert_error(server.get(fn_url(path, v3)), 404)
        info = assert_ok(server.get(fn_url(path)))
        assert [v["version"] for v in info["versions"]] == [v1, v2] and info["latest"] == v2, info
        assert listed(server, path)["versions"] == 2

        # deleting an older version leaves latest alone
        body = assert_ok(server.request("DELETE", fn_url(path, v1, encode=True)))
        assert body["deleted"] == 1 and body["latest"] == v2, body
        assert_error(server.run(path, version=v1), 404)
        assert assert_ok(server.run(path))["data"] == 2

        # repeated delete: 404 and harmless
        assert_error(server.request("DELETE", fn_url(path, v3)), 404)
        assert_error(server.request("DELETE", fn_url(path, v1)), 404)
        info = assert_ok(server.get(fn_url(path)))
        assert [v["version"] for v in info["versions"]] == [v2] and info["latest"] == v2, info

        # deleting the last version removes the function
        body = assert_ok(server.request("DELETE", fn_url(path, v2)))
        assert body["deleted"] == 1 and body["latest"] is None, body
        assert_error(server.get(fn_url(path)), 404)
        assert_error(server.run(path), 404)
        assert listed(server, path) is None
        assert remaining_records(server, redis_server, path) == []

    def test_delete_rolled_back_latest(self, server, uid):
        path = f"{uid}/delrb"
        v1 = upload(server, path, "return 1")
        v2 = upload(server, path, "return 2")
        v3 = upload(server, path, "return 3")
        assert_ok(server.request("PATCH", fn_url(path), {"latest": v1}))
        body = assert_ok(server.request("DELETE", fn_url(path, v1)))
        assert body["latest"] == v3, "the newest remaining version becomes latest"
        assert assert_ok(server.run(path))["data"] == 3
        body = assert_ok(server.request("DELETE", fn_url(path, v2)))
        assert body["latest"] == v3, body

    def test_delete_all(self, server, redis_server, uid):
        path = f"{uid}/all/fn"
        neighbours = [f"{uid}/all/fn/sub", f"{uid}/all/fnx", f"{uid}/all"]
        versions = [upload(server, path, f"return {i}") for i in range(3)]
        for n in neighbours:
            upload(server, n, "return 'neighbour'")
        assert remaining_records(server, redis_server, path), "the store helper sees the function"

        body = assert_ok(server.request("DELETE", fn_url(path)))
        assert (body["path"], body["deleted"], body["latest"]) == (path, 3, None), body

        assert_error(server.get(fn_url(path)), 404)
        for v in versions:
            assert_error(server.get(fn_url(path, v)), 404)
            assert_error(server.run(path, version=v), 404)
        assert_error(server.run(path), 404)
        assert_error(server.request("PATCH", fn_url(path), {"latest": versions[0]}), 404)
        assert listed(server, path) is None
        assert remaining_records(server, redis_server, path) == [], "orphaned keys or rows"

        # repeated delete is a 404 and changes nothing
        assert_error(server.request("DELETE", fn_url(path)), 404)
        assert_error(server.request("DELETE", fn_url(path, versions[0])), 404)
        for n in neighbours:
            assert assert_ok(server.run(n))["data"] == "neighbour", n
            assert listed(server, n) is not None, n

        # the path can be used again afterwards
        # (a version number of deleted code may come back here when several uploads happened
        # within the last seconds: the store keeps nothing of a deleted function)
        v = upload(server, path, "return 'again'")
        assert assert_ok(server.run(path))["data"] == "again"
        assert assert_ok(server.get(fn_url(path)))["versions"][0]["version"] == v

    def test_unknown_function_or_version(self, server, uid):
        missing = f"{uid}/missing/fn"
        assert_error(server.get(fn_url(missing)), 404)
        assert_error(server.get(fn_url(missing, 1)), 404)
        assert_error(server.request("DELETE", fn_url(missing)), 404)
        assert_error(server.request("DELETE", fn_url(missing, 1)), 404)
        assert_error(server.request("PATCH", fn_url(missing), {"latest": 1}), 404)
        path = f"{uid}/present"
        v = upload(server, path, "return 1")
        assert_error(server.get(fn_url(path, v + 1)), 404)
        assert_error(server.request("DELETE", fn_url(path, v + 1)), 404)
        assert assert_ok(server.get(fn_url(path)))["latest"] == v

    def test_bad_paths_and_versions(self, server, uid):
        path = f"{uid}/p"
        v = upload(server, path, "return 1")
        for bad in (f"{uid}/%2E%2E/p", f"{uid}//p", "a" * 201):
            for method in ("GET", "DELETE"):
                r = server.request(method, f"/functions/{bad}")
                assert r.status in (400, 404), (method, bad, r.status, r.body)
                assert_error(r, r.status)
        for q in ("abc", "0", "-1", "1.5"):
            assert_error(server.get(f"{fn_url(path)}?version={q}"), 400)
            assert_error(server.request("DELETE", f"{fn_url(path)}?version={q}"), 400)
        # versions too big for a 64-bit integer are unknown or bad input, never a server error
        for q in (str(2 ** 63), str(2 ** 64 + 5), "9" * 40):
            for method in ("GET", "DELETE"):
                r = server.request(method, f"{fn_url(path)}?version={q}")
                assert r.status in (400, 404), (method, q, r.status, r.body)
            r = server.post(f"/run/{path}?version={q}", {})
            assert r.status in (400, 404), (q, r.status, r.body)
        r = server.request("PATCH", fn_url(path), {"latest": 2 ** 63})
        assert r.status in (400, 404), (r.status, r.body)
        assert assert_ok(server.get(fn_url(path)))["latest"] == v

    def test_wrong_methods_are_405(self, server, uid):
        for method, url in (("POST", "/functions"), ("PUT", "/functions/x"), ("POST", "/functions/x"),
                            ("GET", "/upload"), ("DELETE", "/metrics"), ("GET", "/run/x")):
            r = server.request(method, url)
            assert_error(r, 405)
            assert r.headers.get("allow"), r.headers

    def test_unread_body_does_not_become_a_request(self, server, uid):
        """An answer sent before the body was read (405, 401, a bad path...) must not leave
        that body on a kept-alive connection to be read as the next request."""
        smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for method, url in (("POST", "/functions"), ("PATCH", "/functions/a/%2E%2E/b"),
                            ("DELETE", "/functions/x"), ("GET", "/functions")):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            try:
                conn.request(method, url, body=smuggled, headers={"Content-Type": "application/json"})
                first = conn.getresponse()
                first.read()
                if first.getheader("Connection", "").lower() == "close":
                    continue
                conn.request("GET", "/functions")
                second = conn.getresponse()
                body = second.read()
                assert second.status == 200 and b"functions" in body, (
                    f"{method} {url}: the unread body was taken as a request: {second.status} {body[:200]!r}")
            finally:
                conn.close()


# --------------------------------------------------------------------------- auth

@pytest.fixture(scope="module")
def auth_server(faas):
    s = faas.start(store="sqlite", env={"FAAS_TOKEN": ADMIN, "FAAS_INVOKE_TOKEN": INVOKE})
    yield s
    s.stop()


PROTECTED = [  # (method, url, body); {p} is an existing function's path, {v} its version
    ("POST", "/upload", {"path": "{p}", "language": "python", "code": "return 9"}),
    ("POST", "/run-now", {"language": "python", "code": "return 1"}),
    ("POST", "/run/{p}", {}),
    ("GET", "/functions", None),
    ("GET", "/functions/{p}", None),
    ("GET", "/functions/{p}?version={v}", None),
    ("PATCH", "/functions/{p}", {"latest": "{v}"}),
    ("DELETE", "/functions/{p}?version=1", None),
    ("DELETE", "/functions/{p}", None),
    ("GET", "/metrics", None),
]


def fill(template, p, v):
    if isinstance(template, str):
        return template.replace("{p}", p).replace("{v}", str(v))
    if isinstance(template, dict):
        return {k: (v if val == "{v}" else fill(val, p, v)) for k, val in template.items()}
    return template


class TestAuth:
    @pytest.fixture
    def fn(self, auth_server, uid):
        path = f"{uid}/secured"
        return path, upload(auth_server, path, "return 'secret'", headers=ADMIN_H)

    def test_missing_or_wrong_token_is_401(self, auth_server, fn):
        path, v = fn
        bad_headers = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Bearer {ADMIN}x"},
                       {"Authorization": f"Bearer {ADMIN[:-1]}"}, {"Authorization": ADMIN},
                       {"Authorization": f"Basic {ADMIN}"}, {"Authorization": "Bearer "}]
        for method, url, body in PROTECTED:
            for headers in bad_headers:
                r = auth_server.request(method, fill(url, path, v), fill(body, path, v), headers=headers)
                assert_error(r, 401)
                assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers
                assert 'realm="faas"' in r.headers["www-authenticate"], r.headers
        # nothing was changed by the refused calls
        body = assert_ok(auth_server.get(fn_url(path), headers=ADMIN_H))
        assert [x["version"] for x in body["versions"]] == [v], body

    def test_invoke_token_may_only_run(self, auth_server, fn):
        path, v = fn
        r = auth_server.post(f"/run/{path}", {}, headers=INVOKE_H)
        assert assert_ok(r)["data"] == "secret"
        assert assert_ok(auth_server.post(f"/run/{path}?version={v}", {}, headers=INVOKE_H))["data"] == "secret"
        s = auth_server.sse(f"/run/{path}", {"stream": True}, headers=INVOKE_H)
        assert s.status == 200
        assert s.all_events()[-1]["event"] == "result"
        assert_error(auth_server.post(f"/run/{path}-missing", {}, headers=INVOKE_H), 404)
        for method, url, body in PROTECTED:
            if url == "/run/{p}":
                continue
            r = auth_server.request(method, fill(url, path, v), fill(body, path, v), headers=INVOKE_H)
            assert_error(r, 403)
            assert "www-authenticate" not in r.headers or r.status == 403
        body = assert_ok(auth_server.get(fn_url(path), headers=ADMIN_H))
        assert [x["version"] for x in body["versions"]] == [v], "a refused call changed the function"

    def test_admin_token_may_do_everything(self, auth_server, fn):
        path, v = fn
        for method, url, body in PROTECTED:
            r = auth_server.request(method, fill(url, path, v), fill(body, path, v), headers=ADMIN_H)
            if (method, url) == ("DELETE", "/functions/{p}?version=1"):
                assert_error(r, 404)   # authorized; there is no version 1
                continue
            assert r.status == 200, (method, url, r.status, r.body)
        assert_error(auth_server.get(fn_url(path), headers=ADMIN_H), 404)   # the DELETE ran

    def test_public_routes_need_no_token(self, auth_server):
        for headers in ({}, {"Authorization": "Bearer wrong"}, INVOKE_H):
            assert assert_ok(auth_server.get("/healthz", headers=headers))["status"] == "ok"
            r = auth_server.get("/openapi.json", headers=headers)
            assert r.status == 200 and r.body["openapi"].startswith("3."), (r.status, str(r.body)[:200])

    def test_public_bind_without_token_refuses_to_start(self, faas):
        s = faas.start(store="sqlite", env={"FAAS_HOST": "0.0.0.0"}, wait=False)
        try:
            code = s.proc.wait(30)
        except subprocess.TimeoutExpired:
            s.stop()
            pytest.fail("the server started on 0.0.0.0 without a token")
        assert code != 0
        err = s.stderr_text()
        assert "FAAS_TOKEN" in err and "FAAS_INSECURE" in err, err
        assert "Traceback" not in err, err

    def test_public_bind_with_insecure_starts(self, faas):
        # binds every interface; the test talks to it over loopback only
        s = faas.start(store="sqlite", env={"FAAS_HOST": "0.0.0.0", "FAAS_INSECURE": "1"})
        try:
            assert assert_ok(s.get("/healthz"))["status"] == "ok"
            assert assert_ok(s.get("/functions")) == {"functions": []}
            assert "INSECURE" in s.stderr_text().upper(), "a warning is logged"
        finally:
            s.stop()

    def test_public_bind_with_token_starts(self, faas):
        s = faas.start(store="sqlite", env={"FAAS_HOST": "0.0.0.0", "FAAS_TOKEN": ADMIN})
        try:
            assert_error(s.get("/functions"), 401)
            assert_ok(s.get("/functions", headers=ADMIN_H))
        finally:
            s.stop()


# --------------------------------------------------------------------------- request ids

class TestRequestId:
    def test_every_answer_has_a_request_id(self, server, uid):
        path = f"{uid}/rid"
        upload(server, path, "print('x')\nreturn 1")
        answers = [
            server.get("/healthz"), server.get("/openapi.json"), server.get("/metrics"),
            server.get("/functions"), server.get(fn_url(path)), server.run(path),
            server.post("/run-now", {"language": "python", "code": "raise ValueError('x')"}),
            server.get("/nope"), server.request("PUT", "/functions"), server.get(fn_url(f"{uid}/none")),
            server.post("/upload", b"{not json"), server.post("/run-now", b"x" * (300 * 1024)),
        ]
        ids = []
        for r in answers:
            rid = r.headers.get("x-request-id", "")
            assert REQUEST_ID_RE.fullmatch(rid), (r.status, r.headers)
            ids.append(rid)
        assert len(set(ids)) == len(ids), "request ids must be unique"
        s = server.sse(f"/run/{path}", {"stream": True})
        assert REQUEST_ID_RE.fullmatch(s.headers.get("x-request-id", "")), s.headers
        s.all_events()

    def test_request_id_is_echoed(self, server, uid):
        path = f"{uid}/echo"
        upload(server, path, "return 1")
        for rid in ("abc-123", "A.b_c-9", "x" * 64):
            for r in (server.get("/healthz", headers={"X-Request-Id": rid}),
                      server.post(f"/run/{path}", {}, headers={"X-Request-Id": rid}),
                      server.get(fn_url(f"{uid}/none"), headers={"X-Request-Id": rid})):
                assert r.headers.get("x-request-id") == rid, (rid, r.status, r.headers)
        s = server.sse(f"/run/{path}", {"stream": True}, headers={"X-Request-Id": "stream-id-1"})
        assert s.headers.get("x-request-id") == "stream-id-1"
        s.all_events()

    def test_unsafe_request_ids_are_replaced(self, server):
        for rid in ("x" * 65, "has space", "semi;colon", "ünï", "a\tb"):
            r = server.get("/healthz", headers={"X-Request-Id": rid})
            got = r.headers.get("x-request-id", "")
            assert got != rid and REQUEST_ID_RE.fullmatch(got), (rid, got)

    def test_request_is_logged_with_its_id(self, server):
        server.get("/functions", headers={"X-Request-Id": "log-me-4242"})
        deadline = time.monotonic() + 5
        while "log-me-4242" not in server.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [line for line in server.stderr_text().splitlines() if "log-me-4242" in line]
        assert lines, "one log line per request, with its id"
        assert any("200" in line and "functions" in line for line in lines), lines


# --------------------------------------------------------------------------- metrics

@pytest.fixture(scope="module")
def metrics_server(faas):
    s = faas.start(store="sqlite", env={"TIMEOUT_SCRIPT": "2"})
    yield s
    s.stop()


class TestMetrics:
    def test_exposition_parses_and_names_the_metrics(self, metrics_server):
        samples, families, text = metric_samples(metrics_server)
        names = sample_names(samples)
        for name in ("faas_runs_in_flight", "faas_runs_waiting"):
            assert name in names, (name, sorted(names))
            assert families[name].type == "gauge"
        assert any(n == "faas_rejected_total" for n in names), sorted(names)
        assert ("faas_store_errors_total" in names), "counters are exposed from the start (at 0)"
        for line in text.splitlines():
            assert line == "" or line.startswith("#") or re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+$", line), line

    def test_calls_move_the_counters(self, metrics_server, uid):
        s = metrics_server
        ok_path, err_path, slow_path = f"{uid}/ok", f"{uid}/err", f"{uid}/slow"
        before, _, _ = metric_samples(s)
        upload(s, ok_path, "return 1")
        upload(s, err_path, "raise ValueError('boom')")
        upload(s, slow_path, "import time\ntime.sleep(30)")
        assert assert_ok(s.run(ok_path))["data"] == 1
        assert assert_ok(s.run(ok_path))["data"] == 1
        assert_error(s.run(err_path), 500)
        r = s.run(slow_path)
        assert_error(r, 504)
        assert r.body["status"] == "timeout", r.body
        assert assert_ok(s.run_now("python", "return 2"))["data"] == 2
        assert assert_ok(s.run_now("javascript", "return 3"))["data"] == 3
        after, families, text = metric_samples(s)

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        calls = "faas_calls_total"
        assert delta(calls, function=ok_path, language="python", status="ok") == 2, text
        assert delta(calls, function=err_path, language="python", status="error") == 1, text
        assert delta(calls, function=slow_path, language="python", status="timeout") == 1, text
        assert delta(calls, function="run-now", language="python", status="ok") == 1, text
        assert delta(calls, function="run-now", language="javascript", status="ok") == 1, text
        assert delta("faas_uploads_total", language="python") == 3, text

        hist = "faas_call_duration_seconds"
        assert families[hist].type == "histogram"
        assert delta(f"{hist}_count", language="python") == 5, text
        assert delta(f"{hist}_count", language="javascript") == 1, text
        assert delta(f"{hist}_sum", language="python") >= 2.0, "the timed-out call ran ~2 s"
        buckets = sorted(((float(dict(k)["le"]), v) for (n, k), v in after.items()
                          if n == f"{hist}_bucket" and dict(k).get("language") == "python"))
        assert buckets and buckets[-1][0] == float("inf"), buckets
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert buckets[-1][1] == value(after, f"{hist}_count", language="python")
        below_one = [v for le, v in buckets if le <= 1.0]
        assert below_one and below_one[-1] < buckets[-1][1], "the 2 s timeout is above the 1 s bucket"

        spawn = "faas_sandbox_spawn_seconds"
        assert families[spawn].type == "histogram"
        spawn_count = sum(v for (n, k), v in after.items() if n == f"{spawn}_count")
        spawn_before = sum(v for (n, k), v in before.items() if n == f"{spawn}_count")
        assert spawn_count - spawn_before >= 6, text

        http_total = sum(v for (n, k), v in after.items() if n == "faas_http_requests_total")
        http_before = sum(v for (n, k), v in before.items() if n == "faas_http_requests_total")
        assert http_total - http_before >= 9, text
        codes = {dict(k).get("code") for (n, k), v in after.items() if n == "faas_http_requests_total"}
        assert {"200", "500", "504"} <= codes, codes
        assert value(after, "faas_runs_in_flight") == 0

    def test_in_flight_gauge(self, metrics_server, uid):
        s = metrics_server
        path = f"{uid}/inflight"
        upload(s, path, "import time\nprint('started', flush=True)\ntime.sleep(1.5)\nreturn 1")
        stream = s.sse(f"/run/{path}", {"stream": True})
        assert stream.status == 200
        events = stream.events()
        _, first = next(events)   # the code is running now
        assert first["event"] == "log", first
        samples, _, _ = metric_samples(s)
        assert value(samples, "faas_runs_in_flight") == 1
        rest = [ev for _, ev in events]
        assert rest[-1]["event"] == "result"
        samples, _, _ = metric_samples(s)
        assert value(samples, "faas_runs_in_flight") == 0

    def test_rejections_are_counted(self, faas, uid):
        s = faas.start(store="sqlite", env={"FAAS_MAX_RUNS": "1", "FAAS_MAX_QUEUE": "0",
                                            "FAAS_QUEUE_TIMEOUT": "0", "TIMEOUT_SCRIPT": "10"})
        try:
            path = f"{uid}/busy"
            upload(s, path, "import time\nprint('in', flush=True)\ntime.sleep(3)\nreturn 'done'")
            before, _, _ = metric_samples(s)
            stream = s.sse(f"/run/{path}", {"stream": True})   # headers arrive once it holds the slot
            assert stream.status == 200
            results = {}

            def second():
                results["r"] = s.run(path)

            t = threading.Thread(target=second)
            t.start()
            t.join(10)
            r = results["r"]
            assert_error(r, 429)
            assert r.headers.get("retry-after"), r.headers
            events = stream.all_events()
            assert events[-1]["event"] == "result" and events[-1]["data"] == "done", events
            after, _, text = metric_samples(s)
            assert value(after, "faas_rejected_total", reason="queue") - \
                value(before, "faas_rejected_total", reason="queue") == 1, text
            assert value(after, "faas_runs_waiting") == 0
            assert assert_ok(s.run(path))["data"] == "done", "the slot is free again"
        finally:
            s.stop()

    def test_metrics_need_the_admin_token(self, auth_server):
        assert_error(auth_server.get("/metrics"), 401)
        assert_error(auth_server.get("/metrics", headers=INVOKE_H), 403)
        samples, _, _ = metric_samples(auth_server, headers=ADMIN_H)
        assert "faas_runs_in_flight" in sample_names(samples)


# --------------------------------------------------------------------------- OpenAPI

def test_openapi_document_is_valid_and_served(sqlite_server):
    doc = json.loads(OPENAPI.read_text())
    assert doc["openapi"] == "3.0.3"
    try:
        from openapi_spec_validator import validate
    except ImportError:
        validate = None
    if validate is not None:
        validate(doc)
    r = sqlite_server.get("/openapi.json")
    assert r.status == 200 and "json" in r.headers.get("content-type", "")
    assert r.body == doc, "GET /openapi.json serves the file beside faas.py"
    expected = {("/upload", "post"), ("/run/{path}", "post"), ("/run-now", "post"), ("/healthz", "get"),
                ("/functions", "get"), ("/functions/{path}", "get"), ("/functions/{path}", "patch"),
                ("/functions/{path}", "delete"), ("/metrics", "get"), ("/openapi.json", "get"),
                ("/", "get"), ("/console", "get"), ("/console/{name}", "get"),
                ("/functions/{path}/secrets", "put"), ("/functions/{path}/secrets", "get"),
                ("/functions/{path}/secrets", "delete"),
                ("/calls", "get"), ("/calls/{call_id}", "get"), ("/calls/{call_id}", "delete"),
                ("/calls/{call_id}/events", "get"), ("/nodes", "get")}
    got = {(p, m) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert got == expected


SCHEMATHESIS_CONFIG = """
# /run and /run-now answer 500 when the function fails and 504 when it times out: documented
# outcomes of running code, not server errors. Everywhere else any 5xx is a bug.
[[operations]]
include-operation-id = ["run", "runNow"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "500", "504"]
"""

# positive_data_acceptance expects 2xx for any schema-valid body, but random `code` strings
# are mostly not valid Python/JavaScript: /upload answers those 400 by design.
# use_after_free: DELETE /calls/{call_id} cancels a call and its record stays readable
# (status cancelled) until its retention ends, by design; the per-operation setting is not
# applied in the stateful phase, so the check is off (function deletion has its own tests).
SCHEMATHESIS_EXCLUDED_CHECKS = "positive_data_acceptance,use_after_free"
SCHEMATHESIS_MAX_EXAMPLES = int(os.environ.get("FAAS_SCHEMATHESIS_EXAMPLES", "30"))


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_schemathesis(faas, tmp_path, store):
    pytest.importorskip("schemathesis")
    s = faas.start(store=store, env={
        "FAAS_TOKEN": ADMIN, "FAAS_INVOKE_TOKEN": INVOKE, "TIMEOUT_SCRIPT": "2",
        "FAAS_MAX_RUNS": "2", "FAAS_MAX_QUEUE": "8", "FAAS_QUEUE_TIMEOUT": "10",
        "CODE_MAX_SIZE": "65536", "FAAS_MAX_OUTPUT": "64K"})
    try:
        # the document's example path exists, so the examples phase reaches 200 answers
        upload(s, "team/hello", "return event", headers=ADMIN_H)
        config = tmp_path / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG)
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
               "run", str(OPENAPI), "--url", s.url, "-H", f"Authorization: Bearer {ADMIN}",
               "--checks", "all", "--exclude-checks", SCHEMATHESIS_EXCLUDED_CHECKS,
               "--max-examples", str(SCHEMATHESIS_MAX_EXAMPLES), "--workers", "1",
               "--request-timeout", "15", "--generation-database", "none",
               "--seed", os.environ.get("FAAS_SCHEMATHESIS_SEED", "6"), "--no-color"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        out = proc.stdout + proc.stderr
        (tmp_path / "schemathesis.log").write_text(out)
        summary = [line.strip() for line in out.splitlines() if " generated, " in line]
        sys.stderr.write(f"\nschemathesis ({store}): {' | '.join(summary[-1:])}\n")
        if proc.returncode != 0:
            # the failures (with a curl line each) and any errors, then the summary
            start = min([i for i in (out.find("= ERRORS ="), out.find("= FAILURES =")) if i >= 0] or [0])
            pytest.fail(f"schemathesis found problems ({store}; full log {tmp_path / 'schemathesis.log'}):\n"
                        f"{out[max(0, start - 200):][:20000]}", pytrace=False)
        assert "generated" in out, out[-3000:]
        assert s.alive(), "the server survived the fuzzing"
        assert assert_ok(s.get("/healthz"))["status"] == "ok"
    finally:
        s.stop()
