"""Behaviour tests for faas.py, through HTTP only (and `python3 faas.py check`).

Each test asserts on what a user of the server sees: status codes, JSON answers, SSE
events. The server runs for real (bwrap, node, esbuild) on both stores: the `server`
fixture is parametrized over sqlite and a real redis-server started by conftest.py.
No timing assertions beyond the order in which things arrive.
"""

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import assert_error, assert_ok, descendants, proc_table, wait_until

# (helpers come from conftest.py through fixtures, not imports: tests/ may have its own
# conftest.py, and two modules named "conftest" cannot both be imported by name)
REPO = Path(__file__).resolve().parent
FAAS_PY = REPO / "faas.py"

# --------------------------------------------------------------------------- helpers


def answer(r, data, type_):
    body = assert_ok(r)
    assert body["data"] == data and body["type"] == type_, body
    return body


def open_stream(server, path, body, headers=None):
    s = server.sse(path, body, headers)
    assert s.status == 200, f"{path}: {s.status} {s.body()!r}"
    assert s.headers.get("content-type", "").startswith("text/event-stream"), s.headers
    return s


def stream(server, path, body, headers=None):
    """Run with streaming; return the list of (arrival, event), checking the shape:
    log events, then exactly one final result/error event, then the end."""
    timed = list(open_stream(server, path, body, headers).events())
    events = [e for _, e in timed]
    assert events, "stream had no events"
    kinds = [e.get("event") for e in events]
    assert kinds[-1] in ("result", "error"), events
    assert all(k == "log" for k in kinds[:-1]), events
    return timed


def logs_of(events):
    return [e for e in events if e.get("event") == "log"]


# --------------------------------------------------------------------------- seed examples

SEED_PY_SUM = 'return event.get("a", 0) + event.get("b", 0)'
SEED_JS_SUM = "return { sum: event.a + event.b }"
SEED_TS_USERS = """interface User {
  name: string;
  age: number;
}
const users: User[] = event.users;
const adults: User[] = users.filter((u: User) => u.age >= 18);
console.log("processing " + users.length + " users");
console.log(JSON.stringify({
  count: adults.length,
  names: adults.map((u: User) => u.name),
}));
"""
SEED_TS_INPUT = {"users": [{"name": "Ann", "age": 34}, {"name": "Bob", "age": 12},
                           {"name": "Cy", "age": 18}]}
SEED_PY_STREAM = """import time
for i in range(5):
    print(i)
    time.sleep(0.1)
return "done"
"""
SEED_PY_RAISE = """print("step 1")
print("step 2")
raise ValueError("something went wrong")
"""
SEED_PY_LOOP_RETURN = "for i in range(5): return f'Line {i}'"


class TestSeedExamples:
    def test_python_sum(self, server, uid):
        server.upload(f"{uid}/sum", "python", SEED_PY_SUM)
        answer(server.run(f"{uid}/sum", '{"a": 3, "b": 5}'), 8, "number")
        answer(server.run_now("python", SEED_PY_SUM, '{"a": 3, "b": 5}'), 8, "number")

    def test_javascript_sum(self, server, uid):
        server.upload(f"{uid}/sum", "javascript", SEED_JS_SUM)
        answer(server.run(f"{uid}/sum", '{"a": 10, "b": 20}'), {"sum": 30}, "json")
        answer(server.run_now("javascript", SEED_JS_SUM, '{"a": 10, "b": 20}'),
               {"sum": 30}, "json")

    def test_typescript_printed_json_is_the_answer(self, server, uid):
        server.upload(f"{uid}/users", "typescript", SEED_TS_USERS)
        expected = {"count": 2, "names": ["Ann", "Cy"]}
        body = answer(server.run(f"{uid}/users", json.dumps(SEED_TS_INPUT)), expected, "json")
        assert "processing 3 users" in body["stdout"]
        answer(server.run_now("typescript", SEED_TS_USERS, json.dumps(SEED_TS_INPUT)),
               expected, "json")

    def test_python_streaming_logs_then_result(self, server, uid):
        server.upload(f"{uid}/stream", "python", SEED_PY_STREAM)
        events = [e for _, e in stream(server, f"/run/{uid}/stream",
                                       {"input": "{}", "stream": True})]
        logs = logs_of(events)
        assert [e["data"] for e in logs] == [0, 1, 2, 3, 4], events
        assert all(e["type"] == "number" for e in logs), events
        final = events[-1]
        assert final["event"] == "result", events
        assert final["data"] == "done" and final["type"] == "string", final
        assert final.get("status") == "ok", final

    def test_python_raise_streamed(self, server, uid):
        server.upload(f"{uid}/raise", "python", SEED_PY_RAISE)
        events = [e for _, e in stream(server, f"/run/{uid}/raise",
                                       {"input": "{}", "stream": True})]
        logs = logs_of(events)
        assert [e["data"] for e in logs] == ["step 1", "step 2"], events
        assert all(e["type"] == "text" for e in logs), events
        final = events[-1]
        assert final["event"] == "error", events
        assert "something went wrong" in final["data"], final
        assert final.get("status") == "error", final

    def test_python_raise_not_streamed(self, server, uid):
        server.upload(f"{uid}/raise", "python", SEED_PY_RAISE)
        body = assert_error(server.run(f"{uid}/raise", "{}"), 500)
        assert body["error"].startswith("failed to run"), body
        assert "ValueError" in body["error"] and "something went wrong" in body["error"], body
        assert body["status"] == "error"
        assert body["error_type"] == "ValueError"
        assert body["message"] == "something went wrong"
        assert body["stdout"] == "step 1\nstep 2\n", body

    def test_python_return_inside_loop(self, server, uid):
        server.upload(f"{uid}/lines", "python", SEED_PY_LOOP_RETURN)
        answer(server.run(f"{uid}/lines"), "Line 0", "string")
        answer(server.run_now("python", SEED_PY_LOOP_RETURN), "Line 0", "string")


# --------------------------------------------------------------------------- languages

ECHO = {
    "python": 'return {"echo": event, "same": input == event, "lang": "py"}',
    "javascript": 'return {echo: event, same: input === event, lang: "js"}',
    "typescript": ('type Ev = Record<string, unknown>;\n'
                   'const e: Ev = event as Ev;\n'
                   'return {echo: e, same: input === event, lang: "ts" as const}'),
}
SHORT = {"python": "py", "javascript": "js", "typescript": "ts"}


@pytest.mark.parametrize("lang", ["python", "javascript", "typescript"])
class TestLanguages:
    def test_upload_and_run(self, server, uid, lang):
        r = server.upload(f"{uid}/echo", lang, ECHO[lang])
        up = r.body
        assert up["path"] == f"{uid}/echo" and up["language"] == lang, up
        assert type(up["version"]) is int, up
        inp = {"x": [1, 2, {"y": None}], "s": "héllo ✓"}
        body = answer(server.run(f"{uid}/echo", json.dumps(inp)),
                      {"echo": inp, "same": True, "lang": SHORT[lang]}, "json")
        assert body["status"] == "ok" and body["truncated"] is False, body
        assert isinstance(body["duration_ms"], (int, float)), body

    def test_run_now(self, server, lang):
        inp = {"k": 1}
        answer(server.run_now(lang, ECHO[lang], json.dumps(inp)),
               {"echo": inp, "same": True, "lang": SHORT[lang]}, "json")

    def test_input_as_json_value_not_string(self, server, lang):
        # the seed sends input as JSON text; a JSON value is accepted as is
        inp = {"a": [1, 2]}
        answer(server.run_now(lang, ECHO[lang], inp),
               {"echo": inp, "same": True, "lang": SHORT[lang]}, "json")
        answer(server.run_now(lang, ECHO[lang], [1, "2"]),
               {"echo": [1, "2"], "same": True, "lang": SHORT[lang]}, "json")

    def test_missing_or_empty_input_is_empty_object(self, server, lang):
        # like the seed: no input means an empty object, so `event.get(...)` /
        # `event.a` work without input
        expected = {"echo": {}, "same": True, "lang": SHORT[lang]}
        answer(server.run_now(lang, ECHO[lang]), expected, "json")
        answer(server.run_now(lang, ECHO[lang], ""), expected, "json")

    def test_streaming(self, server, uid, lang):
        code = {
            "python": 'print("hello")\nprint(\'{"n": 1}\')\nreturn 7',
            "javascript": 'console.log("hello");\nconsole.log(\'{"n": 1}\');\nreturn 7;',
            "typescript": ('const n: number = 7;\nconsole.log("hello");\n'
                           'console.log(\'{"n": 1}\');\nreturn n;'),
        }[lang]
        server.upload(f"{uid}/s", lang, code)
        for path, body in ((f"/run/{uid}/s", {"stream": True}),
                           ("/run-now", {"language": lang, "code": code, "stream": True})):
            events = [e for _, e in stream(server, path, body)]
            logs = logs_of(events)
            assert [(e["data"], e["type"]) for e in logs] == \
                [("hello", "text"), ({"n": 1}, "json")], events
            assert all(e.get("stream") == "stdout" for e in logs), events
            assert events[-1]["event"] == "result", events
            assert (events[-1]["data"], events[-1]["type"]) == (7, "number"), events

    def test_user_line_numbers_in_stack(self, server, uid, lang):
        code = {
            "python": 'a = 1\nb = 2\nraise RuntimeError("on line three")\n',
            "javascript": 'const a = 1;\nconst b = 2;\nthrow new Error("on line three");\n',
            "typescript": ('const a: number = 1;\nconst b: number = 2;\n'
                           'throw new Error("on line three");\n'),
        }[lang]
        server.upload(f"{uid}/err", lang, code)
        for r in (server.run(f"{uid}/err"), server.run_now(lang, code)):
            body = assert_error(r, 500)
            assert body["status"] == "error", body
            assert "on line three" in body["error"] and "on line three" in body["message"]
            stack = body["stack"]
            assert isinstance(stack, str), body
            if lang == "python":
                assert body["error_type"] == "RuntimeError", body
                assert "line 3" in stack, stack
                assert "wrappers/python.py" not in stack, stack
            else:
                assert body["error_type"] == "Error", body
                assert ":3:" in stack, stack
                assert "wrappers/node.js" not in stack, stack

    def test_syntax_error_at_upload(self, server, uid, lang):
        code, needle = {
            "python": ("x = 1\ny = (2,\nz = 3\n", "never closed"),
            "javascript": ("const x = 1;\nconst y = ;\n", "Unexpected"),
            "typescript": ("const x: number = 1;\nconst y: number = ;\n", "Unexpected"),
        }[lang]
        body = assert_error(server.upload(f"{uid}/bad", lang, code, expect=None), 400)
        assert needle in body["error"], body
        if lang == "python" or "line" in body:
            assert body["line"] == 2, body
        # nothing was stored
        assert_error(server.run(f"{uid}/bad"), 404)

    def test_return_nothing_prints_text(self, server, lang):
        code = {
            "python": 'print("  just some text  ")\nprint("last line")',
            "javascript": 'console.log("  just some text  ");\nconsole.log("last line");',
            "typescript": 'const s: string = "last line";\n'
                          'console.log("  just some text  ");\nconsole.log(s);',
        }[lang]
        answer(server.run_now(lang, code), "just some text  \nlast line", "text")

    def test_return_nothing_prints_nothing(self, server, lang):
        code = {"python": "x = 1", "javascript": "let x = 1;",
                "typescript": "let x: number = 1;"}[lang]
        answer(server.run_now(lang, code), "", "text")

    def test_return_value_beats_printed_json(self, server, lang):
        code = {
            "python": 'print(\'{"printed": true}\')\nreturn "returned"',
            "javascript": 'console.log(\'{"printed": true}\');\nreturn "returned";',
            "typescript": 'console.log(\'{"printed": true}\');\nreturn "returned" as string;',
        }[lang]
        body = answer(server.run_now(lang, code), "returned", "string")
        assert '{"printed": true}' in body["stdout"]


class TestAnswers:
    @pytest.mark.parametrize("code,data,type_", [
        ('return "s"', "s", "string"),
        ("return 1.5", 1.5, "number"),
        ("return -3", -3, "number"),
        ("return [1, 'a']", [1, "a"], "json"),
        ("return {'k': {'n': None}}", {"k": {"n": None}}, "json"),
        ("return True", True, "json"),
        ("return False", False, "json"),
        ("return None", "", "text"),  # None counts as no return: nothing printed
        ("return 'ünïcødé ✓'", "ünïcødé ✓", "string"),
        ("print(42)", 42, "number"),
        ("print('\"quoted\"')", "quoted", "string"),
        ("print('text first')\nprint('[1, 2]')", [1, 2], "json"),
    ])
    def test_types(self, server, code, data, type_):
        body = assert_ok(server.run_now("python", code))
        assert body["data"] == data and body["type"] == type_, body

    def test_answer_is_strict_json(self, server):
        # NaN/Infinity must not produce invalid JSON (the client parses strictly)
        body = assert_ok(server.run_now("python", 'return {"a": float("nan"), '
                                        '"b": float("inf")}'))
        assert set(body["data"]) == {"a", "b"}, body

    def test_non_serialisable_python_value(self, server):
        body = assert_ok(server.run_now("python", "import datetime\n"
                                        "return {'d': datetime.date(2024, 1, 2)}"))
        assert body["data"] == {"d": "2024-01-02"}, body

    def test_js_bigint(self, server):
        body = assert_ok(server.run_now("javascript", "return 10n ** 20n"))
        assert body["data"] == "100000000000000000000", body

    def test_js_and_ts_await(self, server):
        code = "await new Promise(r => setTimeout(r, 20));\nreturn 'awaited';"
        answer(server.run_now("javascript", code), "awaited", "string")
        answer(server.run_now("typescript", "const p: Promise<void> = new Promise("
                              "r => setTimeout(r, 20));\nawait p;\nreturn 'awaited';"),
               "awaited", "string")

    def test_python_top_level_await(self, server):
        answer(server.run_now("python", "import asyncio\nawait asyncio.sleep(0.01)\n"
                              "return 'awaited'"), "awaited", "string")

    def test_typescript_5_syntax(self, server, uid):
        code = ("enum Color { Red = 1, Green }\n"
                "const cfg = { a: 1 } satisfies Record<string, number>;\n"
                "class P { constructor(public x: number) {} }\n"
                "return Color.Green + cfg.a + new P(10).x;")
        server.upload(f"{uid}/ts5", "typescript", code)
        answer(server.run(f"{uid}/ts5"), 13, "number")

    def test_python_multiline_string_intact(self, server):
        code = ('s = """first\n'
                '  indented two\n'
                '\tafter tab\n'
                'last"""\n'
                'def f():\n'
                '    return """x\n'
                'y\n'
                '    z"""\n'
                'return [s, f()]')
        answer(server.run_now("python", code),
               ["first\n  indented two\n\tafter tab\nlast", "x\ny\n    z"], "json")

    def test_python_function_features(self, server):
        code = ("import math\n"
                "def sq(v):\n"
                "    return v * v\n"
                "class C:\n"
                "    k = 3\n"
                "total = sum(sq(i) for i in range(C.k))\n"
                "return {'total': total, 'pi': round(math.pi, 2)}")
        answer(server.run_now("python", code), {"total": 5, "pi": 3.14}, "json")

    def test_stderr_is_kept_and_does_not_fail(self, server):
        code = "import sys\nprint('warning!', file=sys.stderr)\nreturn 1"
        body = answer(server.run_now("python", code), 1, "number")
        assert "warning!" in body["stderr"], body
        events = [e for _, e in stream(server, "/run-now",
                                       {"language": "python", "code": code, "stream": True})]
        assert events[-1]["event"] == "result" and events[-1]["data"] == 1, events
        warn = [e for e in logs_of(events) if e["data"] == "warning!"]
        assert warn and warn[0].get("stream") == "stderr", events

    def test_js_error_has_fields(self, server):
        body = assert_error(server.run_now("javascript", "null.x"), 500)
        assert body["status"] == "error" and body["error_type"] == "TypeError", body
        assert body["error"].startswith("failed to run"), body

    def test_concurrent_runs(self, server):
        results = [None] * 6

        def go(i):
            results[i] = server.run_now("python", f"return event * {i}", "3")

        threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in enumerate(results):
            answer(r, 3 * i, "number")


class TestSandbox:
    def test_server_environment_not_visible(self, server):
        body = assert_ok(server.run_now("python", "import os\nreturn dict(os.environ)"))
        assert "FAAS_TEST_SECRET" not in body["data"], body
        body = assert_ok(server.run_now("javascript", "return process.env"))
        assert "FAAS_TEST_SECRET" not in body["data"], body

    def test_host_files_not_visible(self, server):
        code = f"import os\nreturn [os.path.exists({str(REPO)!r}), os.path.exists('/work')]"
        answer(server.run_now("python", code), [False, False], "json")


# --------------------------------------------------------------------------- versions

class TestVersions:
    def test_versions_are_increasing_integers(self, server, uid):
        t0 = int(time.time())
        v1 = server.upload(f"{uid}/f", "python", "return 1").body["version"]
        v2 = server.upload(f"{uid}/f", "python", "return 2").body["version"]
        assert type(v1) is int and type(v2) is int
        assert v1 >= t0 and v2 > v1, (t0, v1, v2)

    def test_version_query_runs_that_version(self, server, uid):
        vs = [server.upload(f"{uid}/f", "python", f"return {i}").body["version"]
              for i in range(3)]
        assert len(set(vs)) == 3
        answer(server.run(f"{uid}/f"), 2, "number")
        for i, v in enumerate(vs):
            answer(server.run(f"{uid}/f", version=v), i, "number")
        # streamed too
        events = [e for _, e in stream(server, f"/run/{uid}/f?version={vs[0]}",
                                       {"stream": True})]
        assert events[-1]["event"] == "result" and events[-1]["data"] == 0, events

    def test_versions_of_other_languages(self, server, uid):
        v1 = server.upload(f"{uid}/f", "python", "return 'py'").body["version"]
        v2 = server.upload(f"{uid}/f", "typescript", "return 'ts' as string").body["version"]
        v3 = server.upload(f"{uid}/f", "javascript", "return 'js'").body["version"]
        answer(server.run(f"{uid}/f", version=v1), "py", "string")
        answer(server.run(f"{uid}/f", version=v2), "ts", "string")
        answer(server.run(f"{uid}/f", version=v3), "js", "string")
        answer(server.run(f"{uid}/f"), "js", "string")

    def test_unknown_function_and_version(self, server, uid):
        assert_error(server.run(f"{uid}/nope"), 404)
        v = server.upload(f"{uid}/f", "python", "return 1").body["version"]
        assert_error(server.run(f"{uid}/f", version=v + 1000), 404)
        assert_error(server.run(f"{uid}/nope", version=v), 404)
        # a streaming request for an unknown function is a JSON error, not a stream
        s = server.sse(f"/run/{uid}/nope", {"stream": True})
        assert s.status == 404
        assert "json" in s.headers.get("content-type", ""), s.headers
        assert isinstance(s.body().get("error"), str)

    @pytest.mark.parametrize("q", ["abc", "1.5", "1e3", "0x10"])
    def test_bad_version_query(self, server, uid, q):
        server.upload(f"{uid}/f", "python", "return 1")
        assert_error(server.post(f"/run/{uid}/f?version={q}", {}), 400)

    @pytest.mark.parametrize("q", ["99999999999999999999999999", "-1", "0"])
    def test_out_of_range_version_is_not_found(self, server, uid, q):
        server.upload(f"{uid}/f", "python", "return 1")
        r = server.post(f"/run/{uid}/f?version={q}", {})
        assert r.status in (400, 404), r
        assert_error(r, r.status)

    def test_concurrent_uploads_to_one_path(self, server, uid):
        n = 20
        results = [None] * n
        barrier = threading.Barrier(n)

        def go(i):
            barrier.wait()
            results[i] = server.post("/upload", {"path": f"{uid}/race", "language": "python",
                                                 "code": f"return {i}"})

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        versions = []
        for r in results:
            assert r is not None and r.status == 200, r
            assert type(r.body["version"]) is int, r.body
            versions.append(r.body["version"])
        assert len(set(versions)) == n, sorted(versions)
        for i, v in enumerate(versions):
            answer(server.run(f"{uid}/race", version=v), i, "number")
        # latest is the highest version
        latest = versions.index(max(versions))
        answer(server.run(f"{uid}/race"), latest, "number")

    def test_nested_and_dotted_paths(self, server, uid):
        path = f"{uid}/a.b-c_D/9/x.py"
        server.upload(path, "python", "return 'deep'")
        answer(server.run(path), "deep", "string")
        # a prefix of a path is a different (unknown) function
        assert_error(server.run(f"{uid}/a.b-c_D"), 404)


# --------------------------------------------------------------------------- errors

class TestErrors:
    @pytest.mark.parametrize("route", ["/upload", "/run-now"])
    @pytest.mark.parametrize("raw", [b"not json", b"{", b"[]", b"42", b"\"str\"", b"null",
                                     b"\xff\xfe"])
    def test_bad_json_body(self, server, route, raw):
        assert_error(server.post(route, raw, {"Content-Type": "application/json"}), 400)

    def test_bad_json_body_run(self, server, uid):
        server.upload(f"{uid}/f", "python", "return 1")
        for raw in (b"not json", b"[1]", b"7"):
            assert_error(server.post(f"/run/{uid}/f", raw), 400)

    @pytest.mark.parametrize("body", [
        {"language": "python", "code": "return 1"},
        {"path": "x", "code": "return 1"},
        {"path": "x", "language": "python"},
        {"path": 5, "language": "python", "code": "return 1"},
        {"path": "x", "language": ["python"], "code": "return 1"},
        {"path": "x", "language": "python", "code": 12},
        {"path": None, "language": "python", "code": "return 1"},
    ])
    def test_upload_missing_or_wrong_fields(self, server, body):
        assert_error(server.post("/upload", body), 400)

    @pytest.mark.parametrize("body", [
        {"code": "return 1"},
        {"language": "python"},
        {"language": 1, "code": "return 1"},
        {"language": "python", "code": ["return 1"]},
        {"language": "python", "code": "return 1", "stream": "yes"},
    ])
    def test_run_now_missing_or_wrong_fields(self, server, body):
        assert_error(server.post("/run-now", body), 400)

    def test_run_without_body(self, server, uid):
        server.upload(f"{uid}/f", "python", "return event")
        answer(server.post(f"/run/{uid}/f", None), {}, "json")
        answer(server.post(f"/run/{uid}/f", {}), {}, "json")

    def test_run_wrong_stream_type(self, server, uid):
        server.upload(f"{uid}/f", "python", "return 1")
        assert_error(server.post(f"/run/{uid}/f", {"stream": "yes"}), 400)

    @pytest.mark.parametrize("lang", ["ruby", "Python", "", "go", "ts"])
    def test_unknown_language(self, server, uid, lang):
        body = assert_error(server.upload(f"{uid}/f", lang, "return 1", expect=None), 400)
        assert_error(server.run_now(lang, "return 1"), 400)
        assert body

    def test_empty_code(self, server, uid):
        assert_error(server.upload(f"{uid}/f", "python", "", expect=None), 400)
        for lang in ("python", "javascript", "typescript"):
            assert_error(server.run_now(lang, ""), 400)
        assert_error(server.run(f"{uid}/f"), 404)

    @pytest.mark.parametrize("path", [
        "../x", "a/../b", "..", "a/..", "a//b", "a b", "/a", "a/", "", "a?b", "a\\b",
        "é", "a\nb", "x" * 201, "a/" + "y" * 199, "a/../../etc",
    ])
    def test_bad_paths(self, server, path):
        assert_error(server.upload(path, "python", "return 1", expect=None), 400)

    def test_longest_path_is_fine(self, server, uid):
        path = uid + "/" + "p" * (200 - len(uid) - 1)
        assert len(path) == 200
        server.upload(path, "python", "return 'long'")
        answer(server.run(path), "long", "string")

    @pytest.mark.parametrize("path", ["/run/../etc/passwd", "/run/a//b", "/run/a%20b",
                                      "/run/", "/run"])
    def test_bad_run_paths(self, server, path):
        r = server.post(path, {})
        assert r.status in (400, 404), r
        assert_error(r, r.status)

    @pytest.mark.parametrize("inp", ["{bad", "not json", "{'a': 1}", "[1,", "NaN", "1e400", '{"a": [-1e999]}'])
    def test_input_not_json(self, server, uid, inp):
        server.upload(f"{uid}/f", "python", "return event")
        assert_error(server.run(f"{uid}/f", inp), 400)
        assert_error(server.run_now("python", "return event", inp), 400)
        # also when streaming: an error found before running is a JSON answer
        s = server.sse(f"/run/{uid}/f", {"input": inp, "stream": True})
        assert s.status == 400 and "json" in s.headers.get("content-type", ""), s.headers
        s.close()

    @pytest.mark.parametrize("language", ["python", "javascript"])
    def test_number_beyond_a_double_is_a_clear_400(self, server, language):
        """1e400 is valid JSON syntax but no double: a 400 naming it, not a crashed wrapper."""
        raw = b'{"language": "%s", "code": "return 1", "input": {"a": 1e400}}' % language.encode()
        r = server.request("POST", "/run-now", raw, headers={"Content-Type": "application/json"})
        body = assert_error(r, 400)
        assert "1e400" in body["error"], body
        answer(server.run_now(language, "return 1.5e308"), 1.5e308, "number")

    def test_body_too_large(self, server, uid):
        big = "# " + "x" * 300_000 + "\nreturn 1"
        body = assert_error(server.upload(f"{uid}/big", "python", big, expect=None), 413)
        assert body
        assert_error(server.run_now("python", big), 413)
        # the server still serves afterwards
        answer(server.run_now("python", "return 'alive'"), "alive", "string")

    def test_body_just_under_limit_is_fine(self, server, uid):
        code = "return 1\n#"
        envelope = len(json.dumps({"path": f"{uid}/big", "language": "python", "code": code}))
        code += "x" * (262144 - envelope - 100)
        server.upload(f"{uid}/big", "python", code)
        answer(server.run(f"{uid}/big"), 1, "number")

    @pytest.mark.parametrize("method,path", [
        ("GET", "/upload"), ("GET", "/run-now"), ("PUT", "/upload"), ("DELETE", "/run-now"),
        ("GET", "/run/some/function"),
    ])
    def test_wrong_method(self, server, method, path):
        assert_error(server.request(method, path), 405)

    @pytest.mark.parametrize("method,path", [
        ("GET", "/consoles"), ("GET", "/nope"), ("POST", "/nope"), ("POST", "/uploads"),
        ("POST", "/upload/extra"), ("GET", "/healthz/x"),
    ])
    def test_unknown_route(self, server, method, path):
        assert_error(server.request(method, path, {} if method == "POST" else None), 404)

    def test_syntax_error_run_now(self, server):
        # TypeScript is transpiled before running: a compile error is a 400 like at upload
        body = assert_error(server.run_now("typescript", "const y: number = ;"), 400)
        assert "Unexpected" in body["error"], body
        # Python / JavaScript: rejected before running (400) or reported as a failed run
        for lang, code in (("python", "x = (1,"), ("javascript", "const y = ;")):
            r = server.run_now(lang, code)
            assert r.status in (400, 500), r
            assert "SyntaxError" in json.dumps(r.body) or r.status == 400, r.body


# --------------------------------------------------------------------------- streaming

class TestStreaming:
    def test_accept_header_streams(self, server, uid):
        server.upload(f"{uid}/s", "python", "print('a')\nreturn 'b'")
        timed = stream(server, f"/run/{uid}/s", {"input": "{}"},
                       headers={"Accept": "text/event-stream"})
        events = [e for _, e in timed]
        assert [e["data"] for e in events] == ["a", "b"], events
        timed = stream(server, "/run-now", {"language": "python", "code": "return 5"},
                       headers={"Accept": "text/event-stream"})
        assert [e for _, e in timed][-1]["data"] == 5

    def test_no_stream_without_asking(self, server):
        r = server.post("/run-now", {"language": "python", "code": "print(1)\nreturn 2"})
        assert r.headers["content-type"].startswith("application/json"), r.headers
        answer(r, 2, "number")

    def test_stream_false_is_json(self, server):
        answer(server.post("/run-now", {"language": "python", "code": "return 2",
                                        "stream": False}), 2, "number")

    @pytest.mark.parametrize("lang,code", [
        ("python", "import time\nprint('first')\ntime.sleep(1.5)\nprint('second')\n"
                   "return 'end'"),
        ("javascript", "console.log('first');\nawait new Promise(r => setTimeout(r, 1500));\n"
                       "console.log('second');\nreturn 'end';"),
    ])
    def test_logs_arrive_while_running(self, server, uid, lang, code):
        server.upload(f"{uid}/slow", lang, code)
        timed = stream(server, f"/run/{uid}/slow", {"stream": True})
        assert [e["data"] for _, e in timed] == ["first", "second", "end"], timed
        first_at = timed[0][0]
        final_at = timed[-1][0]
        # ordering of arrivals: the first line came before the sleep was over
        assert first_at < final_at - 1.0, (first_at, final_at)

    def test_stream_lines_without_newline_and_empty_lines(self, server):
        code = "import sys\nprint('a')\nprint()\nsys.stdout.write('tail')\nreturn 1"
        events = [e for _, e in stream(server, "/run-now",
                                       {"language": "python", "code": code, "stream": True})]
        datas = [e["data"] for e in logs_of(events)]
        assert datas[0] == "a" and datas[-1] == "tail", events
        assert events[-1]["data"] == 1

    def test_stream_many_lines(self, server):
        code = "for i in range(500):\n    print(f'line {i}')\nreturn 'ok'"
        events = [e for _, e in stream(server, "/run-now",
                                       {"language": "python", "code": code, "stream": True})]
        assert [e["data"] for e in logs_of(events)] == [f"line {i}" for i in range(500)]
        assert events[-1]["data"] == "ok"

    def test_stream_js_error(self, server):
        code = "console.log('before');\nthrow new TypeError('bad type');"
        events = [e for _, e in stream(server, "/run-now", {"language": "javascript",
                                                            "code": code, "stream": True})]
        assert [e["data"] for e in logs_of(events)] == ["before"], events
        final = events[-1]
        assert final["event"] == "error" and "bad type" in final["data"], final
        assert final["type"] == "text" and final["status"] == "error", final


# --------------------------------------------------------------------------- health / check

def test_healthz_reports_store(server):
    r = server.get("/healthz")
    body = assert_ok(r)
    assert body["status"] == "ok", body
    assert body["store"] == server.store, body
    assert body["sandbox"] == "bwrap", body
    assert isinstance(body.get("runtimes"), dict), body


def test_check_command(faas):
    env = faas.clean_env()
    p = subprocess.run([sys.executable, str(FAAS_PY), "check"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    for word in ("bwrap", "node", "esbuild", "python3"):
        assert word in out, out


# --------------------------------------------------------------------------- limits

@pytest.fixture(scope="module", params=["on", "off"], ids=["zygote", "bwrap"])
def limited_server(faas, request):
    """Limits and outcomes through both spawn paths: Python forked by the zygote, or bwrap."""
    s = faas.start(store="sqlite", env={"TIMEOUT_SCRIPT": "2", "FAAS_MAX_OUTPUT": "10000",
                                        "FAAS_ZYGOTE": request.param})
    yield s
    s.stop()
    assert "Traceback" not in s.stderr_text(), s.stderr_text()[-4000:]


class TestLimits:
    @pytest.mark.parametrize("lang,code", [
        ("python", "print('before the loop', flush=True)\nwhile True:\n    pass"),
        ("javascript", "console.log('before the loop');\nwhile (true) {}"),
        ("python", "import time\nprint('before the loop')\ntime.sleep(60)"),
    ])
    def test_timeout(self, limited_server, lang, code):
        s = limited_server
        body = assert_error(s.run_now(lang, code), 504)
        assert body["status"] == "timeout", body
        assert "time" in body["error"].lower(), body
        assert "before the loop" in body["stdout"], body
        answer(s.run_now("python", "return 'alive'"), "alive", "string")

    def test_a_deadline_shorter_than_the_sandbox_start_is_a_timeout(self, faas):
        """A cold sandbox killed before its gate joined the run's cgroups timed out: it is
        not the server failing to place it (once a 500 'could not join its cgroups')."""
        s = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "0"})
        try:
            for lang in ["python", "javascript"] * 10:
                body = assert_error(s.run_now(lang, "return 1", timeout=5e-324), 504)
                assert body["status"] == "timeout", body
            answer(s.run_now("python", "return 'alive'"), "alive", "string")
        finally:
            s.stop()

    def test_timeout_streamed(self, limited_server, uid):
        s = limited_server
        s.upload(f"{uid}/loop", "python", "print('tick')\nwhile True:\n    pass")
        events = [e for _, e in stream(s, f"/run/{uid}/loop", {"stream": True})]
        assert [e["data"] for e in logs_of(events)] == ["tick"], events
        assert events[-1]["event"] == "error" and events[-1]["status"] == "timeout", events

    @pytest.mark.parametrize("lang,code", [
        ("python", "while True:\n    print('x' * 100)"),
        ("javascript", "while (true) console.log('x'.repeat(100));"),
        ("python", "import sys\nwhile True:\n    sys.stderr.write('e' * 1000)"),
        ("python", "print('y' * 1000000)"),
    ])
    def test_output_cap(self, limited_server, lang, code):
        s = limited_server
        r = s.run_now(lang, code)
        body = assert_error(r, 500)
        assert body["status"] == "output_limit", body
        assert body["truncated"] is True, body
        kept = body.get("stdout", "") + body.get("stderr", "")
        assert 0 < len(kept.encode()) <= 2 * 10000, len(kept)
        answer(s.run_now("python", "return 'alive'"), "alive", "string")
        assert s.get("/healthz").status == 200

    def test_output_cap_streamed(self, limited_server):
        s = limited_server
        events = [e for _, e in stream(s, "/run-now", {
            "language": "python", "code": "while True:\n    print('z' * 100)",
            "stream": True})]
        assert logs_of(events), events
        assert events[-1]["event"] == "error", events[-1]
        assert events[-1]["status"] == "output_limit", events[-1]

    def test_output_under_cap_not_truncated(self, limited_server):
        body = answer(limited_server.run_now("python", "print('a' * 5000)\nreturn 1"),
                      1, "number")
        assert body["truncated"] is False and body["stdout"] == "a" * 5000 + "\n"

    def test_no_process_left_behind(self, limited_server):
        """Nothing a run started survives it: not a timed-out loop, not a background
        child. Each run names its processes with a marker (/proc/self/comm or argv), then
        the whole machine is searched for it. Idle pre-started sandboxes (a warm pool) are
        allowed, but their number must not grow with the runs."""
        s = limited_server
        marker = f"lb{uuid.uuid4().int % 10**8:08d}"   # <= 15 chars: fits in comm
        seconds = f"31.{uuid.uuid4().int % 10**6:06d}"  # unique argv for sleep(1)
        name_py = f"open('/proc/self/comm', 'w').write({marker!r})\n"

        def leftovers():
            return {pid: v for pid, v in proc_table().items()
                    if v["comm"] == marker or marker in v["cmdline"] or seconds in v["cmdline"]}

        def sandboxes():
            return sum(1 for v in descendants(s.proc.pid).values() if v["comm"] == "bwrap")

        answer(s.run_now("python", "return 1"), 1, "number")
        time.sleep(1)
        baseline = sandboxes()

        # a timed-out run (Python and JavaScript)
        assert_error(s.run_now("python", name_py + "while True:\n    pass"), 504)
        assert_error(s.run_now("javascript", f"process.title = {marker!r};\nwhile (true) {{}}"),
                     504)
        # runs that leave background children behind
        answer(s.run_now("python", "import subprocess\n"
                         f"subprocess.Popen(['sleep', '{seconds}'], start_new_session=True)\n"
                         "return 'started'"), "started", "string")
        answer(s.run_now("javascript", "const cp = require('child_process');\n"
                         f"cp.spawn('sleep', ['{seconds}'], {{detached: true, "
                         "stdio: 'ignore'}).unref();\nreturn 'started';"),
               "started", "string")
        answer(s.run_now("python", "import os, time\nif os.fork() == 0:\n"
                         "    os.setsid()\n"
                         f"    open('/proc/self/comm', 'w').write({marker!r})\n"
                         "    time.sleep(30)\n"
                         "    os._exit(0)\n"
                         "return 'forked'"), "forked", "string")
        # a streamed run that times out, the client reading to the end
        events = [e for _, e in stream(s, "/run-now", {
            "language": "python", "code": name_py + "print('x')\nwhile True:\n    pass",
            "stream": True})]
        assert events[-1]["status"] == "timeout", events

        wait_until(lambda: not leftovers(), timeout=10)
        left = leftovers()
        assert not left, f"processes left behind: {left}"
        wait_until(lambda: sandboxes() <= baseline, timeout=10)
        assert sandboxes() <= baseline, (baseline, descendants(s.proc.pid))
        assert s.proc.poll() is None

    def test_client_gone_mid_stream_kills_the_run(self, limited_server):
        """A client that disconnects from a stream does not leave its run behind."""
        s = limited_server
        marker = f"lc{uuid.uuid4().int % 10**8:08d}"
        st = open_stream(s, "/run-now", {
            "language": "python", "stream": True,
            "code": f"open('/proc/self/comm', 'w').write({marker!r})\n"
                    "import time\nwhile True:\n    print('tick')\n    time.sleep(0.05)"})
        events = st.events()
        next(events)  # the run is going
        st.close()

        def alive():
            return [pid for pid, v in proc_table().items() if v["comm"] == marker]

        # at the latest the time limit (2 s) ends it
        wait_until(lambda: not alive(), timeout=10)
        assert not alive()
        answer(s.run_now("python", "return 'alive'"), "alive", "string")


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("var,value", [
    ("TIMEOUT_SCRIPT", "abc"),
    ("TIMEOUT_SCRIPT", "-5"),
    ("HTTP_PORT", "notaport"),
    ("HTTP_PORT", "70000"),
    ("CODE_MAX_SIZE", "big"),
    ("MAX_MEMORY", "lots"),
    ("MAX_CPUS", "many"),
    ("FAAS_MAX_OUTPUT", "x"),
])
def test_bad_config_refuses_to_start(faas, var, value):
    s = faas.start(store="sqlite", env={var: value}, wait=False)
    try:
        rc = s.proc.wait(20)
    except subprocess.TimeoutExpired:
        s.stop()
        pytest.fail(f"server started with {var}={value!r}")
    assert rc != 0
    err = s.stderr_text()
    assert var in err, err
    assert "Traceback" not in err, err


def test_refuses_to_start_without_bwrap(faas, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    s = faas.start(store="sqlite", env={"PATH": str(empty)}, wait=False)
    try:
        rc = s.proc.wait(20)
    except subprocess.TimeoutExpired:
        s.stop()
        pytest.fail("server started without bwrap on PATH")
    err = s.stderr_text() + s.stdout_text()
    assert rc != 0 and "bwrap" in err, err
    assert "Traceback" not in err, err


def _listening(port):
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            addr, p = f[1].split(":")
            if int(p, 16) == port and f[3] == "0A":
                found.append((name, addr))
    return found


def test_default_bind_is_loopback(sqlite_server):
    s = sqlite_server
    listening = _listening(s.port)
    assert listening == [("tcp", "0100007F")], listening
    # another loopback address of this machine is refused
    import socket
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", s.port), timeout=2).close()


def test_dotenv_is_read(faas, tmp_path):
    port = faas.free_port()
    data = tmp_path / "data"
    (tmp_path / ".env").write_text(
        "# faas settings\n"
        "\n"
        f"HTTP_PORT={port}\n"
        f'FAAS_DATA_DIR="{data}"\n'
        "TIMEOUT_SCRIPT=abc\n"
    )
    # TIMEOUT_SCRIPT=abc in .env would stop the server: the real environment wins
    s = faas.start(store=None, cwd=tmp_path, env={"TIMEOUT_SCRIPT": "7"},
                   port=port, set_port=False)
    try:
        assert s.get("/healthz").body["store"] == "sqlite"
        s.upload("dotenv/f", "python", "return 'from dotenv'")
        answer(s.run("dotenv/f"), "from dotenv", "string")
        assert data.is_dir() and any(data.iterdir()), "FAAS_DATA_DIR from .env not used"
    finally:
        s.stop()


# --------------------------------------------------------------------------- stores

def test_redis_keys_are_prefixed(faas, redis_server, uid):
    db = 5
    redis_server.client(db).flushdb()
    prefix = f"myapp-{uid}:"
    s = faas.start(store=None, env={"REDIS_URL": redis_server.url(db),
                                    "FAAS_REDIS_PREFIX": prefix})
    try:
        assert s.get("/healthz").body["store"] == "redis"
        s.upload("k/f", "python", "return 1")
        s.upload("k/f", "typescript", "return 2")
        answer(s.run("k/f"), 2, "number")
    finally:
        s.stop()
    keys = list(redis_server.client(db).scan_iter("*"))
    assert keys, "nothing was written to Redis"
    assert all(k.startswith(prefix) for k in keys), keys


def test_redis_seed_variables(faas, redis_server, uid):
    db = 6
    redis_server.client(db).flushdb()
    s = faas.start(store=None, env={"REDIS_HOST": "127.0.0.1",
                                    "REDIS_PORT": str(redis_server.port),
                                    "REDIS_DB": str(db), "REDIS_TIMEOUT_SECONDS": "3"})
    try:
        assert s.get("/healthz").body["store"] == "redis"
        s.upload(f"{uid}/f", "javascript", "return 'seed vars'")
        answer(s.run(f"{uid}/f"), "seed vars", "string")
    finally:
        s.stop()
    keys = list(redis_server.client(db).scan_iter("*"))
    assert keys and all(k.startswith("faas:") for k in keys), keys


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_data_persists_across_restart(faas, tmp_path, store, uid):
    if store == "sqlite":
        env = {"FAAS_DATA_DIR": str(tmp_path / "data")}
    else:
        env = faas.redis_env()
    s1 = faas.start(store=None, env=env)
    v1 = s1.upload(f"{uid}/p", "python", "return 'v1'").body["version"]
    v2 = s1.upload(f"{uid}/p", "typescript", "return 'v2' as string").body["version"]
    assert s1.stop() is not None
    s2 = faas.start(store=None, env=env)
    try:
        answer(s2.run(f"{uid}/p"), "v2", "string")
        answer(s2.run(f"{uid}/p", version=v1), "v1", "string")
        v3 = s2.upload(f"{uid}/p", "python", "return 'v3'").body["version"]
        assert v3 > v2 > v1
        answer(s2.run(f"{uid}/p"), "v3", "string")
        answer(s2.run(f"{uid}/p", version=v2), "v2", "string")
    finally:
        s2.stop()


def test_stores_are_separate_by_prefix(faas, uid):
    a = faas.start(store="redis")
    b = faas.start(store="redis")
    try:
        a.upload(f"{uid}/only-a", "python", "return 'a'")
        answer(a.run(f"{uid}/only-a"), "a", "string")
        assert_error(b.run(f"{uid}/only-a"), 404)
    finally:
        a.stop()
        b.stop()


def test_two_servers_share_one_store(faas, uid):
    env = faas.redis_env()
    a = faas.start(store=None, env=env)
    b = faas.start(store=None, env=env)
    try:
        va = a.upload(f"{uid}/shared", "python", "return 'a'").body["version"]
        vb = b.upload(f"{uid}/shared", "python", "return 'b'").body["version"]
        assert vb > va
        answer(a.run(f"{uid}/shared"), "b", "string")
        answer(b.run(f"{uid}/shared", version=va), "a", "string")
    finally:
        a.stop()
        b.stop()


def test_sigterm_lets_running_calls_finish(faas):
    """SIGTERM: the server stops accepting at once, a call already running still gets its
    answer, and the server then exits 0 with nothing of its sandboxes left."""
    s = faas.start(env={"TIMEOUT_SCRIPT": "10"})
    answers = []
    call = threading.Thread(target=lambda: answers.append(
        s.run_now("python", "import time\ntime.sleep(2)\nreturn 'finished'")))
    call.start()
    deadline = time.monotonic() + 10
    while s.get("/healthz").body["runs_active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.proc.send_signal(subprocess.signal.SIGTERM)
    time.sleep(0.8)
    with pytest.raises(ConnectionError):
        s.get("/healthz", timeout=2)   # no longer accepting (refused, or reset from the backlog)
    call.join(15)
    assert s.proc.wait(15) == 0
    assert len(answers) == 1
    answer(answers[0], "finished", "string")
    assert "Traceback" not in s.stderr_text()
