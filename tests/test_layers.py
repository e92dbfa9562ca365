"""Third-party libraries (issue 10): `requirements` / `dependencies` at upload, locked,
built into content-addressed read-only layers, bound into every sandbox.

Network-free by default: the wheels are built here with the standard library (a wheel is
a zip with METADATA, WHEEL and RECORD) and served to pip with --no-index --find-links; npm
talks to a registry served on 127.0.0.1 by this module, holding tarballs made with
`npm pack`. One test uses the real index and registry (numpy, lodash).

Every server here keeps its data under /var/tmp: the sandbox user must be able to
traverse to the layer store (pytest's own temporary directories are 0700).
"""
import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import pytest

from tests.helpers import assert_error, assert_ok, wait_until

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- packages

def make_wheel(outdir, name, version, module_src="", requires=(), files=None):
    """A py3-none-any wheel: `name`.py (plus `files`), METADATA, WHEEL and RECORD."""
    dist = f"{name}-{version}"
    content = {f"{name}.py": module_src, **(files or {})}
    content[f"{dist}.dist-info/METADATA"] = "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s" % (
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    content[f"{dist}.dist-info/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: faas-test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
    record = []
    path = Path(outdir) / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for arcname, text in content.items():
            data = text.encode() if isinstance(text, str) else text
            archive.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        archive.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    path.chmod(0o644)
    return path


def make_sdist(outdir, name, version, marker):
    """A source-only package whose setup.py would write `marker` if anything ran it."""
    setup = f"open({str(marker)!r}, 'w').write('ran')\nfrom setuptools import setup\nsetup(name={name!r}, version={version!r})\n"
    path = Path(outdir) / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for arcname, text in {"setup.py": setup,
                              "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}.items():
            info = tarfile.TarInfo(f"{name}-{version}/{arcname}")
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    path.chmod(0o644)
    return path


class FakeRegistry:
    """An npm registry on 127.0.0.1: packuments at /<name>, tarballs made by `npm pack`.
    A package named in `stall` never finishes sending its tarball."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.packuments = {}
        self.tarballs = {}
        self.stall = set()
        self.release = threading.Event()
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
                if path in registry.tarballs:
                    name, data = registry.tarballs[path]
                    if name in registry.stall:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[:10])
                        self.wfile.flush()
                        registry.release.wait(120)
                        return
                    self.send(200, data, "application/octet-stream")
                elif path in registry.packuments:
                    self.send(200, json.dumps(registry.packuments[path]).encode(), "application/json")
                else:
                    self.send(404, b'{"error":"Not found"}', "application/json")

            def send(self, status, data, kind):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, name, version, files, dependencies=None, scripts=None, package_type=None):
        """Pack a package with `npm pack` and publish it here."""
        source = self.workdir / f"src-{name.replace('/', '-')}-{version}"
        source.mkdir(parents=True)
        manifest = {"name": name, "version": version, "main": "index.js"}
        if dependencies:
            manifest["dependencies"] = dependencies
        if scripts:
            manifest["scripts"] = scripts
        if package_type:
            manifest["type"] = package_type
            manifest.pop("main")
            manifest["exports"] = "./index.js"
        (source / "package.json").write_text(json.dumps(manifest))
        for file_name, text in files.items():
            (source / file_name).write_text(text)
        out = self.workdir / "packed"
        out.mkdir(exist_ok=True)
        packed = json.loads(subprocess.run(
            ["npm", "pack", "--json", "--ignore-scripts", "--pack-destination", str(out)],
            cwd=source, capture_output=True, text=True, check=True, timeout=60).stdout)[0]
        tarball_path = f"{name}/-/{packed['filename']}"
        self.tarballs[tarball_path] = (name, (out / packed["filename"]).read_bytes())
        packument = self.packuments.setdefault(name, {"name": name, "dist-tags": {}, "versions": {}})
        packument["versions"][version] = {**manifest, "dist": {
            "tarball": self.url + tarball_path, "integrity": packed["integrity"], "shasum": packed["shasum"]}}
        packument["dist-tags"]["latest"] = version

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def space():
    """A directory the sandbox user can traverse: wheels, registry files, data dirs."""
    root = Path(tempfile.mkdtemp(prefix="faas-layers-test-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "wheels").mkdir(mode=0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def wheels(space):
    wh = space / "wheels"
    make_wheel(wh, "faasdep", "1.0", "VALUE = 41\n")
    make_wheel(wh, "faasdemo", "1.0", "import faasdep\n\ndef answer():\n    return faasdep.VALUE + 1\n",
               requires=["faasdep>=1.0"])
    make_wheel(wh, "faasdemo", "2.0", "def answer():\n    return 2\n")
    make_wheel(wh, "faasshared", "1.0", "NAME = 'shared'\n")
    make_wheel(wh, "faasgc", "1.0", "X = 1\n")
    make_wheel(wh, "faasmiss", "1.0", "X = 'rebuilt'\n")
    make_wheel(wh, "faasredis", "1.0", "X = 'from-lock'\n")
    # Imported before the wrapper read its request (a warm sandbox) or while the call runs.
    # the wrapper is __main__ on the bwrap path and the module `python` in a zygote's call
    make_wheel(wh, "faaswarm", "1.0", "import sys\nwrapper = sys.modules.get('python') or sys.modules['__main__']\n"
                                      "BEFORE_REQUEST = wrapper.USER_CODE is None\n")
    make_wheel(wh, "faasbig", "1.0", "X = 1\n", files={f"faasbig_data/part{i}.bin": os.urandom(100_000)
                                                     for i in range(20)})
    return wh


@pytest.fixture(scope="module")
def registry(space):
    reg = FakeRegistry(space / "npm")
    reg.add("faas-cjs", "1.0.0", {"index.js": "exports.twice = (x) => 2 * x;\n"})
    reg.add("faas-esm", "1.0.0", {"index.js": "export const thrice = (x) => 3 * x;\n"}, package_type="module")
    reg.add("faas-scripted", "1.0.0", {"index.js": "module.exports = 'installed';\n"},
            scripts={"postinstall": f"touch {space}/npm-postinstall-ran",
                     "install": f"touch {space}/npm-install-ran"})
    reg.add("faas-deep", "1.0.0", {"index.js": "module.exports = require('faas-cjs').twice(21);\n"},
            dependencies={"faas-cjs": "^1.0.0"})
    reg.add("faas-warm", "1.0.0", {"index.js": "module.exports = process.argv.some((a) => a.startsWith('--preload='));\n"})
    reg.add("faas-slow", "1.0.0", {"index.js": "module.exports = 1;\n"})
    reg.stall.add("faas-slow")
    reg.add("faas-huge", "1.0.0", {"index.js": "module.exports = 1;\n",
                                   **{f"blob{i}.txt": os.urandom(60_000).hex() for i in range(20)}})
    yield reg
    reg.close()


def deps_env(space, name, registry=None, **extra):
    data = space / f"data-{name}"
    env = {"FAAS_DATA_DIR": str(data), "FAAS_DEPS_NO_INDEX": "1", "FAAS_DEPS_FIND_LINKS": str(space / "wheels"),
           "FAAS_POOL_SIZE": "1"}
    if registry is not None:
        env["FAAS_DEPS_NPM_REGISTRY"] = registry.url
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def lserver(faas, space, wheels, registry):
    s = faas.start(store="sqlite", env=deps_env(space, "main", registry))
    yield s
    s.stop()
    assert "Traceback" not in s.stderr_text(), s.stderr_text()[-3000:]


def upload(server, path, language, code, **fields):
    return server.post("/upload", {"path": path, "language": language, "code": code, **fields}, timeout=300)


def layer_dir(server, key):
    return Path(server.env["FAAS_DATA_DIR"]) / "deps" / "layers" / key


def staging_left(server):
    return sorted(os.listdir(Path(server.env["FAAS_DATA_DIR"]) / "deps" / "tmp"))


def faas_cli(server, *args, **env):
    full = {**server.env, **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, str(REPO / "faas.py"), *args], env=full, capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------- Python

def test_python_requirements_are_locked_built_and_imported(lserver, uid):
    body = assert_ok(upload(lserver, f"{uid}/a", "python", "import faasdemo\nreturn faasdemo.answer()",
                            requirements=["FaasDemo == 1.0"]))
    deps = body["dependencies"]
    assert deps["requested"] == ["faasdemo==1.0"], deps
    assert deps["packages"] == ["faasdemo==1.0", "faasdep==1.0"], deps
    assert deps["cached"] in (True, False) and deps["size"] > 0 and len(deps["key"]) == 64, deps
    assert assert_ok(lserver.run(f"{uid}/a"))["data"] == 42

    shown = assert_ok(lserver.get(f"/functions/{uid}/a?version={body['version']}"))["dependencies"]
    assert shown["requested"] == ["faasdemo==1.0"] and shown["key"] == deps["key"], shown
    lines = shown["lock"].splitlines()
    assert [line.split(" ")[0] for line in lines] == ["faasdemo==1.0", "faasdep==1.0"], lines
    assert all(" --hash=sha256:" in line and len(line.split(":")[-1]) == 64 for line in lines), lines

    # The same set spelled differently: the same lock, the same layer, no build.
    again = assert_ok(upload(lserver, f"{uid}/b", "python", "import faasdemo\nreturn faasdemo.answer() + 1",
                             requirements=["faasdemo==1.0"]))["dependencies"]
    assert again["key"] == deps["key"] and again["cached"] is True and again["build_ms"] == 0, again
    assert assert_ok(lserver.run(f"{uid}/b"))["data"] == 43
    assert assert_ok(lserver.run(f"{uid}/a"))["data"] == 42   # two functions, one layer

    # Another version resolves to other pins and another layer; the old version keeps its own.
    newer = assert_ok(upload(lserver, f"{uid}/a", "python", "import faasdemo\nreturn faasdemo.answer()",
                             requirements=["faasdemo>=2"]))
    assert newer["dependencies"]["packages"] == ["faasdemo==2.0"]
    assert newer["dependencies"]["key"] != deps["key"]
    assert assert_ok(lserver.run(f"{uid}/a"))["data"] == 2
    assert assert_ok(lserver.run(f"{uid}/a", version=body["version"]))["data"] == 42
    assert staging_left(lserver) == []


def test_layer_is_root_owned_read_only_and_unlistable(lserver, uid):
    code = """import os, errno, faasshared
site = os.path.dirname(faasshared.__file__)
try:
    os.listdir('/faas/layers')
    listed = 'listed'
except PermissionError:
    listed = 'denied'
try:
    open(os.path.join(site, 'planted.py'), 'w')
    wrote = 'wrote'
except OSError as e:
    wrote = errno.errorcode[e.errno]
env = open('/proc/1/environ', 'rb').read() + open('/proc/self/environ', 'rb').read()
return [faasshared.NAME, listed, wrote, b'PIP_' in env or b'npm_' in env or b'FAAS_' in env]"""
    body = assert_ok(upload(lserver, f"{uid}/iso", "python", code, requirements=["faasshared"]))
    assert assert_ok(lserver.run(f"{uid}/iso"))["data"] == ["shared", "denied", "EROFS", False]
    layer = layer_dir(lserver, body["dependencies"]["key"])
    for path in [layer, *layer.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == 0 and info.st_gid == 0, path
        assert not info.st_mode & 0o222, (path, oct(info.st_mode))
        assert info.st_mode & 0o444 == 0o444, (path, oct(info.st_mode))   # any sandbox uid may read
    # Bytecode was compiled at build time, valid without mtimes (unchecked-hash).
    pyc = list(layer.rglob("faasshared*.pyc"))
    assert pyc and int.from_bytes(pyc[0].read_bytes()[4:8], "little") == 0b01, pyc   # PEP 552: hash, unchecked


def test_a_library_function_still_takes_pre_started_sandboxes(lserver, uid):
    """Every sandbox has the layer store bound, so the interpreter pool serves library
    functions too (this one imports nothing by an import statement: no warm sandboxes)."""
    assert_ok(upload(lserver, f"{uid}/p", "python", "return __import__('faasdep').VALUE",
                     requirements=["faasdep==1.0"]))
    before = lserver.get("/healthz").body["pool"]["python"]["hits"]
    for _ in range(3):
        assert wait_until(lambda: lserver.get("/healthz").body["pool"]["python"]["idle"] >= 1, timeout=10)
        assert assert_ok(lserver.run(f"{uid}/p"))["data"] == 41
    assert lserver.get("/healthz").body["pool"]["python"]["hits"] >= before + 3


def warm_state(server, key):
    warm = server.get("/healthz").body["libraries"]["warm"]
    return next((state for name, state in warm.items() if name.startswith(key[:12])), None)


@pytest.mark.parametrize("language,code,fields", [
    ("python", "import faaswarm\nreturn faaswarm.BEFORE_REQUEST", {"requirements": ["faaswarm"]}),
    ("javascript", "return require('faas-warm')", {"dependencies": {"faas-warm": "1.0.0"}}),
])
def test_called_layers_get_warm_sandboxes_with_their_modules_imported(lserver, uid, language, code, fields):
    body = assert_ok(upload(lserver, f"{uid}/warm", language, code, **fields))
    key = body["dependencies"]["key"]
    assert warm_state(lserver, key) is None   # only for functions being called
    assert assert_ok(lserver.run(f"{uid}/warm"))["data"] is False   # imported by the call itself
    for _ in range(3):   # each warm sandbox serves one call, then a fresh one is started
        assert wait_until(lambda: (warm_state(lserver, key) or {}).get("idle") == 1, timeout=20), \
            lserver.get("/healthz").body["libraries"]
        assert assert_ok(lserver.run(f"{uid}/warm"))["data"] is True
    state = warm_state(lserver, key)
    assert state["hits"] >= 3 and state["size"] == 1, state
    # A call that lowers its memory still works (a warm sandbox is lowered, or it goes cold).
    assert wait_until(lambda: (warm_state(lserver, key) or {}).get("idle") == 1, timeout=20)
    assert assert_ok(lserver.run(f"{uid}/warm", memory="64M"))["data"] in (True, False)


def test_warm_sandboxes_are_bounded_per_layer_count(faas, space, wheels, uid):
    s = faas.start(store="sqlite", env=deps_env(space, "warm", FAAS_DEPS_WARM_LAYERS="1", FAAS_POOL_SIZE="0"))
    try:
        keys = []
        for name in ("faaswarm", "faasshared"):
            body = assert_ok(upload(s, f"{uid}/{name}", "python", f"import {name}\nreturn 1", requirements=[name]))
            keys.append(body["dependencies"]["key"])
            assert assert_ok(s.run(f"{uid}/{name}"))["data"] == 1
        assert wait_until(lambda: warm_state(s, keys[1]) and warm_state(s, keys[1])["idle"] == 1, timeout=20)
        assert warm_state(s, keys[0]) is None
        assert len(s.get("/healthz").body["libraries"]["warm"]) == 1
    finally:
        s.stop()


def test_thread_variables_follow_the_cpu_limit(lserver, uid):
    code = "import os\nreturn [os.environ.get(n) for n in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')]"
    assert assert_ok(lserver.run_now("python", code))["data"] == ["1", "1", "1"]
    assert_ok(upload(lserver, f"{uid}/t", "python", code, requirements=["faasdep"]))
    assert assert_ok(lserver.run(f"{uid}/t"))["data"] == ["1", "1", "1"]


def test_thread_variables_with_two_cpus(faas, space, wheels):
    s = faas.start(store="sqlite", env=deps_env(space, "cpus", MAX_CPUS="2.5", FAAS_POOL_SIZE="0"))
    try:
        code = "import os\nreturn os.environ['OPENBLAS_NUM_THREADS'] + os.environ['OMP_NUM_THREADS']"
        assert assert_ok(s.run_now("javascript", "return process.env.OPENBLAS_NUM_THREADS"))["data"] == "2"
        assert assert_ok(s.run_now("python", code))["data"] == "22"
    finally:
        s.stop()


def test_a_library_function_streams(lserver, uid):
    assert_ok(upload(lserver, f"{uid}/sse", "python",
                     "import faasdemo\nprint('before')\nreturn faasdemo.answer()", requirements=["faasdemo==1.0"]))
    events = lserver.sse(f"/run/{uid}/sse", {"stream": True}).all_events()
    assert [e["event"] for e in events] == ["log", "result"], events
    assert events[0]["data"] == "before" and events[1]["data"] == 42, events


def test_run_now_takes_requirements(lserver):
    body = assert_ok(lserver.run_now("python", "import faasdemo\nreturn faasdemo.answer()",
                                     requirements=["faasdemo==1.0"]))
    assert body["data"] == 42 and body["dependencies"]["packages"] == ["faasdemo==1.0", "faasdep==1.0"]


def test_functions_without_libraries_are_unchanged(lserver, uid):
    body = assert_ok(upload(lserver, f"{uid}/plain", "python", "return 1", requirements=[]))
    assert set(body) == {"path", "language", "version"}, body
    shown = assert_ok(lserver.get(f"/functions/{uid}/plain?version={body['version']}"))
    assert "dependencies" not in shown
    answer = assert_ok(lserver.run(f"{uid}/plain"))
    assert answer["data"] == 1 and "deps_build_ms" not in answer


def test_unreachable_data_dir_puts_layers_in_var_cache(faas, space, wheels):
    """As root with a data dir below a 0700 directory (a checkout in root's home), the
    sandbox user could not reach <data dir>/deps: the layers go to /var/cache/faas."""
    private = Path(tempfile.mkdtemp(prefix="faas-layers-private-"))
    private.chmod(0o700)
    s = faas.start(store="sqlite", env=deps_env(space, "unused", FAAS_DATA_DIR=private / "data", FAAS_POOL_SIZE="0"))
    try:
        assert_ok(s.post("/upload", {"path": "p/dep", "language": "python", "requirements": ["faasdep"],
                                     "code": "import faasdep\nreturn faasdep.VALUE"}, timeout=120))
        assert assert_ok(s.run("p/dep"))["data"] == 41
        line = next(line for line in s.stderr_text().splitlines() if "library layers in " in line)
        store = Path(line.split("library layers in ")[1]).parent
        assert store.parent == Path("/var/cache/faas"), line
    finally:
        s.stop()
        shutil.rmtree(private, ignore_errors=True)
    assert (store / "layers").is_dir()   # a layer was built: the cache stays
    shutil.rmtree(store)


def test_a_server_that_built_nothing_leaves_no_layer_store(faas, space):
    s = faas.start(store="sqlite", env=deps_env(space, "unused-store", FAAS_POOL_SIZE="0"))
    root = Path(s.env["FAAS_DATA_DIR"]) / "deps"
    assert (root / "layers").is_dir()
    assert s.stop() == 0
    assert not root.exists()


# --------------------------------------------------------------------------- refusals

class Listener:
    """A TCP listener on loopback that counts connections (none may arrive)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def connections(self):
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, BlockingIOError):
                return count
            conn.close()
            count += 1


BAD_REQUIREMENTS = [
    "x @ http://127.0.0.1:{port}/x-1.0-py3-none-any.whl",
    "-e git+http://127.0.0.1:{port}/r",
    "--index-url=http://127.0.0.1:{port}/",
    "--extra-index-url http://127.0.0.1:{port}/",
    "../x",
    "/etc/passwd",
    "git+https://127.0.0.1:{port}/x.git",
    "numpy; os_name=='posix'",
    "numpy==1.0 --hash=sha256:00",
    "numpy[--index-url=http://127.0.0.1:{port}/]",
    "numpy===anything",
    "",
    "http://127.0.0.1:{port}/x.whl",
]
BAD_DEPENDENCIES = [
    ("lodash", "file:../x"), ("a", "github:u/r"), ("a", "git+http://127.0.0.1:{port}/r.git"),
    ("a", "http://127.0.0.1:{port}/a.tgz"), ("a", "npm:lodash@4"), ("../a", "1.0.0"), ("A B", "1"),
    ("a", "workspace:*"), ("a", "--registry=http://127.0.0.1:{port}/"), ("a", "u/r"),
]


@pytest.mark.parametrize("entry", BAD_REQUIREMENTS)
def test_requirement_grammar_refuses_urls_paths_and_options(lserver, uid, entry):
    listener = Listener()
    entry = entry.format(port=listener.port)
    for route, body in (("/upload", {"path": f"{uid}/bad"}), ("/run-now", {})):
        r = lserver.post(route, {**body, "language": "python", "code": "return 1", "requirements": [entry]})
        error = assert_error(r, 400)
        assert repr(entry) in error["error"], error
    assert listener.connections() == 0
    assert lserver.get(f"/functions/{uid}/bad").status == 404


@pytest.mark.parametrize("name,spec", BAD_DEPENDENCIES)
def test_dependency_grammar_refuses_urls_paths_and_aliases(lserver, uid, name, spec):
    listener = Listener()
    spec = spec.format(port=listener.port)
    r = upload(lserver, f"{uid}/bad", "javascript", "return 1", dependencies={name: spec})
    error = assert_error(r, 400)
    assert repr(name) in error["error"], error
    assert listener.connections() == 0


def test_wrong_field_too_many_and_wrong_types(lserver, uid):
    error = assert_error(upload(lserver, f"{uid}/w", "python", "return 1", dependencies={"lodash": "4"}), 400)
    assert "dependencies" in error["error"] and "requirements" in error["error"], error
    for language in ("javascript", "typescript"):
        error = assert_error(upload(lserver, f"{uid}/w", language, "return 1", requirements=["x"]), 400)
        assert "requirements" in error["error"] and "dependencies" in error["error"], error
    many = [f"p{i}==1.0" for i in range(51)]
    error = assert_error(upload(lserver, f"{uid}/w", "python", "return 1", requirements=many), 400)
    assert "51" in error["error"] and "p50==1.0" in error["error"], error
    assert_error(upload(lserver, f"{uid}/w", "python", "return 1", requirements="numpy"), 400)
    assert_error(upload(lserver, f"{uid}/w", "python", "return 1", requirements=[1]), 400)
    assert_error(upload(lserver, f"{uid}/w", "javascript", "return 1", dependencies=["lodash"]), 400)
    assert_error(upload(lserver, f"{uid}/w", "javascript", "return 1", dependencies={"a": 1}), 400)
    error = assert_error(upload(lserver, f"{uid}/w", "python", "return 1", requirements=["a", "A"]), 400)
    assert "twice" in error["error"]
    assert lserver.get(f"/functions/{uid}/w").status == 404


def test_sdist_only_package_is_refused_and_never_runs(lserver, space, uid):
    marker = space / "sdist-setup-ran"
    make_sdist(space / "wheels", "faassource", "1.0", marker)
    error = assert_error(upload(lserver, f"{uid}/s", "python", "return 1", requirements=["faassource==1.0"]), 400)
    assert "no binary wheel" in error["error"] and "faassource" in error["error"], error
    assert not marker.exists()
    assert staging_left(lserver) == []
    assert assert_ok(lserver.run_now("python", "return 5"))["data"] == 5


def test_unknown_package_is_a_400(lserver, uid):
    error = assert_error(upload(lserver, f"{uid}/u", "python", "return 1", requirements=["faasnothere"]), 400)
    assert "faasnothere" in error["error"], error


# --------------------------------------------------------------------------- JavaScript

def test_npm_dependencies_require_and_import(lserver, space, uid):
    code = ("const { twice } = require('faas-cjs');\n"
            "const { thrice } = await import('faas-esm');\n"
            "return [twice(2), thrice(2), require('faas-deep'), require('faas-scripted')];")
    body = assert_ok(upload(lserver, f"{uid}/js", "javascript", code,
                            dependencies={"faas-cjs": "^1.0.0", "faas-esm": "1.0.0", "faas-deep": "1.x",
                                          "faas-scripted": "*"}))
    deps = body["dependencies"]
    assert deps["packages"] == ["faas-cjs@1.0.0", "faas-deep@1.0.0", "faas-esm@1.0.0", "faas-scripted@1.0.0"]
    assert assert_ok(lserver.run(f"{uid}/js"))["data"] == [4, 6, 42, "installed"]
    assert not (space / "npm-postinstall-ran").exists() and not (space / "npm-install-ran").exists()
    lock = json.loads(assert_ok(lserver.get(f"/functions/{uid}/js?version={body['version']}"))
                      ["dependencies"]["lock"])
    assert all(entry["integrity"].startswith("sha512-") for where, entry in lock["packages"].items() if where)

    ts = "const { twice } = await import('faas-cjs');\nconst n: number = twice(5);\nreturn n;"
    again = assert_ok(upload(lserver, f"{uid}/ts", "typescript", ts, dependencies={"faas-cjs": "1.0.0"}))
    assert assert_ok(lserver.run(f"{uid}/ts"))["data"] == 10
    same = assert_ok(upload(lserver, f"{uid}/ts2", "typescript", ts, dependencies={"faas-cjs": "1.0.0"}))
    assert same["dependencies"]["key"] == again["dependencies"]["key"] and same["dependencies"]["cached"]


def test_unknown_npm_package_is_a_400(lserver, uid):
    error = assert_error(upload(lserver, f"{uid}/n", "javascript", "return 1",
                                dependencies={"faas-not-published": "1.0.0"}), 400)
    assert "npm" in error["error"]
    assert staging_left(lserver) == []


# --------------------------------------------------------------------------- limits

def test_build_over_the_time_limit_leaves_nothing(faas, space, registry, uid):
    s = faas.start(store="sqlite", env=deps_env(space, "slow", registry, FAAS_DEPS_TIMEOUT="6",
                                                 FAAS_POOL_SIZE="0"))
    try:
        error = assert_error(upload(s, f"{uid}/slow", "javascript", "return 1",
                                    dependencies={"faas-slow": "1.0.0"}), 504)
        assert "FAAS_DEPS_TIMEOUT" in error["error"], error
        assert staging_left(s) == [] and os.listdir(Path(s.env["FAAS_DATA_DIR"]) / "deps" / "layers") == []
        assert assert_ok(s.run_now("javascript", "return 3"))["data"] == 3
        metrics = s.get("/metrics").body
        assert 'faas_deps_builds_total{result="failed"} 1' in metrics, metrics
    finally:
        s.stop()


def test_layers_over_the_size_limit_leave_nothing(faas, space, wheels, registry, uid):
    s = faas.start(store="sqlite", env=deps_env(space, "small", registry, FAAS_DEPS_MAX_SIZE="1M",
                                                 FAAS_POOL_SIZE="0"))
    try:
        error = assert_error(upload(s, f"{uid}/big", "python", "return 1", requirements=["faasbig"]), 400)
        assert "too large" in error["error"] and "FAAS_DEPS_MAX_SIZE" in error["error"], error
        error = assert_error(upload(s, f"{uid}/big", "javascript", "return 1",
                                    dependencies={"faas-huge": "1.0.0"}), 400)
        assert "too large" in error["error"], error
        assert staging_left(s) == [] and os.listdir(Path(s.env["FAAS_DATA_DIR"]) / "deps" / "layers") == []
        assert s.get(f"/functions/{uid}/big").status == 404
        assert assert_ok(s.run_now("python", "return 3"))["data"] == 3
    finally:
        s.stop()


def test_package_count_limit_and_allowlist_and_off_switch(faas, space, wheels, uid):
    s = faas.start(store="sqlite", env=deps_env(space, "ctl", FAAS_DEPS_MAX_PACKAGES="1",
                                                 FAAS_DEPS_ALLOW="faasdemo|faasdep|faasshared", FAAS_POOL_SIZE="0"))
    try:
        error = assert_error(upload(s, f"{uid}/c", "python", "return 1", requirements=["faasdemo==1.0"]), 400)
        assert "FAAS_DEPS_MAX_PACKAGES" in error["error"], error
        error = assert_error(upload(s, f"{uid}/c", "python", "return 1", requirements=["faasgc"]), 400)
        assert "'faasgc'" in error["error"] and "FAAS_DEPS_ALLOW" in error["error"], error
        assert assert_ok(upload(s, f"{uid}/c", "python", "import faasshared\nreturn faasshared.NAME",
                                requirements=["faasshared"]))
    finally:
        s.stop()
    off = faas.start(store="sqlite", env=deps_env(space, "off", FAAS_DEPS="off", FAAS_POOL_SIZE="0"))
    try:
        error = assert_error(upload(off, f"{uid}/c", "python", "return 1", requirements=["faasdep"]), 400)
        assert "disabled" in error["error"], error
        assert assert_ok(upload(off, f"{uid}/c", "python", "return 1"))
    finally:
        off.stop()


def test_index_credentials_never_reach_answers_logs_or_sandboxes(faas, space, uid):
    s = faas.start(store="sqlite", env={**deps_env(space, "cred"), "FAAS_DEPS_NO_INDEX": "0",
                                        "FAAS_DEPS_FIND_LINKS": None, "FAAS_POOL_SIZE": "0",
                                        "FAAS_DEPS_INDEX_URL": "http://faasuser:s3cr3t-pw@127.0.0.1:9/simple/"})
    try:
        r = upload(s, f"{uid}/cred", "python", "return 1", requirements=["faasdemo==1.0"])
        assert r.status == 400, r.body
        assert "s3cr3t" not in r.raw.decode()
        leak = s.run_now("python", "import os\nreturn open('/proc/1/environ').read() + str(dict(os.environ))")
        assert "s3cr3t" not in assert_ok(leak)["data"]
        assert "s3cr3t" not in s.stderr_text()
    finally:
        s.stop()


# --------------------------------------------------------------------------- lifecycle

def test_layer_missing_at_call_time_is_rebuilt_from_the_lock(lserver, uid):
    body = assert_ok(upload(lserver, f"{uid}/m", "python", "import faasmiss\nreturn faasmiss.X",
                            requirements=["faasmiss==1.0"]))
    key = body["dependencies"]["key"]
    shutil.rmtree(layer_dir(lserver, key))
    answer = assert_ok(lserver.post(f"/run/{uid}/m", {}, timeout=120))
    assert answer["data"] == "rebuilt" and answer["deps_build_ms"] > 0, answer
    assert f"building layer {key} from lock" in lserver.stderr_text()
    assert "deps_build_ms" not in assert_ok(lserver.run(f"{uid}/m"))


def test_an_asynchronous_call_of_a_library_function_gets_its_layer_rebuilt_if_missing(lserver, uid):
    """A queued call settles the same needs as a sync one: the layer is built from the lock
    on the server that runs it, and the record says how long that took."""
    body = assert_ok(upload(lserver, f"{uid}/am", "python", "import faasdemo\nreturn faasdemo.answer()",
                            requirements=["faasdemo==1.0"]))
    shutil.rmtree(layer_dir(lserver, body["dependencies"]["key"]))
    r = lserver.post(f"/run/{uid}/am?async=1", {})
    assert r.status == 202, (r.status, r.body)
    done = assert_ok(lserver.get(f"/calls/{r.body['id']}?wait=60", timeout=90))
    assert done["status"] == "ok" and done["data"] == 42 and done["deps_build_ms"] > 0, done


def test_gc_removes_unreferenced_layers_but_not_one_in_use(lserver, uid):
    body = assert_ok(upload(lserver, f"{uid}/gc", "python", "import faasgc, time\ntime.sleep(3)\nreturn faasgc.X",
                            requirements=["faasgc==1.0"]))
    key = body["dependencies"]["key"]
    keep = assert_ok(upload(lserver, f"{uid}/keep", "python", "import faasdep\nreturn faasdep.VALUE",
                            requirements=["faasdep==1.0"]))["dependencies"]["key"]
    listed = faas_cli(lserver, "deps", "ls")
    assert listed.returncode == 0 and key[:16] in listed.stdout, listed

    result = {}
    call = threading.Thread(target=lambda: result.update(r=lserver.post(f"/run/{uid}/gc", {}, timeout=60)))
    call.start()
    time.sleep(1.0)
    assert assert_ok(lserver.request("DELETE", f"/functions/{uid}/gc"))["deleted"] == 1
    during = faas_cli(lserver, "deps", "gc", FAAS_DEPS_GRACE=0)
    assert during.returncode == 0, during.stderr
    assert layer_dir(lserver, key).is_dir(), during.stdout   # in use by the running call
    call.join()
    assert assert_ok(result["r"])["data"] == 1

    held = faas_cli(lserver, "deps", "gc")   # default grace: recently used layers stay
    assert layer_dir(lserver, key).is_dir(), held.stdout
    dry = faas_cli(lserver, "deps", "gc", "--dry-run", FAAS_DEPS_GRACE=0)
    assert f"would remove {key}" in dry.stdout and layer_dir(lserver, key).is_dir()
    after = faas_cli(lserver, "deps", "gc", FAAS_DEPS_GRACE=0)
    assert f"removed {key}" in after.stdout, after.stdout
    assert not layer_dir(lserver, key).exists()
    assert layer_dir(lserver, keep).is_dir()   # still referenced by a stored version
    assert staging_left(lserver) == []
    assert assert_ok(lserver.run(f"{uid}/keep"))["data"] == 41


def test_server_collects_layers_after_deletes(faas, space, wheels, uid):
    s = faas.start(store="sqlite", env=deps_env(space, "gc", FAAS_DEPS_GRACE="0", FAAS_POOL_SIZE="0"))
    try:
        body = assert_ok(upload(s, f"{uid}/g", "python", "import faaswarm\nreturn 1", requirements=["faaswarm"]))
        key = body["dependencies"]["key"]
        assert assert_ok(s.run(f"{uid}/g"))["data"] == 1
        assert wait_until(lambda: warm_state(s, key), timeout=20)
        assert_ok(upload(s, f"{uid}/g", "python", "return 2"))   # the old version still references it
        assert layer_dir(s, key).is_dir()
        assert assert_ok(s.request("DELETE", f"/functions/{uid}/g"))["deleted"] == 2
        assert wait_until(lambda: f"removed 1 layers (unreferenced, or over FAAS_DEPS_MAX_TOTAL): {key}" in s.stderr_text(), timeout=20)
        assert not layer_dir(s, key).exists()
        assert warm_state(s, key) is None and staging_left(s) == []
    finally:
        s.stop()


def test_a_lock_for_another_platform_is_a_503(lserver, uid):
    """A node whose interpreter differs from the lock's platform cannot build it."""
    import sqlite3
    body = assert_ok(upload(lserver, f"{uid}/tag", "python", "import faasdep\nreturn 1",
                            requirements=["faasdep==1.0"]))
    db = sqlite3.connect(Path(lserver.env["FAAS_DATA_DIR"]) / "faas.sqlite3")
    deps = json.loads(db.execute("SELECT deps FROM versions WHERE path=?", (f"{uid}/tag",)).fetchone()[0])
    deps.update(tag="cp399-linux-riscv64-glibc9.99", key="0" * 64)
    with db:
        db.execute("UPDATE versions SET deps=? WHERE path=?", (json.dumps(deps), f"{uid}/tag"))
    db.close()
    error = assert_error(lserver.run(f"{uid}/tag", version=body["version"]), 503)
    assert "cp399-linux-riscv64" in error["error"] and "upload it again" in error["error"], error
    assert_ok(lserver.request("DELETE", f"/functions/{uid}/tag"))   # not for prefetch to find


def test_prefetch_builds_referenced_layers(lserver, uid):
    body = assert_ok(upload(lserver, f"{uid}/pre", "python", "import faasdemo\nreturn faasdemo.answer()",
                            requirements=["faasdemo==2.0"]))
    key = body["dependencies"]["key"]
    shutil.rmtree(layer_dir(lserver, key))
    done = faas_cli(lserver, "deps", "prefetch")
    assert done.returncode == 0 and f"built   {key}" in done.stdout, (done.stdout, done.stderr)
    assert layer_dir(lserver, key).is_dir()
    answer = assert_ok(lserver.run(f"{uid}/pre"))
    assert answer["data"] == 2 and "deps_build_ms" not in answer


def test_metrics_and_check_report_layers(lserver):
    metrics = lserver.get("/metrics").body
    assert 'faas_deps_builds_total{result="ok"}' in metrics
    assert "faas_deps_build_seconds_count" in metrics
    layers = int(float(next(line.split()[1] for line in metrics.splitlines()
                            if line.startswith("faas_deps_layers "))))
    assert layers >= 2
    assert any(line.startswith("faas_deps_bytes ") and float(line.split()[1]) > 0 for line in metrics.splitlines())
    check = faas_cli(lserver, "check")
    assert "pip" in check.stdout and "npm" in check.stdout and "layer store" in check.stdout, check.stdout


def test_two_servers_on_one_redis_build_where_first_called(faas, space, wheels, registry, uid):
    shared = faas.redis_env()
    a = faas.start(store=None, env={**deps_env(space, "redis-a", registry), **shared})
    b = faas.start(store=None, env={**deps_env(space, "redis-b", registry), **shared})
    try:
        body = assert_ok(upload(a, f"{uid}/r", "python",
                                "import faasredis, importlib.metadata as m\nreturn [faasredis.X, m.version('faasredis')]",
                                requirements=["faasredis"]))
        key = body["dependencies"]["key"]
        assert layer_dir(a, key).is_dir() and not layer_dir(b, key).exists()
        shown = assert_ok(b.get(f"/functions/{uid}/r?version={body['version']}"))["dependencies"]
        assert shown["lock"].startswith("faasredis==1.0 --hash=sha256:"), shown
        answer = assert_ok(b.post(f"/run/{uid}/r", {}, timeout=120))
        assert answer["data"] == ["from-lock", "1.0"] and answer["deps_build_ms"] > 0, answer
        assert f"building layer {key} from lock" in b.stderr_text()
        assert layer_dir(b, key).is_dir()
        assert_ok(upload(b, f"{uid}/rj", "javascript", "return require('faas-cjs').twice(8)",
                         dependencies={"faas-cjs": "1.0.0"}))
        assert assert_ok(a.post(f"/run/{uid}/rj", {}, timeout=120))["data"] == 16
        listed = faas_cli(a, "deps", "ls")   # the Redis store's references, this node's layers
        row = next(line for line in listed.stdout.splitlines() if line.startswith(key[:16]))
        assert row.split()[-2:] == ["1", "faasredis==1.0"], listed.stdout
    finally:
        a.stop()
        b.stop()


# --------------------------------------------------------------------------- real registries

def test_real_numpy_and_lodash(faas, space, uid):
    """The index and the registry on the internet (reachable on this machine and in CI)."""
    s = faas.start(store="sqlite", env={"FAAS_DATA_DIR": str(space / "data-real"), "FAAS_POOL_SIZE": "1"})
    try:
        code = ("import numpy\nstatus = open('/proc/self/status').read()\n"
                "threads = [l for l in status.splitlines() if l.startswith('Threads:')][0].split()[1]\n"
                "return [float(numpy.arange(4).sum()), threads]")
        body = assert_ok(upload(s, f"{uid}/np", "python", code, requirements=["numpy==2.4.6"]))
        assert body["dependencies"]["packages"] == ["numpy==2.4.6"], body
        assert assert_ok(s.run(f"{uid}/np", memory="64M"))["data"] == [6.0, "1"]
        again = assert_ok(upload(s, f"{uid}/np2", "python", code, requirements=["NumPy == 2.4.6"]))
        assert again["dependencies"]["key"] == body["dependencies"]["key"] and again["dependencies"]["cached"]

        js = assert_ok(upload(s, f"{uid}/lo", "javascript",
                              "const _ = require('lodash');\nreturn _.chunk([1, 2, 3, 4], 2);",
                              dependencies={"lodash": "4.17.21"}))
        assert js["dependencies"]["packages"] == ["lodash@4.17.21"]
        assert assert_ok(s.run(f"{uid}/lo"))["data"] == [[1, 2], [3, 4]]
    finally:
        s.stop()


# --------------------------------------------------------------------------- pure functions

def test_requirements_normalize_to_one_spelling():
    import faas
    assert faas.normalize_requirement(" NumPy == 2.4.6 ") == ("numpy", "numpy==2.4.6")
    assert faas.normalize_requirement("Python_Dateutil>=2.8, <5") == ("python-dateutil", "python-dateutil<5,>=2.8")
    assert faas.normalize_requirement("Requests[SOCKS,security]~=2.0") == \
        ("requests", "requests[security,socks]~=2.0")


def report_item(name, version, digest="sha256=" + "a" * 64, url="https://files.example/x-1-py3-none-any.whl"):
    return {"metadata": {"name": name, "version": version},
            "download_info": {"url": url, "archive_info": {"hash": digest}}}


def test_lock_from_a_report_refuses_what_could_smuggle_options():
    import faas
    lock, pins = faas.pip_lock({"install": [report_item("B_pkg", "2.0"), report_item("a", "1.0")]})
    assert lock == f"a==1.0 --hash=sha256:{'a' * 64}\nb-pkg==2.0 --hash=sha256:{'a' * 64}\n"
    assert pins == ["a==1.0", "b-pkg==2.0"]
    for item in (report_item("a", "1.0 --index-url http://127.0.0.1:1/"), report_item("a", "1.0\n-e x"),
                 report_item("a b", "1.0"), report_item("a", "1.0", digest="md5=00"),
                 report_item("a", "1.0", url="https://files.example/a-1.0.tar.gz"), {"metadata": {}}):
        with pytest.raises(faas.ApiError) as raised:
            faas.pip_lock({"install": [item]})
        assert raised.value.status == 400


def test_an_unwritable_layer_store_leaves_the_server_serving(faas, space, wheels, uid):
    blocker = space / "not-a-directory"
    blocker.write_text("a file where the layer store should be")
    s = faas.start(store="sqlite", env=deps_env(space, "nostore", FAAS_DEPS_DIR=blocker / "deps",
                                                 FAAS_POOL_SIZE="0"))
    try:
        assert assert_ok(s.run_now("python", "return 7"))["data"] == 7
        error = assert_error(upload(s, f"{uid}/x", "python", "return 1", requirements=["faasdep"]), 503)
        assert "unavailable" in error["error"], error
        assert "libraries disabled: cannot create the layer store" in s.stderr_text()
    finally:
        s.stop()


def test_above_the_total_limit_idle_layers_are_evicted_and_rebuilt_on_use(faas, space, wheels, uid):
    s = faas.start(store="sqlite", env=deps_env(space, "total", FAAS_DEPS_MAX_TOTAL="1000", FAAS_DEPS_GRACE="1",
                                                 FAAS_POOL_SIZE="0", FAAS_DEPS_WARM="0"))
    try:
        first = assert_ok(upload(s, f"{uid}/one", "python", "import faasgc\nreturn faasgc.X",
                                 requirements=["faasgc"]))["dependencies"]
        time.sleep(1.5)   # idle longer than the grace period (1 s), which protects the new one
        second = assert_ok(upload(s, f"{uid}/two", "python", "import faasshared\nreturn faasshared.NAME",
                                  requirements=["faasshared"]))["dependencies"]
        assert first["size"] < 1000 < first["size"] + second["size"], (first, second)
        # The second build pushed the store over the limit: the least recently used goes.
        assert wait_until(lambda: not layer_dir(s, first["key"]).exists(), timeout=20)
        assert layer_dir(s, second["key"]).is_dir()
        answer = assert_ok(s.post(f"/run/{uid}/one", {}, timeout=120))
        assert answer["data"] == 1 and answer["deps_build_ms"] > 0, answer
        assert staging_left(s) == []
    finally:
        s.stop()


def test_a_second_server_on_the_same_data_dir_keeps_the_first_ones_store(faas, space):
    first = faas.start(store="sqlite", env=deps_env(space, "shared-dir", FAAS_POOL_SIZE="0"))
    building = Path(first.env["FAAS_DATA_DIR"]) / "deps" / "tmp" / "build-in-progress"
    try:
        building.mkdir()   # as if the first server were building a layer now
        second = faas.start(store="sqlite", env={**first.env, "HTTP_PORT": str(first.port)}, wait=False,
                            set_port=False)
        assert second.proc.wait(30) == 1   # its port is taken: it stops at once
        assert "Address already in use" in second.stderr_text()
        assert (Path(first.env["FAAS_DATA_DIR"]) / "deps" / "layers").is_dir()
        assert building.is_dir()
        assert assert_ok(first.run_now("python", "return 9"))["data"] == 9
    finally:
        building.rmdir()
        first.stop()
