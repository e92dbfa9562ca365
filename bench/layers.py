#!/usr/bin/env python3
"""faas libraries benchmark (issue 10): what a layer costs a call and an upload.

    python3 bench/layers.py [--quick] [--samples N] [--json FILE]

Standard library only; run as root (per-run cgroups), with the index reachable (pandas
comes from it). Starts faas.py servers on free loopback ports with SQLite stores under a
temporary directory the sandbox user can reach, and measures in one run:

  warm        p50 of POST /run of `import pandas; return pandas.__version__`, served by the
              layer's warm sandboxes (each call waits until one is idle again, as between
              real calls), against p50 of a trivial Python call on the same server
              target: warm <= 1.5 x trivial
  cold        p50 of the same call on a server without any pre-started sandbox
              (FAAS_POOL_SIZE=0, FAAS_DEPS_WARM=0), against p50 of a bare
              `python3 -I -c "import pandas"` in the same sandbox (faas's Sandbox
              class, same flags, cgroup and limits, the layer on sys.path)
              target: cold <= 1.1 x bare
  upload      p50 of an upload whose layer is cached, minus the resolution time it reports
              (resolve_ms), against p50 of the same upload without requirements
              target: the difference <= 1 ms
  stdlib      p50 of a trivial Python call on a server of this branch without library
              functions against the same on the faas.py of `git show main:` (both pool
              on), interleaved
              target: this / main <= 1.05

Series are interleaved in rounds so drift hits them alike. Prints every figure and the
ratios with PASS/MISS; exit 1 only when something broke (a wrong answer, a dead server).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PANDAS_VERSION = "3.1.1"
PANDAS = f"pandas=={PANDAS_VERSION}"
PANDAS_CODE = "import pandas\nreturn pandas.__version__"
TRIVIAL = "return event['a'] + 1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, name: str, root: Path, faas_py: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.log = root / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FAAS_", "REDIS_"))}
        full = {**base, "HTTP_PORT": str(self.port), "FAAS_DATA_DIR": str(root / f"data-{name}"), **env}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(faas_py)], env=full, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=faas_py.parent)
        self.conn: http.client.HTTPConnection | None = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                self.conn = None
            time.sleep(0.1)
        raise SystemExit(f"{name} did not start:\n{self.log.read_text()[-2000:]}")

    def request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, Any]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = json.dumps(body).encode() if body is not None else None
        try:
            self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return response.status, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        try:
            status, answer = self.request(method, path, body)
        except (OSError, http.client.HTTPException):   # an idle keep-alive the server closed
            status, answer = self.request(method, path, body)
        if status != 200:
            raise SystemExit(f"{self.name}: {method} {path} -> {status} {answer}")
        return answer

    def warm_idle(self) -> int:
        warm = self.ok("GET", "/healthz").get("libraries", {}).get("warm", {})
        return sum(state["idle"] for state in warm.values())

    def pool_idle(self) -> int:
        return self.ok("GET", "/healthz")["pool"]["python"]["idle"]

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for pre-started sandboxes")
        time.sleep(0.02)


def timed(call: Callable[[], Any]) -> float:
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


def interleave(series: dict[str, tuple[Callable[[], None], Callable[[], Any]]], samples: int,
               rounds: int, settle: float) -> dict[str, list[float]]:
    """{name: (prepare, call)}: each round takes samples/rounds of every series in turn.
    Before each call, untimed: `prepare` (e.g. wait for an idle pre-started sandbox), then
    `settle` seconds, the same for every series, so that the replacement sandboxes started
    after the previous call (a warm one imports pandas for ~0.3 s) are ready and quiet."""
    results: dict[str, list[float]] = {name: [] for name in series}
    for _ in range(rounds):
        for name, (prepare, call) in series.items():
            for _ in range(max(1, samples // rounds)):
                prepare()
                time.sleep(settle)
                results[name].append(timed(call))
    return results


def bare_pandas_in_sandbox(layer: Path, data_dir: Path) -> Callable[[], None]:
    """`python3 -I -c "import pandas; ..."` through faas's own Sandbox: the same argv
    (layer store bound), gate, cgroup and limits as a cold call, minus the wrapper."""
    sys.path.insert(0, str(REPO))
    import faas
    config = faas.Config.from_env({"FAAS_DATA_DIR": str(data_dir)})
    backend = faas.choose_limit_backend(config)
    runtime_dir = Path(tempfile.mkdtemp(prefix="faas-bench-runtime-"))
    sandbox = faas.Sandbox(config, backend, runtime_dir, layer.parent)
    limits = faas.Limits.from_config(config)
    inside = f"{faas.LAYERS_IN_SANDBOX}/{layer.name}/site"
    script = f"import sys; sys.path.append({inside!r}); import pandas; print(pandas.__version__)"

    def call() -> None:
        outcome = sandbox.run(["/usr/bin/python3", "-I", "-c", script], b"", limits, result_fd=False)
        if outcome.exit_code != 0:
            raise SystemExit("bare pandas failed: " + outcome.stderr.decode()[-1000:])
    call.close = lambda: (backend.close(), shutil.rmtree(runtime_dir, ignore_errors=True))   # type: ignore[attr-defined]
    return call


def main_faas(root: Path) -> Path:
    """faas.py and wrappers of the main branch, for the stdlib-only baseline."""
    base = root / "main"
    (base / "wrappers").mkdir(parents=True)
    for name in ("faas.py", "wrappers/python.py", "wrappers/node.js"):
        text = subprocess.run(["git", "show", f"main:{name}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
        (base / name).write_text(text)
    return base / "faas.py"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples (smoke run)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between calls for pre-started sandboxes to be ready (1.0)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    samples = 8 if args.quick else args.samples
    rounds = 2 if args.quick else args.rounds
    print(f"load average at start: {open('/proc/loadavg').read().split()[:3]} (2-core box: other work moves figures)")
    root = Path(tempfile.mkdtemp(prefix="faas-bench-layers-", dir="/var/tmp"))
    root.chmod(0o755)
    servers: list[Server] = []
    figures: dict[str, Any] = {}
    bare = None
    try:
        warm = Server("warm", root, REPO / "faas.py", {})
        cold = Server("cold", root, REPO / "faas.py", {"FAAS_POOL_SIZE": "0", "FAAS_DEPS_WARM": "0"})
        plain = Server("plain", root, REPO / "faas.py", {})   # this branch, no library function
        baseline = Server("main", root, main_faas(root), {})
        servers += [warm, cold, plain, baseline]

        # Build once (timed), then the same lock is a cached layer for every other upload.
        up = warm.ok("POST", "/upload", {"path": "b/pandas", "language": "python", "code": PANDAS_CODE,
                                         "requirements": [PANDAS]})
        deps = up["dependencies"]
        figures["pandas_layer"] = {k: deps[k] for k in ("packages", "size", "build_ms", "resolve_ms", "cached")}
        print(f"pandas layer: {len(deps['packages'])} packages, {deps['size'] / 1e6:.1f} MB, built in "
              f"{deps['build_ms']} ms (cached: {deps['cached']}), resolved in {deps['resolve_ms']} ms")
        cold_up = cold.ok("POST", "/upload", {"path": "b/pandas", "language": "python", "code": PANDAS_CODE,
                                              "requirements": [PANDAS]})["dependencies"]
        print(f"cold server: built in {cold_up['build_ms']} ms")
        for server in servers:
            server.ok("POST", "/upload", {"path": "b/trivial", "language": "python", "code": TRIVIAL})

        def run(server: Server, path: str, expect: Any) -> Callable[[], None]:
            def call() -> None:
                answer = server.ok("POST", f"/run/{path}", {"input": {"a": 41}})
                if answer["data"] != expect:
                    raise SystemExit(f"{server.name} {path}: wrong answer {answer}")
            return call

        for server, path, expect in ((warm, "b/pandas", PANDAS_VERSION), (cold, "b/pandas", PANDAS_VERSION),
                                     (warm, "b/trivial", 42)):
            run(server, path, expect)()   # first calls: page cache, warm sandboxes registered
        layer = root / "data-cold" / "deps" / "layers" / cold_up["key"]
        bare = bare_pandas_in_sandbox(layer, root / "data-cold")
        nothing = lambda: None   # noqa: E731
        latency = interleave({
            "warm_pandas": (lambda: wait_for(lambda: warm.warm_idle() >= 1), run(warm, "b/pandas", PANDAS_VERSION)),
            "trivial": (lambda: wait_for(lambda: warm.pool_idle() >= 1), run(warm, "b/trivial", 42)),
            "cold_pandas": (nothing, run(cold, "b/pandas", PANDAS_VERSION)),
            "bare_pandas": (nothing, bare),
            "trivial_plain": (lambda: wait_for(lambda: plain.pool_idle() >= 1), run(plain, "b/trivial", 42)),
            "trivial_main": (lambda: wait_for(lambda: baseline.pool_idle() >= 1), run(baseline, "b/trivial", 42)),
        }, samples, rounds, args.settle)

        def upload_series(with_requirements: bool) -> Callable[[], None]:
            body = {"path": "b/up", "language": "python", "code": PANDAS_CODE}
            if with_requirements:
                body["requirements"] = [PANDAS]

            def call() -> None:
                answer = warm.ok("POST", "/upload", body)
                if with_requirements:
                    if not answer["dependencies"]["cached"]:
                        raise SystemExit("the pandas layer was not cached")
                    resolve.append(answer["dependencies"]["resolve_ms"])
            return call
        resolve: list[float] = []
        uploads = interleave({"upload_plain": (nothing, upload_series(False)),
                              "upload_cached": (nothing, upload_series(True))}, max(4, samples // 2), rounds,
                             args.settle / 4)
        p50 = {name: statistics.median(values) for name, values in {**latency, **uploads}.items()}
        beyond = statistics.median(t - r for t, r in zip(uploads["upload_cached"], resolve))
        for name, value in p50.items():
            print(f"p50 {name:<14} {value:8.2f} ms  (n={len({**latency, **uploads}[name])})")
        print(f"p50 resolve_ms      {statistics.median(resolve):8.2f} ms (pip --dry-run --report, network)")
        ratios = {
            "warm_pandas / trivial": (p50["warm_pandas"] / p50["trivial"], 1.5),
            "cold_pandas / bare_pandas": (p50["cold_pandas"] / p50["bare_pandas"], 1.1),
            "stdlib call: this / main": (p50["trivial_plain"] / p50["trivial_main"], 1.05),
        }
        for name, (ratio, target) in ratios.items():
            print(f"ratio {name:<28} {ratio:6.3f}  target <= {target:<5} {verdict(ratio <= target)}")
        extra = beyond - p50["upload_plain"]
        print(f"cached layer upload beyond resolution: {beyond:.2f} ms vs plain upload {p50['upload_plain']:.2f} ms "
              f"-> +{extra:.2f} ms  target <= 1 ms {verdict(extra <= 1)}")
        figures.update(p50=p50, ratios={k: v[0] for k, v in ratios.items()}, upload_extra_ms=extra)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        if bare is not None:
            bare.close()   # type: ignore[attr-defined]
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
