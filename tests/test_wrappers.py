"""The wrappers (wrappers/python.py, wrappers/node.js) tested as programs.

They run directly here (no sandbox), the way the server starts them: the request on
stdin, the result on an inherited pipe whose fd number is the last argument. TypeScript
tests need esbuild: $ESBUILD, else node_modules/@esbuild/linux-x64/bin/esbuild in the
repo (package.json pins it); they are skipped, with the reason, when neither exists.
"""

import json
import os
import selectors
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ["/usr/bin/python3", "-I", str(ROOT / "wrappers" / "python.py")]
NODE = ["/usr/bin/node", str(ROOT / "wrappers" / "node.js")]
ESBUILD = os.environ.get("ESBUILD") or str(ROOT / "node_modules/@esbuild/linux-x64/bin/esbuild")
# The flags the server uses at upload (see the report to the lead / README).
ESBUILD_ARGS = ["--loader=ts", "--sourcemap=inline", "--sourcefile=function.ts",
                "--target=node20", "--log-level=error"]
ENV = {"PATH": "/usr/bin", "HOME": "/tmp"}

needs_esbuild = pytest.mark.skipif(
    not os.access(ESBUILD, os.X_OK),
    reason=f"esbuild not found at {ESBUILD} (run `npm ci` in the repo or set ESBUILD=/path/to/esbuild)")


def transpile(body):
    """TypeScript body -> the JavaScript the server stores at upload."""
    source = "async function __main(event: any, input: any) {" + body + "\n}"
    p = subprocess.run([ESBUILD, *ESBUILD_ARGS], input=source, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def start(argv, code, event=None, language=None, check=False, cwd="/tmp"):
    """Start a wrapper and send it the request; returns (process, read end of the result pipe)."""
    language = language or ("python" if argv is PYTHON else "javascript")
    if language == "typescript" and not check:
        code = transpile(code)
    r, w = os.pipe()
    proc = subprocess.Popen(argv + (["--check"] if check else []) + [str(w)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(w,), env=ENV, cwd=cwd)
    os.close(w)
    proc.stdin.write(json.dumps({"code": code, "event": event, "language": language}).encode())
    proc.stdin.close()
    return proc, r


def read_all(fd):
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def run(argv, code, event=None, language=None, check=False, timeout=20):
    """Run one request to the end; returns (result document or None, stdout, stderr, rc)."""
    proc, r = start(argv, code, event, language, check)
    box = {}
    reader = threading.Thread(target=lambda: box.setdefault("result", read_all(r)))
    reader.start()
    out, err = (b.decode() for b in (proc.stdout.read(), proc.stderr.read()))
    rc = proc.wait(timeout)
    reader.join(timeout)
    raw = box.get("result", b"")
    return (json.loads(raw) if raw else None), out, err, rc


def ok(argv, code, event=None, language=None):
    """Run code that must succeed; returns (result, stdout)."""
    res, out, err, rc = run(argv, code, event, language)
    assert rc == 0 and res is not None and res["ok"], (res, out, err, rc)
    return res, out


def fail(argv, code, event=None, language=None, check=False):
    """Run code that must fail; returns the error object."""
    res, out, err, rc = run(argv, code, event, language, check)
    assert rc == 0 and res is not None and res["ok"] is False, (res, out, err, rc)
    return res["error"]


def ts(code, event=None):
    return ok(NODE, code, event, "typescript")


@pytest.mark.parametrize("language", ["python", "javascript"])
def test_cold_flag_changes_nothing_a_call_sees(language):
    """--cold (the server starts a wrapper for a call already waiting): output, its order
    and the result are as for a pre-started wrapper; node opens stdout/stderr on first use."""
    argv, code = {
        "python": (PYTHON, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n"
                           "sys.stdout.write('more\\n')\nreturn event['a'] + 1"),
        "javascript": (NODE, "console.log('out'); console.error('err'); process.stdout.write('more\\n');"
                             " return event.a + 1"),
    }[language]
    for extra in ([], ["--cold"]):
        res, out, err, rc = run(argv + extra, code, {"a": 41}, language)
        assert (res, out, err, rc) == ({"ok": True, "value": 42}, "out\nmore\n", "err\n", 0)
    res, out, err, rc = run(argv + ["--cold"], "return 1", None, language)
    assert (res, out, err, rc) == ({"ok": True, "value": 1}, "", "", 0)


# ------------------------------------------------------------------ values (both)

@pytest.mark.parametrize("argv,code,value", [
    (PYTHON, "return 42", 42),
    (PYTHON, "return 2.5", 2.5),
    (PYTHON, "return 'hé\\u2028'", "hé\u2028"),
    (PYTHON, "return [1, 'a', None]", [1, "a", None]),
    (PYTHON, "return {'a': {'b': [True, False]}}", {"a": {"b": [True, False]}}),
    (PYTHON, "return True", True),
    (PYTHON, "return False", False),
    (PYTHON, "return ''", ""),
    (PYTHON, "return 10**30", 10**30),
    (NODE, "return 42", 42),
    (NODE, "return 2.5", 2.5),
    (NODE, "return 'hé\\u2028'", "hé\u2028"),
    (NODE, "return [1, 'a', null]", [1, "a", None]),
    (NODE, "return {a: {b: [true, false]}}", {"a": {"b": [True, False]}}),
    (NODE, "return true", True),
    (NODE, "return false", False),
    (NODE, "return null", None),
    (NODE, "return ''", ""),
], ids=lambda v: v if isinstance(v, str) else None)
def test_return_values(argv, code, value):
    res, _ = ok(argv, code)
    assert res == {"ok": True, "value": value}


@pytest.mark.parametrize("argv,code", [
    (PYTHON, "x = 1"), (PYTHON, "return"), (PYTHON, "return None"), (PYTHON, "# only a comment"),
    (NODE, "let x = 1"), (NODE, "return"), (NODE, "return undefined"), (NODE, "// only a comment"),
])
def test_no_return_leaves_value_absent(argv, code):
    res, _ = ok(argv, code)
    assert res == {"ok": True}


@pytest.mark.parametrize("argv,code", [
    (PYTHON, "print('{\"ok\": false, \"value\": 1}')\nprint('[1, 2]')"),
    (NODE, "console.log('{\"ok\": false, \"value\": 1}')\nconsole.log('[1, 2]')"),
])
def test_printed_json_is_never_the_result(argv, code):
    res, out = ok(argv, code)
    assert res == {"ok": True}
    assert out == '{"ok": false, "value": 1}\n[1, 2]\n'
    res, out = ok(argv, code + "\nreturn 'real'")
    assert res["value"] == "real" and out.endswith("[1, 2]\n")


@pytest.mark.parametrize("argv,code", [
    (PYTHON, "return [event, input]"),
    (NODE, "return [event, input]"),
])
def test_event_and_input_are_both_bound(argv, code):
    event = {"a": 3, "b": [1, "x"], "c": None}
    assert ok(argv, code, event)[0]["value"] == [event, event]
    assert ok(argv, code, None)[0]["value"] == [None, None]


@pytest.mark.parametrize("argv,code", [
    (PYTHON, "for i in range(5): return f'Line {i}'"),
    (NODE, "for (let i = 0; i < 5; i++) return `Line ${i}`"),
])
def test_return_inside_loop(argv, code):
    assert ok(argv, code)[0]["value"] == "Line 0"


@pytest.mark.parametrize("argv,code", [
    (PYTHON, 's = """first\n    indented\n\ttab\n  """\nreturn s'),
    (NODE, 'const s = `first\n    indented\n\ttab\n  `\nreturn s'),
])
def test_multiline_string_is_intact(argv, code):
    assert ok(argv, code)[0]["value"] == "first\n    indented\n\ttab\n  "


@pytest.mark.parametrize("argv", [PYTHON, NODE], ids=["python", "node"])
def test_print_streams_line_by_line(argv):
    """A printed line can be read while the function is still running."""
    if argv is PYTHON:
        code = "import time\nprint('first')\ntime.sleep(1)\nprint('second')\nreturn 'done'"
    else:
        code = ("console.log('first')\nawait new Promise(r => setTimeout(r, 1000))\n"
                "console.log('second')\nreturn 'done'")
    proc, r = start(argv, code)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    assert sel.select(timeout=10), "no output within 10 s"
    line = proc.stdout.readline()
    assert line == b"first\n"
    assert proc.poll() is None, "the line only arrived once the process had finished"
    rest = proc.stdout.read()
    assert proc.wait(10) == 0 and rest == b"second\n"
    assert json.loads(read_all(r)) == {"ok": True, "value": "done"}
    proc.stderr.close()


# ------------------------------------------------------------------ Python

def test_python_exception_has_user_line_numbers():
    err = fail(PYTHON, "x = 1\ny = 0\nreturn x / y")
    assert err["type"] == "ZeroDivisionError" and err["message"] == "division by zero"
    assert err["line"] == 3
    assert 'File "function.py", line 3' in err["stack"] and "return x / y" in err["stack"]
    assert "python.py" not in err["stack"]


def test_python_exception_in_nested_function_blames_innermost_line():
    err = fail(PYTHON, "def f(d):\n    return d['missing']\n\nreturn f({})")
    assert err["type"] == "KeyError" and err["line"] == 2
    assert 'line 4, in __main' in err["stack"] and 'line 2, in f' in err["stack"]


def test_python_top_level_await():
    code = "import asyncio\nawait asyncio.sleep(0.01)\nreturn [x async for x in gen()] if False else event['n']"
    assert ok(PYTHON, code, {"n": 7})[0]["value"] == 7
    err = fail(PYTHON, "import asyncio\nawait asyncio.sleep(0)\nraise ValueError('late')")
    assert err["line"] == 3 and "asyncio" not in err["stack"]


def test_python_await_only_inside_nested_def_stays_sync():
    code = "import asyncio\nasync def f():\n    await asyncio.sleep(0)\n    return 5\nreturn asyncio.run(f())"
    assert ok(PYTHON, code)[0]["value"] == 5


def test_python_future_import():
    code = "from __future__ import annotations\ndef f(x: Undefined) -> int: pass\nreturn f.__annotations__"
    assert ok(PYTHON, code)[0]["value"] == {"x": "Undefined", "return": "int"}
    err = fail(PYTHON, "x = 1\nfrom __future__ import annotations", check=True)
    assert err["type"] == "SyntaxError" and err["line"] == 2 and "__future__" in err["message"]


def test_python_globals_are_fresh():
    names = ok(PYTHON, "return sorted(globals())")[0]["value"]
    assert set(names) <= {"__name__", "__builtins__", "__file__"}
    assert ok(PYTHON, "return __name__")[0]["value"] == "__main__"


@pytest.mark.parametrize("code,value", [
    ("return {1}", [1]),
    ("return float('nan')", None),
    ("return [float('inf'), -float('inf'), 1.5]", [None, None, 1.5]),
    ("return {(1, 2): 3, None: 4}", {"(1, 2)": 3, "null": 4}),
    ("import datetime\nreturn datetime.date(2024, 1, 2)", "2024-01-02"),
    ("return b'ab'", "b'ab'"),
])
def test_python_non_serialisable_values(code, value):
    assert ok(PYTHON, code)[0]["value"] == value


def test_python_circular_value_is_an_error():
    err = fail(PYTHON, "a = []\na.append(a)\nreturn a")
    assert "circular" in err["message"]


def test_python_sys_exit():
    assert ok(PYTHON, "import sys\nprint('x')\nsys.exit(0)")[0] == {"ok": True}
    assert ok(PYTHON, "exit()")[0] == {"ok": True}
    err = fail(PYTHON, "import sys\nsys.exit(3)")
    assert err["type"] == "SystemExit" and err["line"] == 2 and "3" in err["message"]


def test_python_exits_without_waiting_for_threads():
    start_t = time.monotonic()
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nreturn 1"
    assert ok(PYTHON, code)[0]["value"] == 1
    assert time.monotonic() - start_t < 10


@pytest.mark.parametrize("code,line", [
    ("x = 1\ny = (1,\nz = 2 +", 2),
    ("return 1\n  x = 2", 2),
    ("x = 1\nx x", 2),
    ("def f():\n    nonlocal q\n", 2),
])
def test_python_check_reports_syntax_errors(code, line):
    err = fail(PYTHON, code, check=True)
    assert err["type"] in ("SyntaxError", "IndentationError") and err["line"] == line, err
    assert err["message"]
    # The same error when the code is run without a check.
    assert fail(PYTHON, code)["line"] == line


def test_python_check_does_not_run_the_code():
    res, out, err, rc = run(PYTHON, "print('ran')\nraise SystemExit(4)\nreturn await x", check=True)
    assert res == {"ok": True} and out == "" and rc == 0


# ------------------------------------------------------------------ JavaScript

def test_js_exception_has_user_line_numbers():
    err = fail(NODE, "const a = 1\n\nnull.x")
    assert err["type"] == "TypeError" and err["line"] == 3
    assert "function.js:3:" in err["stack"] and "node.js" not in err["stack"]
    err = fail(NODE, "throw new RangeError('first line')")
    assert err == {"type": "RangeError", "message": "first line", "line": 1,
                   "stack": err["stack"]} and "function.js:1:" in err["stack"]


def test_js_thrown_non_error():
    err = fail(NODE, "throw 'plain'")
    assert err["message"] == "plain" and err["line"] is None
    assert "a: 1" in fail(NODE, "await Promise.reject({a: 1})")["message"]


def test_js_top_level_await_and_builtins():
    code = ("const os = require('os')\nconst {join} = await import('node:path')\n"
            "await new Promise(r => setTimeout(r, 10))\n"
            "return [typeof os.cpus, join('a', 'b'), Buffer.from('hi').toString('hex'), typeof process.pid]")
    assert ok(NODE, code)[0]["value"] == ["function", "a/b", "6869", "number"]


def test_js_unhandled_rejection_is_the_error():
    err = fail(NODE, "Promise.reject(new Error('lost'))\nawait new Promise(r => setTimeout(r, 200))\nreturn 1")
    assert err["message"] == "lost" and err["line"] == 1


def test_js_uncaught_exception_in_timer_is_the_error():
    err = fail(NODE, "setTimeout(() => {\n  throw new Error('in timer')\n}, 10)\n"
                     "await new Promise(r => setTimeout(r, 500))")
    assert err["message"] == "in timer" and err["line"] == 2


def test_js_exits_promptly_with_pending_timers():
    start_t = time.monotonic()
    res, _ = ok(NODE, "setInterval(() => console.log('tick'), 100000)\nsetTimeout(() => {}, 100000)\nreturn 'x'")
    assert res["value"] == "x" and time.monotonic() - start_t < 10


def test_js_promise_that_never_settles():
    err = fail(NODE, "await new Promise(() => {})")
    assert "never" in err["message"]


def test_js_process_exit():
    assert ok(NODE, "console.log('x')\nprocess.exit(0)")[0] == {"ok": True}
    err = fail(NODE, "process.exit(3)")
    assert "3" in err["message"]


@pytest.mark.parametrize("code,value", [
    ("return 10n ** 20n", "100000000000000000000"),
    ("return [NaN, Infinity, 1]", [None, None, 1]),
    ("return {d: new Date(0), f() {}, u: undefined}", {"d": "1970-01-01T00:00:00.000Z"}),
    ("return Symbol('s')", "Symbol(s)"),
])
def test_js_non_serialisable_values(code, value):
    assert ok(NODE, code)[0]["value"] == value


def test_js_circular_value_is_an_error():
    err = fail(NODE, "const a = {}\na.a = a\nreturn a")
    assert "circular" in err["message"]


@pytest.mark.parametrize("code,line", [
    ("let x = 1\nx x", 2),
    ("const a = {\n\n  b: 1,,\n}", 3),
    ("const a = 1\nconst a = 2", 2),
])
def test_js_check_reports_syntax_errors(code, line):
    err = fail(NODE, code, check=True)
    assert err["type"] == "SyntaxError" and err["line"] == line, err
    assert err["message"]
    assert fail(NODE, code)["line"] == line


def test_js_unfinished_code_is_reported_at_its_end():
    for check in (True, False):
        err = fail(NODE, "const a = 1\nreturn a +", check=check)
        assert err["type"] == "SyntaxError" and err["line"] == 2 and err["message"] == "Unexpected end of input"
        assert "__main" not in err["stack"]


def test_js_first_line_positions_hide_the_header():
    err = fail(NODE, "return JSON.parse('{')")
    assert "function.js:1:13)" in err["stack"], err["stack"]
    err = fail(NODE, "x x", check=True)
    assert err["stack"].startswith("function.js:1\nx x\n  ^\n"), err["stack"]


def test_js_check_does_not_run_the_code():
    res, out, err, rc = run(NODE, "console.log('ran')\nprocess.exit(4)", check=True)
    assert res == {"ok": True} and out == "" and rc == 0


# ------------------------------------------------------------------ TypeScript

@needs_esbuild
def test_ts_types_enums_and_await():
    code = ("interface User { name: string; age: number }\n"
            "enum Kind { A = 'a', B = 'b' }\n"
            "const users: User[] = event.users\n"
            "await new Promise<void>(r => setTimeout(r, 5))\n"
            "const v = { n: users.length, k: Kind.B } satisfies Record<string, unknown>\n"
            "return v")
    assert ts(code, {"users": [{"name": "a", "age": 1}]})[0]["value"] == {"n": 1, "k": "b"}


@needs_esbuild
def test_ts_stack_has_typescript_line_numbers():
    # Types and blank lines disappear from the JavaScript, so its lines differ.
    code = ("type A = {\n  x: number\n}\ninterface B {\n  y: string\n}\n\n"
            "const a: A = { x: 1 }\nthrow new Error('ts line ' + a.x)")
    err = fail(NODE, code, language="typescript")
    assert err["message"] == "ts line 1" and err["line"] == 9
    assert "function.ts:9:" in err["stack"] and "node.js" not in err["stack"]


@needs_esbuild
@pytest.mark.parametrize("unhook", ["Error.prepareStackTrace = undefined",
                                    "delete (Error as any).prepareStackTrace",
                                    "Error.prepareStackTrace = (e: any, s: any) => String(e) + '\\n    at ' + s.join('\\n    at ')"])
def test_ts_error_lines_survive_user_code_replacing_the_stack_hook(unhook):
    code = f"{unhook}\nconst n: number = 2\nthrow new Error('n=' + n)"
    err = fail(NODE, code, language="typescript")
    assert err["line"] == 3 and "function.ts:3:7" in err["stack"], err
    assert "function.js" not in err["stack"], err


@needs_esbuild
def test_ts_first_line_column():
    err = fail(NODE, "throw new Error('x')", language="typescript")
    assert "function.ts:1:7)" in err["stack"] and err["line"] == 1



@needs_esbuild
def test_ts_printed_stack_and_caught_errors_are_mapped_too():
    # The map is read when a stack is formatted, whoever formats it.
    code = ("type T = { n: number }\n\n"
            "function bad(t: T): never { throw new RangeError('n=' + t.n) }\n"
            "try { bad({ n: 2 }) } catch (e) { console.log((e as Error).stack) }\n"
            "const o: { stack?: string } = {}\n"
            "Error.captureStackTrace(o)\n"
            "console.log(o.stack)\n"
            "return 1")
    res, out = ts(code)
    assert res == {"ok": True, "value": 1}
    caught, captured = out.split("\n", 1)[0], out.split("Error\n", 1)[1]
    assert caught == "RangeError: n=2"
    assert "function.ts:3:35)" in out and "function.ts:4:7)" in out
    assert "function.ts:6:7)" in captured and "function.js" not in out

@needs_esbuild
def test_ts_printed_json_and_no_return():
    res, out = ts("const o: {a: number} = {a: event.a + 1}\nconsole.log(JSON.stringify(o))", {"a": 1})
    assert res == {"ok": True} and out == '{"a":2}\n'


@needs_esbuild
def test_ts_check_compiles_transpiled_code():
    res, out, err, rc = run(NODE, transpile("const x: number = 1\nreturn x"), language="typescript", check=True)
    assert res == {"ok": True}
