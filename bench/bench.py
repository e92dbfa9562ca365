#!/usr/bin/env python3
"""faas benchmark: pool on/off latency against a seed-like cold pipeline, throughput, memory.

    python3 bench/bench.py [--quick] [--samples N] [--calls N] [--json FILE]

Standard library only. Starts two faas.py servers on free loopback ports (SQLite stores in
a temporary directory): one with the default pool, one with FAAS_POOL_SIZE=0. Uploads one
trivial function per language and measures, in one run:

  latency     p50/p99 of POST /run/<path> over a keep-alive http.client connection, pool
              on and off, Python/JavaScript/TypeScript; a pause (--pause, 50 ms) between
              calls lets the pool refill, as between real calls
  seed-like   the seed's per-call pipeline: a cold bwrap with the seed's flags (see
              README.md) + interpreter + a minimal wrapper reading JSON on stdin; for
              TypeScript an esbuild transform inside the sandbox on every call
  bare        /usr/bin/python3 -I -c pass, /usr/bin/node -e 0 (no sandbox, env cleared)
  throughput  8 keep-alive clients against the pool-on server (Python) versus the
              cold-spawn limit: 2 loops spawning the seed-like pipeline back to back
  memory      server RSS idle and every --sample-every calls over --calls calls

Series are measured in interleaved rounds so drift hits them alike. Prints one line per
figure, the ratios the targets name with PASS/MISS. A MISS does not fail the run; wrong
answers, HTTP errors or a dead server do (exit 1).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAAS = REPO / "faas.py"
ESBUILD = REPO / "node_modules/@esbuild/linux-x64/bin/esbuild"
PYTHON = "/usr/bin/python3"
NODE = "/usr/bin/node"
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

LANGUAGES = ("python", "javascript", "typescript")
SHORT = {"python": "py", "javascript": "js", "typescript": "ts"}
# The same trivial function in each language; input {"a": 41} -> 42.
CODE = {
    "python": 'return event["a"] + 1',
    "javascript": "return event.a + 1",
    "typescript": "const a: number = event.a;\nreturn a + 1;",
}
EVENT = {"a": 41}
EXPECTED = 42

# The seed's sandbox (research/seed-api.md, research/sandbox.md): separate mount, net, pid,
# ipc, uts namespaces, capabilities dropped, read-only /usr, the wrapper bound in, no
# seccomp, no user namespace (the seed's bwrap ran as the invoking user), no per-run
# cgroup. The seed also went through `systemd-run --scope` (~12 ms per call here) and did
# not clear the environment; both are left out, which makes this baseline faster than the
# real seed (so the ratios below are conservative).
SEED_BWRAP = [
    "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
    "--die-with-parent", "--cap-drop", "ALL",
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
    "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
    "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    "--ro-bind", str(HERE), "/seed",
    "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/tmp", "--chdir", "/tmp",
]


class BenchError(Exception):
    """Something broke (not a missed target): the run exits 1."""


# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def p50(values: list[float]) -> float:
    return statistics.median(values)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


# ------------------------------------------------------------------------------------------
# servers and clients
# ------------------------------------------------------------------------------------------

def rss_kib(pid: int) -> tuple[int, int]:
    """VmRSS (KiB) and thread count of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["VmRSS"][0]), int(fields["Threads"][0])


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user+system) of a process itself, without its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """One faas.py process on a free loopback port, its log in the temp dir."""

    def __init__(self, name: str, pool_size: int | None, root: Path, python: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REDIS_", "FAAS_", "HTTP_PORT", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(HTTP_PORT="0", FAAS_HOST="127.0.0.1", FAAS_DATA_DIR=str(self.dir / "data"))
        if pool_size is not None:
            env["FAAS_POOL_SIZE"] = str(pool_size)
        env.update(extra_env or {})
        self.log_path = self.dir / "server.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([python, str(FAAS)], cwd=self.dir, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self.wait_listening()

    def wait_listening(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"server {self.name} did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def client(self) -> "Client":
        return Client(self.port)

    def health(self) -> dict[str, Any]:
        status, body = self.client().request("GET", "/healthz")
        if status != 200:
            raise BenchError(f"server {self.name}: /healthz answered {status}: {body}")
        return body

    def wait_pool_full(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pool = self.health().get("pool", {})
            if all(p["idle"] >= p["size"] for p in pool.values()):
                return
            time.sleep(0.05)

    def pool_stats(self) -> dict[str, tuple[int, int]]:
        return {name: (p["hits"], p["misses"]) for name, p in self.health().get("pool", {}).items()}

    def upload(self) -> None:
        client = self.client()
        for language in LANGUAGES:
            status, body = client.request("POST", "/upload", {
                "path": f"bench/{SHORT[language]}", "language": language, "code": CODE[language]})
            if status != 200:
                raise BenchError(f"server {self.name}: upload {language} answered {status}: {body}")

    def rss(self) -> tuple[int, int]:
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Client:
    """A keep-alive HTTP/1.1 client; reconnects once if the server closed the connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.reconnects = 0

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, data, headers)
                response = self.conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                self.conn.close()
                self.reconnects += 1
                if attempt:
                    raise
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def run(self, path: str) -> None:
        """One call of the trivial function; BenchError unless it answered 42."""
        status, body = self.request("POST", f"/run/{path}", {"input": EVENT})
        if status != 200 or not isinstance(body, dict) or body.get("data") != EXPECTED:
            raise BenchError(f"POST /run/{path} answered {status}: {str(body)[:300]}")

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------------------------------
# cold pipelines
# ------------------------------------------------------------------------------------------

def seed_argv(language: str) -> list[str]:
    if language == "python":
        return [*SEED_BWRAP, "--", PYTHON, "/seed/seed_wrapper.py"]
    if language == "javascript":
        return [*SEED_BWRAP, "--", NODE, "/seed/seed_wrapper.js"]
    return [*SEED_BWRAP, "--ro-bind", str(ESBUILD), "/seed-esbuild", "--",
            NODE, "/seed/seed_wrapper.js", "--ts", "/seed-esbuild"]


def seed_call(language: str) -> Callable[[], None]:
    argv = seed_argv(language)
    request = json.dumps({"code": CODE[language], "input": json.dumps(EVENT)}).encode()

    def call() -> None:
        done = subprocess.run(argv, input=request, capture_output=True, env=CLEAN_ENV, timeout=60)
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        if done.returncode != 0 or not lines or lines[-1] != str(EXPECTED):
            raise BenchError(f"seed-like {language} failed ({done.returncode}): "
                             f"{done.stdout[-300:]!r} {done.stderr[-300:]!r}")
    return call


def bare_call(argv: list[str]) -> Callable[[], None]:
    def call() -> None:
        done = subprocess.run(argv, capture_output=True, env=CLEAN_ENV, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-300:]!r}")
    return call


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------

class Series:
    def __init__(self, key: str, label: str, call: Callable[[], None], server: Server | None = None,
                 pool: str | None = None) -> None:
        self.key, self.label, self.call, self.server, self.pool = key, label, call, server, pool
        self.samples: list[float] = []
        self.round_p50: list[float] = []
        self.hits = self.misses = 0


def measure_latency(series: list[Series], samples: int, rounds: int, pause: float, warmup: int) -> None:
    for s in series:
        for _ in range(warmup):
            s.call()
            time.sleep(pause)
    per_round = max(1, samples // rounds)
    for r in range(rounds):
        for s in series:
            before = s.server.pool_stats().get(s.pool) if s.server and s.pool else None
            if s.server:
                s.server.wait_pool_full(timeout=2)
            times = []
            for _ in range(per_round):
                began = time.perf_counter()
                s.call()
                times.append((time.perf_counter() - began) * 1000)
                time.sleep(pause)
            s.samples += times
            s.round_p50.append(p50(times))
            if before is not None:
                after = s.server.pool_stats()[s.pool]
                s.hits += after[0] - before[0]
                s.misses += after[1] - before[1]
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


def run_clients(server: Server, path: str, clients: int, until: Callable[[int], bool]) -> dict[str, Any]:
    """`clients` threads, each with its own keep-alive connection, calling until `until(total)`."""
    lock = threading.Lock()
    state = {"ok": 0, "errors": 0, "first_error": None, "latencies": []}

    def worker() -> None:
        client = server.client()
        try:
            while True:
                with lock:
                    if until(state["ok"] + state["errors"]):
                        return
                began = time.perf_counter()
                try:
                    client.run(path)
                    ok = True
                except Exception as error:   # counted, reported, run exits 1
                    ok = False
                    with lock:
                        state["first_error"] = state["first_error"] or str(error)[:300]
                took = (time.perf_counter() - began) * 1000
                with lock:
                    state["ok" if ok else "errors"] += 1
                    state["latencies"].append(took)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state["elapsed"] = time.monotonic() - began
    return state


def cold_spawn_limit(language: str, loops: int, seconds: float) -> dict[str, Any]:
    call = seed_call(language)
    counts = [0] * loops
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                call()
                counts[i] += 1
            except Exception as error:
                errors.append(str(error)[:300])

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(loops)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"spawns": sum(counts), "elapsed": time.monotonic() - began, "errors": errors}


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True, env=CLEAN_ENV).stdout.strip()
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": str(os.cpu_count()), "kernel": platform.release(), "cpu": cpu,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": subprocess.run([PYTHON, "--version"], capture_output=True, text=True).stdout.strip(),
            "node": node, "bwrap": bwrap}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 1 min): few samples, short runs")
    parser.add_argument("--samples", type=int, help="latency samples per series (200)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds the samples are split into (4)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between latency calls (0.05)")
    parser.add_argument("--duration", type=float, help="seconds of each throughput run (10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput (8)")
    parser.add_argument("--calls", type=int, help="calls of the memory run (10000)")
    parser.add_argument("--sample-every", type=int, help="RSS sample interval in calls (1000)")
    parser.add_argument("--server-python", default=PYTHON if os.access(PYTHON, os.X_OK) else sys.executable,
                        help="interpreter running faas.py (/usr/bin/python3, as faas.service)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="profile the pool-on server with py-spy (if installed) during the "
                             "throughput run; collapsed stacks go to FILE")
    args = parser.parse_args(argv)
    quick = args.quick
    args.samples = args.samples or (20 if quick else 200)
    args.rounds = args.rounds or (2 if quick else 4)
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.calls = args.calls or (200 if quick else 10_000)
    args.sample_every = args.sample_every or (50 if quick else 1000)
    return args


def check_prerequisites() -> None:
    missing = [name for name, ok in (
        ("bwrap", shutil.which("bwrap")), (PYTHON, os.access(PYTHON, os.X_OK)),
        (NODE, os.access(NODE, os.X_OK)), (str(ESBUILD), ESBUILD.is_file())) if not ok]
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + " (see bench/README.md, set-up)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    m = results["machine"]
    print(f"machine  nproc={m['nproc']} kernel={m['kernel']} cpu={m['cpu']!r} {m['python']} "
          f"node {m['node']} {m['bwrap']} date={m['date']}")
    print(f"settings samples={args.samples} rounds={args.rounds} pause={args.pause * 1000:.0f}ms "
          f"throughput={args.duration:g}s clients={args.clients} memory-calls={args.calls} "
          f"server-python={args.server_python}")
    check_prerequisites()
    load_start = loadavg()
    print(f"load     at start {load_start} (1/5/15 min)" + (
        "  WARNING: the machine is busy; figures will be noisy" if float(load_start.split()[0]) > 0.5 * (os.cpu_count() or 1) else ""))
    results["loadavg_start"] = load_start
    root = Path(tempfile.mkdtemp(prefix="faas-bench-"))
    servers: list[Server] = []
    clients: list[Client] = []
    try:
        on = Server("pool-on", None, root, args.server_python)
        servers.append(on)
        off = Server("pool-off", 0, root, args.server_python)
        servers.append(off)
        for server in servers:
            server.upload()
        on.wait_pool_full()
        rss_idle_on, threads_on = on.rss()
        rss_idle_off, _ = off.rss()
        pool_info = on.health()["pool"]
        print(f"servers  pool-on port {on.port} pool={json.dumps({k: v['size'] for k, v in pool_info.items()})}; "
              f"pool-off port {off.port}; limits={on.health()['limits']}")

        # -- latency ------------------------------------------------------------------------
        series: list[Series] = []
        for server, mode in ((on, "pool-on"), (off, "pool-off")):
            for language in LANGUAGES:
                client = server.client()
                clients.append(client)
                pool = "python" if language == "python" else "node"
                series.append(Series(f"{mode}.{SHORT[language]}", f"{language:<10} {mode:<9}",
                                     (lambda c=client, p=f"bench/{SHORT[language]}": c.run(p)),
                                     server, pool if mode == "pool-on" else None))
        for language in LANGUAGES:
            series.append(Series(f"seed.{SHORT[language]}", f"{language:<10} seed-like", seed_call(language)))
        series.append(Series("bare.py", f"{'python':<10} bare     ", bare_call([PYTHON, "-I", "-c", "pass"])))
        series.append(Series("bare.js", f"{'javascript':<10} bare     ", bare_call([NODE, "-e", "0"])))
        print(f"latency: {len(series)} series x {args.samples} calls in {args.rounds} interleaved rounds, "
              f"{args.pause * 1000:.0f} ms pause between calls (lets the pool refill)...", file=sys.stderr, flush=True)
        measure_latency(series, args.samples, args.rounds, args.pause, warmup=5 if not args.quick else 2)
        for s in series:
            s.server and s.server.alive()
        figures: dict[str, float] = {}
        results["latency"] = {}
        for s in series:
            v50, v99 = p50(s.samples), percentile(s.samples, 99)
            figures[s.key] = v50
            extra = f" pool hits {s.hits}/{s.hits + s.misses}" if s.pool else ""
            print(f"latency  {s.label}  p50 {v50:7.2f} ms  p99 {v99:7.2f} ms  (n={len(s.samples)}, "
                  f"round p50s {min(s.round_p50):.2f}-{max(s.round_p50):.2f}){extra}")
            results["latency"][s.key] = {"p50_ms": round(v50, 3), "p99_ms": round(v99, 3), "n": len(s.samples),
                                         "round_p50_ms": [round(x, 3) for x in s.round_p50],
                                         **({"pool_hits": s.hits, "pool_misses": s.misses} if s.pool else {})}
        for client in clients:
            client.close()

        # -- throughput ---------------------------------------------------------------------
        print(f"throughput: {args.clients} clients for {args.duration:g} s, then 2 cold-spawn loops...",
              file=sys.stderr, flush=True)
        on.wait_pool_full(timeout=5)
        stats_before = on.pool_stats()["python"]
        spy = None
        if args.py_spy:
            if not shutil.which("py-spy"):
                raise BenchError("--py-spy: py-spy is not installed (pip install py-spy)")
            spy = subprocess.Popen(["py-spy", "record", "-p", str(on.proc.pid), "-d", str(int(args.duration)),
                                    "-r", "250", "--gil", "-f", "raw", "-o", str(args.py_spy)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        cpu_before = cpu_seconds(on.proc.pid)
        deadline = time.monotonic() + args.duration
        load = run_clients(on, "bench/py", args.clients, lambda total: time.monotonic() >= deadline)
        cpu_after = cpu_seconds(on.proc.pid)
        if spy:
            spy.wait(timeout=30)
        server_cpu = (cpu_after - cpu_before) * 1000 / max(1, load["ok"])
        stats_after = on.pool_stats()["python"]
        on.alive()
        server_rate = load["ok"] / load["elapsed"]
        hits = stats_after[0] - stats_before[0]
        taken = hits + stats_after[1] - stats_before[1]
        time.sleep(1)
        cold = cold_spawn_limit("python", 2, args.duration)
        cold_rate = cold["spawns"] / cold["elapsed"]
        print(f"through  python     pool-on   {server_rate:7.1f} calls/s  ({load['ok']} ok, {load['errors']} errors "
              f"in {load['elapsed']:.1f} s, {args.clients} clients, p50 {p50(load['latencies']):.1f} ms, "
              f"p99 {percentile(load['latencies'], 99):.1f} ms, pool hits {hits}/{taken})")
        print(f"through  python     server process CPU {server_cpu:.2f} ms per call (user+system of faas.py "
              f"itself, sandboxes excluded; {1000 * (os.cpu_count() or 1) / server_rate if server_rate else 0:.1f} ms "
              f"of machine CPU per call at this rate on {os.cpu_count()} cores)")
        print(f"through  python     cold-limit{cold_rate:7.1f} spawns/s ({cold['spawns']} seed-like spawns in "
              f"{cold['elapsed']:.1f} s, 2 parallel loops, {len(cold['errors'])} errors)")
        results["throughput"] = {"server_calls_per_s": round(server_rate, 2), "server_ok": load["ok"],
                                 "server_errors": load["errors"], "pool_hits": hits, "pool_taken": taken,
                                 "server_cpu_ms_per_call": round(server_cpu, 3),
                                 "cold_spawns_per_s": round(cold_rate, 2), "cold_errors": len(cold["errors"])}
        errors = load["errors"] + len(cold["errors"])
        if load["first_error"] or cold["errors"]:
            print(f"ERROR    throughput: {load['first_error'] or cold['errors'][0]}")

        # -- memory -------------------------------------------------------------------------
        print(f"memory: {args.calls} calls with {args.clients} clients, RSS every {args.sample_every}...",
              file=sys.stderr, flush=True)
        rss_points: list[tuple[int, int, int]] = [(0, *on.rss())]
        done = 0
        memory_began = time.monotonic()
        while done < args.calls:
            batch = min(args.sample_every, args.calls - done)
            state = run_clients(on, "bench/py", args.clients, lambda total, b=batch: total >= b)
            errors += state["errors"]
            if state["first_error"]:
                print(f"ERROR    memory run: {state['first_error']}")
            done += batch
            on.alive()
            rss_points.append((done, *on.rss()))
        memory_rate = done / (time.monotonic() - memory_began)
        xs = [p[0] / 1000 for p in rss_points[1:]]
        ys = [p[1] / 1024 for p in rss_points[1:]]
        trend = slope(xs, ys) if len(xs) >= 2 else 0.0          # MiB per 1,000 calls
        growth = trend * args.calls / 1000
        limit = max(1.0, 0.02 * ys[-1])
        print(f"memory   pool-on  idle RSS {rss_idle_on / 1024:.1f} MiB ({threads_on} threads); "
              f"pool-off idle RSS {rss_idle_off / 1024:.1f} MiB")
        print(f"memory   pool-on  RSS after {done} calls {rss_points[-1][1] / 1024:.1f} MiB "
              f"({rss_points[-1][2]} threads; {memory_rate:.1f} calls/s over the run)")
        print("memory   RSS MiB by calls: " + " ".join(f"{c}:{r / 1024:.1f}" for c, r, _ in rss_points))
        print(f"memory   trend after the first sample: {trend * 1024:+.1f} KiB per 1,000 calls "
              f"({growth:+.2f} MiB over {args.calls} calls)")
        results["memory"] = {"idle_rss_kib": rss_idle_on, "idle_rss_pool_off_kib": rss_idle_off,
                             "samples": [{"calls": c, "rss_kib": r, "threads": t} for c, r, t in rss_points],
                             "trend_kib_per_1000": round(trend * 1024, 2), "calls_per_s": round(memory_rate, 1)}

        # -- ratios -------------------------------------------------------------------------
        results["loadavg_end"] = loadavg()
        print(f"load     at end {results['loadavg_end']} (1/5/15 min; this run itself keeps ~2 busy)")
        print()
        print("ratios (target; PASS/MISS)")
        checks = [
            ("pool-on p50 / seed-like p50, python", figures["pool-on.py"] / figures["seed.py"], "<=", 0.15),
            ("pool-on p50 / seed-like p50, javascript", figures["pool-on.js"] / figures["seed.js"], "<=", 0.10),
            ("pool-on p50 / seed-like p50, typescript", figures["pool-on.ts"] / figures["seed.ts"], "info", None),
            ("TS p50 / JS p50, pool on", figures["pool-on.ts"] / figures["pool-on.js"], "<=", 1.10),
            ("pool-off p50 / seed-like p50, python", figures["pool-off.py"] / figures["seed.py"], "<=", 1.10),
            ("pool-off p50 / seed-like p50, javascript", figures["pool-off.js"] / figures["seed.js"], "<=", 1.10),
            ("pool-off p50 / seed-like p50, typescript", figures["pool-off.ts"] / figures["seed.ts"], "<=", 1.10),
            ("seed-like p50 / bare interpreter p50, python", figures["seed.py"] / figures["bare.py"], "info", None),
            ("seed-like p50 / bare interpreter p50, javascript", figures["seed.js"] / figures["bare.js"], "info", None),
            ("throughput 8 clients / cold-spawn limit", server_rate / cold_rate if cold_rate else 0.0, ">=", 0.90),
            (f"RSS growth over {args.calls} calls, MiB", growth, "<=", round(limit, 2)),
        ]
        results["ratios"] = {}
        for name, value, op, target in checks:
            if op == "info":
                verdict, shown = "info", ""
            else:
                ok = value <= target if op == "<=" else value >= target
                verdict, shown = ("PASS" if ok else "MISS"), f"{op} {target:g}"
            print(f"ratio    {name:<48} {value:7.3f}   target {shown:<8} {verdict}")
            results["ratios"][name] = {"value": round(value, 4), "target": f"{op} {target}" if target else None,
                                       "verdict": verdict}
        results["errors"] = errors
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        if errors:
            print(f"FAILED: {errors} calls went wrong (see the ERROR lines above)")
            return 1
        return 0
    except BenchError as error:
        print(f"FAILED: {error}")
        for server in servers:
            if server.proc.poll() is not None:
                print(f"--- {server.name} log tail:\n{server.log_tail()}")
        return 1
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
