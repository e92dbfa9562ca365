"""`faas.py deploy`, `call`, `ls` and `logs`: the shell user's client, run as a program against a
real server with an admin token. Each test deploys under its own --prefix."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import faas
from tests.helpers import assert_ok

REPO = Path(__file__).resolve().parent.parent
TOKEN = "cli-test-token-77aa"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cli_server(faas):
    server = faas.start(store="sqlite", env={"FAAS_TOKEN": TOKEN})
    yield server
    server.stop()
    assert "Traceback" not in server.stderr_text()


def faas_cli(server, *args, token=TOKEN, stdin=None, url=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
    env.update(FAAS_URL=url or server.url)
    if token:
        env["FAAS_TOKEN"] = token
    return subprocess.run([sys.executable, str(REPO / "faas.py"), *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def lines(done):
    """stdout as {path: action}."""
    return {line.split()[1]: line.split()[0] for line in done.stdout.splitlines()}


def described(server, path):
    return assert_ok(server.get(f"/functions/{path}", headers=AUTH))


def uploads(server):
    text = server.get("/metrics", headers=AUTH).body
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("faas_uploads_total{"))


def write(root, relative, text):
    file = root / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return file


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "fns"
    write(root, "math/add.py", 'return event.get("a", 0) + event.get("b", 0)\n')
    write(root, "hello.js", 'console.log("hello printed");\nreturn "hi " + (event.name || "you");\n')
    write(root, "typed/greet.ts", "const name: string = event.name ?? 'ts';\nreturn `hello ${name}`;\n")
    write(root, "node_modules/skipped.js", "return 1")
    write(root, ".hidden/skipped.py", "return 1")
    write(root, "notes.txt", "not a function")
    return root


def test_deploy_twice_then_one_change_then_prune(cli_server, project, uid):
    first = faas_cli(cli_server, "deploy", str(project), "--prefix", uid)
    assert first.returncode == 0, first.stderr
    paths = {f"{uid}/math/add", f"{uid}/hello", f"{uid}/typed/greet"}
    assert lines(first) == {path: "created" for path in paths}, first.stdout
    versions = {path: described(cli_server, path)["latest"] for path in paths}
    assert described(cli_server, f"{uid}/typed/greet")["language"] == "typescript"

    before = uploads(cli_server)
    second = faas_cli(cli_server, "deploy", str(project), "--prefix", uid)
    assert second.returncode == 0, second.stderr
    assert lines(second) == {path: "unchanged" for path in paths}, second.stdout
    assert uploads(cli_server) == before, "an unchanged deploy uploads nothing"
    assert {path: described(cli_server, path)["latest"] for path in paths} == versions

    write(project, "math/add.py", 'return event.get("a", 0) + event.get("b", 0) + 100\n')
    third = faas_cli(cli_server, "deploy", str(project), "--prefix", uid)
    assert third.returncode == 0, third.stderr
    assert lines(third) == {f"{uid}/math/add": "updated", f"{uid}/hello": "unchanged",
                            f"{uid}/typed/greet": "unchanged"}, third.stdout
    assert uploads(cli_server) == before + 1
    assert len(described(cli_server, f"{uid}/math/add")["versions"]) == 2

    outside = f"{uid}-other/keep"
    assert_ok(cli_server.post("/upload", {"path": outside, "language": "python", "code": "return 1"}, headers=AUTH))
    (project / "hello.js").unlink()
    plan = faas_cli(cli_server, "deploy", str(project), "--prefix", uid, "--prune", "--dry-run")
    assert plan.returncode == 0 and lines(plan)[f"{uid}/hello"] == "delete", plan.stdout
    assert cli_server.get(f"/functions/{uid}/hello", headers=AUTH).status == 200, "a dry run changes nothing"
    pruned = faas_cli(cli_server, "deploy", str(project), "--prefix", uid, "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert lines(pruned)[f"{uid}/hello"] == "deleted"
    assert cli_server.get(f"/functions/{uid}/hello", headers=AUTH).status == 404
    assert cli_server.get(f"/functions/{outside}", headers=AUTH).status == 200, "--prune stays inside --prefix"


def test_dry_run_prints_the_plan_and_uploads_nothing(cli_server, project, uid):
    before = uploads(cli_server)
    plan = faas_cli(cli_server, "deploy", str(project), "--prefix", uid, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert set(lines(plan).values()) == {"create"}
    assert uploads(cli_server) == before
    assert cli_server.get(f"/functions/{uid}/hello", headers=AUTH).status == 404


def test_syntax_error_is_file_line_and_exit_1(cli_server, project, uid):
    bad = write(project, "broken/parse.py", "x = 1\nif x:\n    y = (1,\nreturn y\n")
    write(project, "broken/bad.ts", "const a: number = 1;\nconst b = ;\n")
    done = faas_cli(cli_server, "deploy", str(project), "--prefix", uid)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert lines(done)[f"{uid}/broken/parse"] == "failed"
    assert lines(done)[f"{uid}/broken/bad"] == "failed"
    assert f"{bad}:3: " in done.stderr, done.stderr
    assert f"{project / 'broken/bad.ts'}:2: " in done.stderr, done.stderr
    assert lines(done)[f"{uid}/math/add"] == "created", "the other functions still deploy"
    assert cli_server.get(f"/functions/{uid}/broken/parse", headers=AUTH).status == 404


def test_settings_from_faas_json_and_front_matter(cli_server, tmp_path, uid):
    root = tmp_path / "fns"
    write(root, "limited.py", "# faas: {\"timeout\": 5}\nreturn 'small'\n")
    write(root, "faas.json", json.dumps({"limited.py": {"memory": "64M", "timeout": 9}}))
    done = faas_cli(cli_server, "deploy", str(root), "--prefix", uid)
    assert done.returncode == 0, done.stderr
    latest = described(cli_server, f"{uid}/limited")["versions"][-1]
    assert latest["limits"] == {"timeout": 5, "memory": "64M"}, "front matter wins over faas.json"
    call = faas_cli(cli_server, "call", f"{uid}/limited")
    assert (call.returncode, call.stdout) == (0, "small\n"), call.stderr
    again = faas_cli(cli_server, "deploy", str(root), "--prefix", uid)
    assert lines(again) == {f"{uid}/limited": "unchanged"}
    write(root, "faas.json", json.dumps({"limited.py": {"memory": "48M"}}))
    changed = faas_cli(cli_server, "deploy", str(root), "--prefix", uid)
    assert lines(changed) == {f"{uid}/limited": "updated"}, "a settings change alone is an update"
    assert described(cli_server, f"{uid}/limited")["versions"][-1]["limits"] == {"timeout": 5, "memory": "48M"}
    forced = faas_cli(cli_server, "deploy", str(root), "--prefix", uid, "--force")
    assert lines(forced) == {f"{uid}/limited": "updated"}, "--force uploads an unchanged function"
    assert len(described(cli_server, f"{uid}/limited")["versions"]) == 3


def test_bad_settings_and_clashing_files_exit_2(cli_server, tmp_path, uid):
    root = tmp_path / "clash"
    write(root, "same.py", "return 1")
    write(root, "same.js", "return 1")
    done = faas_cli(cli_server, "deploy", str(root), "--prefix", uid)
    assert done.returncode == 2 and "same" in done.stderr, done.stderr
    root = tmp_path / "badjson"
    write(root, "f.py", "return 1")
    write(root, "faas.json", "{nope")
    done = faas_cli(cli_server, "deploy", str(root), "--prefix", uid)
    assert done.returncode == 2 and "faas.json" in done.stderr, done.stderr
    assert cli_server.get(f"/functions/{uid}/f", headers=AUTH).status == 404


def test_call_ls_and_exit_codes(cli_server, tmp_path, uid):
    root = tmp_path / "fns"
    write(root, "echo.py", 'print("printed line")\nreturn {"got": event}\n')
    write(root, "text.py", 'return "plain text"\n')
    write(root, "fail.py", 'x = 1\nraise ValueError("bad input " + str(event.get("n")))\n')
    assert faas_cli(cli_server, "deploy", str(root), "--prefix", uid).returncode == 0

    done = faas_cli(cli_server, "call", f"{uid}/echo", '{"a": 1}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"got": {"a": 1}}
    assert done.stderr == "printed line\n"
    assert faas_cli(cli_server, "call", f"{uid}/text").stdout == "plain text\n"
    piped = faas_cli(cli_server, "call", f"{uid}/echo", "-", stdin='[1, 2]')
    assert json.loads(piped.stdout) == {"got": [1, 2]}

    failed = faas_cli(cli_server, "call", f"{uid}/fail", '{"n": 7}')
    assert failed.returncode == 1 and failed.stdout == ""
    assert "bad input 7" in failed.stderr and "line 2" in failed.stderr, failed.stderr
    streamed_failure = faas_cli(cli_server, "call", f"{uid}/fail", '{"n": 8}', "--stream")
    assert streamed_failure.returncode == 1 and "bad input 8" in streamed_failure.stderr

    versions = described(cli_server, f"{uid}/text")["versions"]
    write(root, "text.py", 'return "second"\n')
    assert faas_cli(cli_server, "deploy", str(root), "--prefix", uid).returncode == 0
    old = faas_cli(cli_server, "call", f"{uid}/text", "--version", str(versions[0]["version"]))
    assert old.stdout == "plain text\n"
    assert faas_cli(cli_server, "call", f"{uid}/text").stdout == "second\n"

    missing = faas_cli(cli_server, "call", f"{uid}/nothing")
    assert missing.returncode == 1 and "no function" in missing.stderr
    assert faas_cli(cli_server, "call", f"{uid}/echo", "{not json").returncode == 2
    refused = faas_cli(cli_server, "call", f"{uid}/echo", token="wrong")
    assert refused.returncode == 1 and "Bearer" in refused.stderr
    unreachable = faas_cli(cli_server, "ls", url="http://127.0.0.1:1")
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr

    listing = faas_cli(cli_server, "ls")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows[f"{uid}/text"][1:4] == ["python", str(described(cli_server, f"{uid}/text")["latest"]), "2"]


def test_call_stream_prints_lines_as_they_come(cli_server, tmp_path, uid):
    root = tmp_path / "fns"
    write(root, "slow.py", 'import time\nprint("first", flush=True)\ntime.sleep(3)\nprint("second")\nreturn 42\n')
    assert faas_cli(cli_server, "deploy", str(root), "--prefix", uid).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
    env.update(FAAS_URL=cli_server.url, FAAS_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, str(REPO / "faas.py"), "call", f"{uid}/slow", "--stream"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "first\n"
        assert proc.poll() is None, "the first line arrived while the function still ran"
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (0, "42\n", "second\n")


def submit(server, path, body=None):
    """An asynchronous call (POST /run/<path>?async=1): its id."""
    r = server.post(f"/run/{path}?async=1", body or {}, headers=AUTH)
    assert r.status == 202, (r.status, r.body)
    return r.body["id"]


def test_logs_of_finished_calls(cli_server, tmp_path, uid):
    root = tmp_path / "fns"
    write(root, "echo.py", 'import sys\nprint("printed line")\nprint("to stderr", file=sys.stderr)\n'
                           'return {"got": event}\n')
    write(root, "fail.py", 'print("before")\nraise ValueError("async bad " + str(event.get("n")))\n')
    assert faas_cli(cli_server, "deploy", str(root), "--prefix", uid).returncode == 0
    ok_id = submit(cli_server, f"{uid}/echo", {"input": {"a": 1}})
    fail_id = submit(cli_server, f"{uid}/fail", {"input": {"n": 3}})
    for call_id in (ok_id, fail_id):
        assert_ok(cli_server.get(f"/calls/{call_id}?wait=30", headers=AUTH))

    done = faas_cli(cli_server, "logs", ok_id)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"got": {"a": 1}}
    assert done.stderr == "printed line\nto stderr\n"
    again = faas_cli(cli_server, "logs", ok_id)
    assert (again.returncode, again.stdout, again.stderr) == (0, done.stdout, done.stderr), "a replay is the same"

    failed = faas_cli(cli_server, "logs", fail_id)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("before\nfaas: error: "), failed.stderr
    assert "async bad 3" in failed.stderr and "line 2" in failed.stderr, failed.stderr


def test_logs_follows_a_running_call_to_its_end(cli_server, tmp_path, uid):
    root = tmp_path / "fns"
    write(root, "slow.py", 'import time\nprint("first", flush=True)\ntime.sleep(3)\nprint("second")\nreturn 42\n')
    assert faas_cli(cli_server, "deploy", str(root), "--prefix", uid).returncode == 0
    call_id = submit(cli_server, f"{uid}/slow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
    env.update(FAAS_URL=cli_server.url, FAAS_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, str(REPO / "faas.py"), "logs", call_id], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "first\n"
        assert proc.poll() is None, "the first line arrived while the call still ran"
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (0, "42\n", "second\n")
    assert assert_ok(cli_server.get(f"/calls/{call_id}", headers=AUTH))["status"] == "ok"


def test_logs_of_an_unknown_call_is_an_error(cli_server):
    for call_id in ("0123456789abcdef0123456789abcdef", "not-an-id"):
        done = faas_cli(cli_server, "logs", call_id)
        assert done.returncode == 1 and done.stdout == "", (done.returncode, done.stdout)
        assert f"no call {call_id}" in done.stderr and "Traceback" not in done.stderr, done.stderr
    refused = faas_cli(cli_server, "logs", "0123456789abcdef0123456789abcdef", token="wrong")
    assert refused.returncode == 1 and "Bearer" in refused.stderr, refused.stderr
    assert cli_server.get("/healthz").status == 200


def test_settings_differ_compares_what_the_server_reports():
    latest = {"limits": {"timeout": 5}, "network": "internet", "dependencies": {"requested": ["a==1"], "key": "k"}}
    assert not faas.settings_differ({"timeout": 5, "network": "internet"}, latest)
    assert faas.settings_differ({"timeout": 6}, latest)
    assert faas.settings_differ({"memory": "64M"}, latest), "a limit the version does not have"
    assert faas.settings_differ({"network": "none"}, latest)
    assert not faas.settings_differ({"dependencies": ["a==1"]}, latest)
    assert faas.settings_differ({"dependencies": ["a==2"]}, latest)
    assert not faas.settings_differ({"libraries": ["x"]}, latest), "not reported: cannot tell (--force)"
    assert not faas.settings_differ({"network": True}, latest), "reported in another shape: cannot tell"


def test_functions_list_reports_the_latest_code_sha256(server, uid):
    """On both stores: what `deploy` compares its files with."""
    import hashlib
    code = 'return "sha"\n'
    server.upload(f"{uid}/a", "python", "return 1")
    server.upload(f"{uid}/a", "python", code)
    listed = {f["path"]: f for f in assert_ok(server.get("/functions"))["functions"]}
    assert listed[f"{uid}/a"]["sha256"] == hashlib.sha256(code.encode()).hexdigest()
    versions = assert_ok(server.get(f"/functions/{uid}/a"))["versions"]
    assert_ok(server.request("PATCH", f"/functions/{uid}/a", {"latest": versions[0]["version"]}))
    listed = {f["path"]: f for f in assert_ok(server.get("/functions"))["functions"]}
    assert listed[f"{uid}/a"]["sha256"] == versions[0]["sha256"], "follows a roll back"
