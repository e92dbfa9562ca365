"""A minimal seed-like Python wrapper (bench only): the per-call work go-faas did.

Reads one JSON request {"code": <function body>, "input": <JSON text>} from stdin, wraps
the body in a function by re-indenting it line by line (as the seed did), runs it with
`event` and `input` bound to the parsed input and prints the result as one JSON line.
Written for the benchmark from the seed's documented behaviour; not the seed's code.
"""
import json
import sys


def main():
    request = json.loads(sys.stdin.read())
    event = json.loads(request.get("input") or "{}")
    source = "def __main(event, input):\n" + "".join(
        "    " + line + "\n" for line in request["code"].splitlines())
    scope = {}
    exec(compile(source, "function.py", "exec"), scope)
    result = scope["__main"](event, event)
    if result is not None:
        print(json.dumps(result))


main()
