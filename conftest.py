"""Fixtures for the faas integration tests.

Everything here drives the real thing: `python3 faas.py` on a free loopback port, real
bwrap, real node/esbuild, and a real `redis-server` that the tests start themselves.
The HTTP helpers use only the standard library (http.client), so what the tests see is
what a curl user sees.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent
FAAS_PY = REPO / "faas.py"

collect_ignore_glob = ["faas-data/*", "node_modules/*"]

# Variables of the server's configuration: removed from the inherited environment so a
# developer's shell (or a .env) cannot change what the tests see.
CONFIG_VARS = (
    "HTTP_PORT", "MAX_CPUS", "MAX_MEMORY", "CODE_MAX_SIZE", "TIMEOUT_SCRIPT",
    "STATE_DIRECTORY",
)
CONFIG_PREFIXES = ("FAAS_", "REDIS_")

HEALTH_TIMEOUT = 20.0

STARTED = []  # every FaasServer started in this session, in order


# --------------------------------------------------------------------------- helpers

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reject_constant(name):
    raise ValueError(f"invalid JSON constant {name!r} in an answer")


def strict_json(raw):
    """Parse JSON as strictly as a browser would (no NaN/Infinity)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw, parse_constant=_reject_constant)


class Response(tuple):
    """(status, headers, body) where body is parsed JSON when the answer is JSON, else
    text. Headers are a dict with lower-case names. `.raw` keeps the bytes."""

    def __new__(cls, status, headers, body, raw):
        self = super().__new__(cls, (status, headers, body))
        self.raw = raw
        return self

    status = property(lambda self: self[0])
    headers = property(lambda self: self[1])
    body = property(lambda self: self[2])


def _encode_body(body):
    if body is None:
        return None
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body).encode("utf-8")


def _connection(base_url, timeout):
    u = urlsplit(base_url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(base_url, method, path, body=None, headers=None, timeout=60):
    """One HTTP request; returns Response(status, headers, body)."""
    data = _encode_body(body)
    hdrs = {}
    if data is not None and not isinstance(body, (bytes, bytearray, str)):
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    conn = _connection(base_url, timeout)
    try:
        try:
            conn.request(method, path, body=data, headers=hdrs)
        except (BrokenPipeError, ConnectionResetError):
            # the server may answer (e.g. 413) before reading a large body
            pass
        resp = conn.getresponse()
        raw = resp.read()
        rheaders = {k.lower(): v for k, v in resp.getheaders()}
        status = resp.status
    finally:
        conn.close()
    parsed = raw.decode("utf-8", "replace")
    ctype = rheaders.get("content-type", "")
    if "json" in ctype or parsed[:1] in ("{", "["):
        try:
            parsed = strict_json(raw)
        except ValueError:
            if "json" in ctype:
                raise AssertionError(f"answer says JSON but is not: {raw[:500]!r}")
    return Response(status, rheaders, parsed, raw)


class SSEStream:
    """An open request whose answer is read line by line as it arrives.

    `status` and `headers` are known at once; `events()` yields (arrival_time, event)
    for each `data:` event as soon as its terminating blank line arrives, and ends when
    the server closes the stream. For a non-stream answer `body()` gives it parsed."""

    def __init__(self, base_url, path, body=None, headers=None, timeout=60):
        data = _encode_body(body)
        hdrs = {"Accept": "text/event-stream"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        self.conn = _connection(base_url, timeout)
        self.conn.request("POST", path, body=data, headers=hdrs)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.lines = []  # every raw line, for diagnostics

    def events(self):
        data_lines = []
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    break
                self.lines.append(line)
                text = line.decode("utf-8").rstrip("\r\n")
                if text == "":
                    if data_lines:
                        now = time.monotonic()
                        payload = "\n".join(data_lines)
                        data_lines = []
                        try:
                            event = strict_json(payload)
                        except ValueError as e:
                            raise AssertionError(f"SSE event is not JSON: {payload!r} ({e})")
                        yield now, event
                    continue
                if text.startswith(":"):
                    continue  # comment / keep-alive
                field, _, value = text.partition(":")
                if value.startswith(" "):
                    value = value[1:]
                if field == "data":
                    data_lines.append(value)
            if data_lines:
                raise AssertionError(f"stream ended inside an event: {data_lines!r}")
        finally:
            self.close()

    def all_events(self):
        return [ev for _, ev in self.events()]

    def body(self):
        raw = self.resp.read()
        self.close()
        try:
            return strict_json(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


class Client:
    """Tiny HTTP client bound to one server."""

    def __init__(self, url):
        self.url = url

    def get(self, path, headers=None, timeout=60):
        return request(self.url, "GET", path, None, headers, timeout)

    def post(self, path, body=None, headers=None, timeout=60):
        return request(self.url, "POST", path, body, headers, timeout)

    def request(self, method, path, body=None, headers=None, timeout=60):
        return request(self.url, method, path, body, headers, timeout)

    def sse(self, path, body=None, headers=None, timeout=60):
        return SSEStream(self.url, path, body, headers, timeout)

    # conveniences used by most tests
    def upload(self, path, language, code, expect=200):
        r = self.post("/upload", {"path": path, "language": language, "code": code})
        if expect is not None:
            assert r.status == expect, f"upload {path}: {r.status} {r.body!r}"
        return r

    def run(self, path, input=None, version=None, **extra):
        q = f"?version={version}" if version is not None else ""
        body = dict(extra)
        if input is not None:
            body["input"] = input
        return self.post(f"/run/{path}{q}", body)

    def run_now(self, language, code, input=None, **extra):
        body = {"language": language, "code": code, **extra}
        if input is not None:
            body["input"] = input
        return self.post("/run-now", body)


# --------------------------------------------------------------------------- redis

class RedisServer:
    def __init__(self, port, proc, tmpdir):
        self.port = port
        self.proc = proc
        self.tmpdir = tmpdir

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db=0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, decode_responses=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (run: bash tests/install.sh)"
    tmpdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = open(tmpdir / "redis.log", "wb")
    proc = subprocess.Popen(
        [exe, "--save", "", "--appendonly", "no", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(tmpdir), "--daemonize", "no"],
        cwd=tmpdir, stdout=log, stderr=subprocess.STDOUT,
    )
    server = RedisServer(port, proc, tmpdir)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            log.flush()
            raise RuntimeError("redis-server exited: " + (tmpdir / "redis.log").read_text())
        try:
            if server.client().ping():
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield server
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# --------------------------------------------------------------------------- faas server

class FaasServer(Client):
    def __init__(self, proc, port, host, stderr_path, stdout_path, env, store, cwd):
        super().__init__(f"http://{host}:{port}")
        self.proc = proc
        self.port = port
        self.host = host
        self.stderr_path = stderr_path
        self.stdout_path = stdout_path
        self.env = env
        self.store = store
        self.cwd = cwd

    def stderr_text(self):
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self):
        try:
            return Path(self.stdout_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __repr__(self):
        return f"<faas {self.store} {self.url}>"


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in CONFIG_VARS and not k.startswith(CONFIG_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class FaasFactory:
    """Starts `python3 faas.py` servers; every server it started is stopped at the end."""

    def __init__(self, tmp_path_factory, redis_server_getter):
        self.tmp = tmp_path_factory
        self._redis = redis_server_getter
        self.servers = []

    free_port = staticmethod(free_port)
    clean_env = staticmethod(clean_env)

    def redis_env(self, prefix=None, db=0):
        redis = self._redis()
        return {
            "REDIS_URL": redis.url(db),
            "FAAS_REDIS_PREFIX": prefix or f"faastest-{uuid.uuid4().hex[:10]}:",
        }

    def start(self, store="sqlite", env=None, cwd=None, args=(), wait=True,
              port=None, host="127.0.0.1", set_port=True):
        """Start a server. `env` overrides (a value of None removes the variable).
        With wait=True, returns once GET /healthz answers 200 (or fails showing the
        server's stderr)."""
        full = clean_env()
        if os.environ.get("FAAS_TEST_ZYGOTE"):   # e.g. off: the whole suite on the bwrap path
            full["FAAS_ZYGOTE"] = os.environ["FAAS_TEST_ZYGOTE"]
        if store == "sqlite":
            full["FAAS_DATA_DIR"] = str(self.tmp.mktemp("faas-data"))
        elif store == "redis":
            full.update(self.redis_env())
        elif store is not None:
            raise ValueError(store)
        port = port or free_port()
        if set_port:
            full["HTTP_PORT"] = str(port)
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = str(v)
        logdir = self.tmp.mktemp("faas-log")
        stderr_path = logdir / "stderr.txt"
        stdout_path = logdir / "stdout.txt"
        with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(FAAS_PY), *args],
                cwd=str(cwd or REPO), env=full, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err,
            )
        server = FaasServer(proc, port, host, stderr_path, stdout_path, full, store,
                            cwd or REPO)
        self.servers.append(server)
        STARTED.append(server)
        if wait:
            self.wait_healthy(server)
        return server

    def wait_healthy(self, server, timeout=HEALTH_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(
                    f"faas.py exited with {server.proc.returncode} before it was ready; "
                    f"stderr:\n{server.stderr_text()}", pytrace=False)
            try:
                r = server.get("/healthz", timeout=5)
                if r.status == 200:
                    return r
                last = f"status {r.status}: {r.body!r}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        server.stop()
        pytest.fail(f"faas.py did not answer GET /healthz 200 within {timeout}s "
                    f"(last: {last}); stderr:\n{server.stderr_text()}", pytrace=False)

    def stop_all(self):
        for s in self.servers:
            try:
                s.stop()
            except Exception:
                pass


@pytest.fixture(scope="session")
def faas(tmp_path_factory, request):
    """Factory: faas.start(store="sqlite"|"redis"|None, env={...}, cwd=..., wait=True)."""
    assert FAAS_PY.exists(), f"{FAAS_PY} does not exist"
    factory = FaasFactory(tmp_path_factory,
                          lambda: request.getfixturevalue("redis_server"))
    yield factory
    factory.stop_all()


def assert_clean_log(server):
    """The server never logs a Python traceback, whatever the clients did."""
    text = server.stderr_text()
    assert "Traceback" not in text, \
        f"{server!r} logged a traceback:\n" + text[text.index("Traceback") - 300:][:4000]


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request, faas):
    """A running server on each store; the contract tests run once per store."""
    s = faas.start(store=request.param, env={"FAAS_TEST_SECRET": "do-not-leak-4711"})
    yield s
    s.stop()
    assert_clean_log(s)


@pytest.fixture(scope="module")
def sqlite_server(faas):
    s = faas.start(store="sqlite")
    yield s
    s.stop()
    assert_clean_log(s)


@pytest.fixture
def uid():
    """A unique function path component."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(autouse=True)
def _show_server_stderr_on_failure(request):
    """On a failing test, print the tail of the servers' stderr to help diagnose it."""
    first = len(STARTED)
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        shown = list(STARTED[first:])
        for name in ("server", "sqlite_server", "limited_server"):
            if name in request.fixturenames:
                try:
                    shown.append(request.getfixturevalue(name))
                except Exception:
                    continue
        for s in shown:
            tail = s.stderr_text()[-3000:]
            sys.stderr.write(f"\n--- stderr of {s!r} (tail) ---\n{tail}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


# Fixtures whose servers pin FAAS_ZYGOTE themselves, once per spawn path (ids zygote, bwrap).
SPAWN_PATH_FIXTURES = {"limited_server", "fleet"}


def pytest_collection_modifyitems(config, items):
    """With FAAS_TEST_ZYGOTE set (.ci/run's second pass, every other server on one path),
    tests parametrized over both spawn paths would only repeat themselves: deselected."""
    if not os.environ.get("FAAS_TEST_ZYGOTE"):
        return
    pinned = [item for item in items
              if SPAWN_PATH_FIXTURES & set(getattr(getattr(item, "callspec", None), "params", {}))]
    if pinned:
        config.hook.pytest_deselected(items=pinned)
        items[:] = [item for item in items if item not in pinned]
