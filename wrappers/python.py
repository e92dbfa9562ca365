"""Run one faas Python function: the wrapper program started inside the sandbox.

    /usr/bin/python3 -I python.py [--check] [--cold] [RESULT_FD]

Protocol (see DESIGN.md, "Wrapper protocol"):
- stdin carries one JSON request {"code": str, "event": any, "language": "python"} and, for
  a function with secrets, "env": {name: value}, set in os.environ before the code runs;
  it is read to EOF only after every import, so a pool can pre-start this process.
- The code is a function body: `event` and `input` are both the parsed input and a
  top-level `return` gives the result. The body is parsed with `ast` and its statements
  are moved into a function node, so line numbers are the user's own and multi-line
  strings are untouched (no textual re-indentation). A body that awaits at its own level
  becomes an `async def` and runs on an asyncio event loop.
- The user's prints go to the real stdout/stderr, line-buffered, so they stream.
- Exactly one JSON document goes to RESULT_FD (default 3), never to stdout:
  {"ok": true, "value": v} ("value" absent when the function returned None) or
  {"ok": false, "error": {"type", "message", "stack", "line"}}.
- --check only compiles (the same transform) and writes {"ok": true} or the error.
- "layer" in the request (a version with libraries): its site/ directory is added with
  site.addsitedir (after the standard library, .pth files processed) before the code runs.
- --layer=DIR --preload=a,b (a warm sandbox of the pool): that is done, and the modules
  imported, before the request is read.
- --cold (the request is already waiting) changes nothing here: this wrapper prepares
  nothing ahead that a call might not need.
"""

# `_ast`, the C module behind `ast`, has every node class and compile() makes the tree:
# importing `ast` itself costs ~7 ms of every cold start. Likewise JSON goes through
# `_json`, the C scanner and encoder the `json` package is built on: importing `json`
# imports `re`, `enum` and `functools` and costs ~10 ms, a third of a trivial call's CPU
# here. traceback and linecache are imported only when there is an error to format.
import _ast as ast
import _json
import builtins
import math
import os
import sys

FILENAME = "function.py"  # what tracebacks show for the user's code
USER_CODE = None          # the request's code, for the source lines of tracebacks
FUNC_NAME = "__main"


def build(code):
    """Compile the user's body into a module that defines FUNC_NAME(event, input).

    Returns (code object, is_async). Raises SyntaxError (or ValueError for NUL bytes)."""
    tree = compile(code, FILENAME, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
    body = tree.body
    # `from __future__` imports must open the module, so leading ones are hoisted out of
    # the function (a docstring may precede them); a later one stays put and the
    # compiler reports it at the user's line.
    start = 1 if body and _is_docstring(body[0]) else 0
    end = start
    while end < len(body) and isinstance(body[end], ast.ImportFrom) and body[end].module == "__future__":
        end += 1
    future, body = body[start:end], body[:start] + body[end:]
    is_async = _awaits(body)
    kind = ast.AsyncFunctionDef if is_async else ast.FunctionDef
    at_start = dict(lineno=1, col_offset=0, end_lineno=1, end_col_offset=0)
    fields = dict(
        name=FUNC_NAME,
        args=ast.arguments(posonlyargs=[], args=[ast.arg("event", **at_start), ast.arg("input", **at_start)],
                           vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
        body=body or [ast.Pass(**at_start)],
        decorator_list=[],
        returns=None,
        **at_start,
    )
    if "type_params" in kind._fields:  # Python >= 3.12
        fields["type_params"] = []
    tree.body = future + [kind(**fields)]
    return compile(tree, FILENAME, "exec", dont_inherit=True), is_async


def _is_docstring(node):
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _awaits(body):
    """True when the statements await at their own level (not only inside nested defs),
    i.e. when the wrapping function has to be `async def`."""
    todo = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return True
        if isinstance(node, ast.comprehension) and node.is_async:
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            # Only defaults and decorators are evaluated in the enclosing scope.
            todo += node.args.defaults + [d for d in node.args.kw_defaults if d]
            todo += getattr(node, "decorator_list", [])
        elif isinstance(node, ast.ClassDef):
            todo += node.decorator_list + node.bases + [k.value for k in node.keywords]
        else:
            todo += _children(node)
    return False


def _children(node):
    """The nodes directly below node (what ast.iter_child_nodes gives)."""
    for name in node._fields:
        value = getattr(node, name, None)
        if isinstance(value, ast.AST):
            yield value
        elif isinstance(value, list):
            yield from (item for item in value if isinstance(item, ast.AST))


def run(code_obj, is_async, event):
    """Execute the compiled module in fresh globals and call the function."""
    user_globals = {"__name__": "__main__", "__builtins__": builtins, "__file__": FILENAME}
    exec(code_obj, user_globals)
    main = user_globals.pop(FUNC_NAME)  # keep the user's namespace clean
    if not is_async:
        return main(event, event)
    import asyncio  # only here: it costs 10-30 ms and a body that awaits imports it anyway
    # Not asyncio.run(): that waits for leftover executor threads after the function
    # returns; we exit right after answering, as the JavaScript wrapper does.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(main(event, event))


def error_result(exc):
    """The error document for an exception raised while building or running the code."""
    import linecache
    import traceback
    # Tracebacks read source lines through linecache; register the user's code there.
    if USER_CODE is not None:
        linecache.cache[FILENAME] = (len(USER_CODE), None, USER_CODE.splitlines(True), FILENAME)
    tb = exc.__traceback__
    # Drop the wrapper's (and asyncio's) frames in front of the first user frame.
    while tb is not None and tb.tb_frame.f_code.co_filename != FILENAME:
        tb = tb.tb_next
    exc.__traceback__ = tb
    line = None
    while tb is not None:  # the innermost user frame is the line to blame
        if tb.tb_frame.f_code.co_filename == FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None and isinstance(exc, SyntaxError):  # the user's code did not compile
        line = exc.lineno
        if exc.text is None and line:  # errors found in the AST carry no source text
            exc.text = linecache.getline(FILENAME, line) or None
    try:
        message = str(exc)
        if isinstance(exc, SyntaxError) and exc.msg:
            message = exc.msg
        stack = "".join(traceback.format_exception(exc))
    except Exception as e:  # a user __str__ that raises must not lose the answer
        message, stack = "<unprintable %s: %r>" % (type(exc).__name__, e), ""
    return {"ok": False, "error": {"type": type(exc).__name__, "message": message,
                                   "stack": stack, "line": line}}


class _DecodeOptions:
    """What `_json.make_scanner` reads its settings from (as json.JSONDecoder does)."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name):
        raise ValueError("%s is not valid JSON" % name)


_scan = _json.make_scanner(_DecodeOptions)


def loads(text):
    """Parse the server's request: one JSON document."""
    text = text.strip(" \t\n\r")
    value, end = _scan(text, 0)
    if end != len(text):
        raise ValueError("extra data after the request at offset %d" % end)
    return value


def dumps(value):
    """Compact, ASCII-only, strict JSON (no NaN/Infinity, cycles detected), as
    json.dumps(value, default=_default, allow_nan=False) would make it."""
    encode = _json.make_encoder({}, _default, _json.encode_basestring_ascii, None, ":", ",",
                                False, False, False)
    return "".join(encode(value, 0))


def dump(result):
    """Serialise a result document; always valid JSON (strict: no NaN/Infinity)."""
    try:
        return dumps(result)
    except Exception:
        # NaN/Infinity, non-string dict keys, a cycle or a failing __str__:
        # retry on a sanitised copy.
        pass
    try:
        return dumps(_sanitise(result, set()))
    except Exception as e:
        return dumps(error_result(TypeError("return value is not JSON-serialisable: %s" % e)))


def _default(obj):
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


def _sanitise(value, path):
    """Copy of value with non-finite floats as null and dict keys as strings.
    `path` holds the ids of containers being visited, to detect cycles."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in path:
            raise ValueError("circular reference")
        path.add(id(value))
        if isinstance(value, dict):
            out = {k if isinstance(k, (str, int, bool)) or k is None else str(k): _sanitise(v, path)
                   for k, v in value.items()}
        else:
            out = [_sanitise(v, path) for v in value]
        path.discard(id(value))
        return out
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return _sanitise(_default(value), path)


def write_result(fd, text):
    """Write the whole document to the result fd, then close it."""
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]
    os.close(fd)


def preload(argv):
    """A warm sandbox (--layer=DIR --preload=a,b): add the layer and import the modules the
    function will import, before its request arrives. A module that fails to import is
    left for the function's own import to report. Returns the layer, or None."""
    layer = next((a[len("--layer="):] for a in argv if a.startswith("--layer=")), None)
    if not layer:
        return None
    import site
    site.addsitedir(layer + "/site")
    names = next((a[len("--preload="):] for a in argv if a.startswith("--preload=")), "")
    for name in filter(None, names.split(",")):
        try:
            __import__(name)
        except BaseException:
            pass
    # Move what the imports created out of the cyclic collector's reach: otherwise the
    # call's first collections walk every object of pandas/numpy (milliseconds).
    import gc
    gc.collect()
    gc.freeze()
    return layer


def main(argv):
    check = "--check" in argv
    rest = [a for a in argv if not a.startswith("--")]
    fd = int(rest[0]) if rest else 3
    os.set_inheritable(fd, False)  # user subprocesses must not hold the result pipe open
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the fd was closed
            stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)

    preloaded = preload(argv)
    global USER_CODE
    request = loads(sys.stdin.buffer.read().decode())  # blocks until the server sends the request
    code = USER_CODE = request["code"]
    event = request.get("event")
    os.environ.update(request.get("env") or {})  # the function's secrets, for its own calls only
    sys.argv = [FILENAME]
    layer = request.get("layer")
    if layer and layer != preloaded:  # the version's libraries, a read-only tree bound into the sandbox
        import site
        site.addsitedir(layer + "/site")

    try:
        code_obj, is_async = build(code)
    except Exception as e:  # SyntaxError; also ValueError (NUL bytes), RecursionError
        if isinstance(e, ValueError):
            e = SyntaxError(str(e))
        result = error_result(e)
    else:
        result = {"ok": True}
        if not check:
            try:
                value = run(code_obj, is_async, event)
                if value is not None:
                    result["value"] = value
            except SystemExit as e:
                # exit()/sys.exit()/sys.exit(0) mean "done, nothing returned" (the answer
                # then comes from the printed output); any other code or a message is an
                # error. Either way a result is written and the wrapper exits 0, so the
                # server can treat "no result" as a crash (os._exit, a signal, OOM).
                if e.code not in (None, 0):
                    result = error_result(e)
                    result["error"]["message"] = "exit(%r)" % (e.code,)
            except BaseException as e:
                result = error_result(e)

    text = dump(result)
    # Everything the function printed is handed to the kernel before the result, so when
    # the server sees the result the output is already waiting in the stdout/stderr pipes.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    write_result(fd, text)
    # Closing the result pipe wakes the server with a "sync" wake-up, which lets the
    # scheduler move the server's thread onto this CPU on the hint that this process is
    # about to sleep. It exits instead, and an exit tearing down the pages a forked call
    # shares with the zygote held the server's answer up by ~0.6 ms in 4 calls of 10
    # (measured: bench/zygote.py's isolated call). Yielding lets the server run first.
    os.sched_yield()
    # Leave at once: no waiting for non-daemon threads or atexit handlers of the user.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
