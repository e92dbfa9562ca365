#!/usr/bin/env python3
"""faas asynchronous calls benchmark: ratios against baselines measured in the same run.

    python3 bench/async_bench.py [--quick] [--baseline REV]

Standard library only (plus the redis-server binary). Starts faas.py servers on free
loopback ports and prints, with PASS/MISS against issue 12's targets:

  submit-to-start   p50 of (started - created) of async calls submitted one at a time to an
                    idle server, SQLite and Redis stores (target <= 5 ms)
  async throughput  trivial calls/s: 8 clients submitting async calls (the results read
                    once the last one submitted has ended; first submit to last end, from
                    the records)
                    against 8 clients making sync calls to the same server, medians of
                    interleaved rounds (target >= 0.9x)
  three servers     completed calls/s of a 200-ms sleeping function, queued to 3 servers on
                    one Redis, against 1 server (2 slots per server; target >= 2.7x)
  sync unchanged    p50 latency of a sync call on a server with free slots, this faas.py
                    against the baseline revision's (git show REV:faas.py, by default main
                    just before asynchronous calls were merged; target <= 1.05x). Both on
                    the bwrap path (FAAS_ZYGOTE=off; the baseline has no zygote), so the
                    ratio is what async calls cost a sync call: the zygote's own effect
                    is bench/zygote.py's

The machine is often shared: read the ratios, which compare series measured alike in one run.
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
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRIVIAL = 'return event["a"] + 1'
SLEEPY = "import time\ntime.sleep(0.2)\nreturn 1"
BEFORE_ASYNC = "3ed5315^1"   # main just before the merge of asynchronous calls (issue 12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, name: str, faas: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FAAS_", "HTTP_PORT"))}
        clean.update(HTTP_PORT=str(self.port), FAAS_DATA_DIR=str(self.dir / "data"), FAAS_NODE_ID=name, **env)
        self.log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(faas)], env=clean, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"{name} did not start: {(self.dir / 'server.log').read_text()[-2000:]}")

    def request(self, method: str, path: str, body: Any = None, conn: http.client.HTTPConnection | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
        finally:
            if own:
                conn.close()
        return response.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def upload(self, path: str, code: str) -> None:
        status, body = self.request("POST", "/upload", {"path": path, "language": "python", "code": code})
        assert status == 200, body

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def submit(server: Server, conn: http.client.HTTPConnection, path: str, event: Any) -> str:
    status, body = server.request("POST", f"/run/{path}?async=1", {"input": event}, conn)
    assert status == 202, body
    return body["id"]


def wait_final(server: Server, conn: http.client.HTTPConnection, call_id: str) -> dict[str, Any]:
    while True:
        status, body = server.request("GET", f"/calls/{call_id}?wait=60", None, conn)
        assert status == 200, body
        if body["status"] not in ("queued", "running"):
            return body


def submit_to_start(server: Server, samples: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    delays = []
    for _ in range(samples):
        record = wait_final(server, conn, submit(server, conn, "bench/trivial", {"a": 41}))
        assert record["status"] == "ok" and record["data"] == 42, record
        delays.append((record["started"] - record["created"]) * 1000)
        time.sleep(0.02)
    return statistics.median(delays)


def clients(server: Server, count: int, calls: int, one: Any) -> float:
    """Calls/s of `count` clients doing `calls` calls in all with one(conn)."""
    left = [calls]
    lock = threading.Lock()

    def loop() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            one(conn)
    threads = [threading.Thread(target=loop) for _ in range(count)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return calls / (time.monotonic() - began)


def sync_one(server: Server):
    def one(conn: http.client.HTTPConnection) -> None:
        status, body = server.request("POST", "/run/bench/trivial", {"input": {"a": 41}}, conn)
        assert status == 200 and body["data"] == 42, body
    return one


def async_rate(server: Server, count: int, calls: int) -> float:
    """Calls/s of async calls as their users make them: `count` clients submit `calls` calls,
    and read the results once the last one submitted has ended (one long poll: the queue is
    first in, first out); the rate is the server's own first submit to last end."""
    ids: list[str] = []
    lock = threading.Lock()

    def one(conn: http.client.HTTPConnection) -> None:
        call_id = submit(server, conn, "bench/trivial", {"a": 41})
        with lock:
            ids.append(call_id)
    clients(server, count, calls, one)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    wait_final(server, conn, ids[-1])
    records = [wait_final(server, conn, call_id) for call_id in ids]
    assert all(r["status"] == "ok" and r["data"] == 42 for r in records), records[:3]
    return calls / (max(r["finished"] for r in records) - min(r["created"] for r in records))


def drain_rate(servers: list[Server], calls: int) -> float:
    """Completed calls/s of `calls` sleeping calls queued at once to the first server."""
    conn = http.client.HTTPConnection("127.0.0.1", servers[0].port, timeout=120)
    ids = [submit(servers[0], conn, "bench/sleepy", {}) for _ in range(calls)]
    records = [wait_final(servers[0], conn, call_id) for call_id in ids]
    assert all(r["status"] == "ok" for r in records), records
    # the servers' own times: first submit to last end, without this client's polling
    return calls / (max(r["finished"] for r in records) - min(r["created"] for r in records))


def sync_p50(server: Server, samples: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        status, body = server.request("POST", "/run/bench/trivial", {"input": {"a": 41}}, conn)
        times.append((time.perf_counter() - began) * 1000)
        assert status == 200, body
        time.sleep(0.05)
    return statistics.median(times)


def baseline_faas(root: Path, rev: str) -> Path:
    """The baseline revision's faas.py beside links to this checkout's wrappers and esbuild."""
    where = root / "baseline-code"
    where.mkdir()
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:faas.py"], check=True,
                          capture_output=True, text=True).stdout
    (where / "faas.py").write_text(text)
    for name in ("wrappers", "node_modules", "openapi.json"):
        if (REPO / name).exists():
            (where / name).symlink_to(REPO / name)
    return where / "faas.py"


def start_redis(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--dir", str(root)], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--baseline", default=BEFORE_ASYNC,
                        help=f"git revision of the sync baseline (default {BEFORE_ASYNC}: main before async calls)")
    args = parser.parse_args(argv)
    samples, calls, sleepy = (40, 150, 20) if args.quick else (100, 400, 40)
    root = Path(tempfile.mkdtemp(prefix="faas-async-bench-"))
    redis_proc, redis_url = start_redis(root)
    servers: list[Server] = []
    small = {"FAAS_POOL_SIZE": "2", "FAAS_POOL_SIZE_NODE": "0"}
    try:
        print(f"# machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f} (shared machines: read the ratios)")
        for store, env in (("sqlite", {}), ("redis", {"REDIS_URL": redis_url, "FAAS_REDIS_PREFIX": "b1:"})):
            server = Server(root, f"one-{store}", REPO / "faas.py", {**small, **env})
            servers.append(server)
            server.upload("bench/trivial", TRIVIAL)
            p50 = submit_to_start(server, samples)
            print(f"submit-to-start p50 {store:6} {p50:6.2f} ms   target <= 5 ms   {verdict(p50 <= 5)}")
            sync_rates, async_rates = [], []
            for _ in range(3):   # interleaved rounds
                sync_rates.append(clients(server, 8, calls, sync_one(server)))
                async_rates.append(async_rate(server, 8, calls))
            sync_rate, queued_rate = statistics.median(sync_rates), statistics.median(async_rates)
            ratio = queued_rate / sync_rate
            print(f"throughput {store:6} sync {sync_rate:6.1f}/s async {queued_rate:6.1f}/s  "
                  f"ratio {ratio:.2f}x  target >= 0.9x   {verdict(ratio >= 0.9)}")
            server.stop()

        # 2 slots per server: slot-bound (10 calls/s each), not bound by this machine's CPU
        slots = {"FAAS_MAX_RUNS": "2", "FAAS_POOL_SIZE": "2", "FAAS_POOL_SIZE_NODE": "0"}
        one = [Server(root, "solo", REPO / "faas.py", {**slots, "REDIS_URL": redis_url, "FAAS_REDIS_PREFIX": "b2:"})]
        servers += one
        one[0].upload("bench/sleepy", SLEEPY)
        rate_one = drain_rate(one, sleepy)
        one[0].stop()
        three = [Server(root, f"n{i}", REPO / "faas.py", {**slots, "REDIS_URL": redis_url, "FAAS_REDIS_PREFIX": "b3:"})
                 for i in range(3)]
        servers += three
        three[0].upload("bench/sleepy", SLEEPY)
        rate_three = drain_rate(three, sleepy * 3)
        ratio = rate_three / rate_one
        print(f"200-ms calls  1 server {rate_one:5.1f}/s  3 servers {rate_three:5.1f}/s  ratio {ratio:.2f}x  "
              f"target >= 2.7x   {verdict(ratio >= 2.7)}")
        for server in three:
            server.stop()

        base = Server(root, "baseline", baseline_faas(root, args.baseline), small)
        now = Server(root, "now", REPO / "faas.py", {**small, "FAAS_ZYGOTE": "off"})
        servers += [base, now]
        for server in (base, now):
            server.upload("bench/trivial", TRIVIAL)
        base_p50, now_p50 = [], []
        for _ in range(8):   # interleaved rounds
            base_p50.append(sync_p50(base, samples // 4))
            now_p50.append(sync_p50(now, samples // 4))
        b, n = statistics.median(base_p50), statistics.median(now_p50)
        print(f"sync p50 with free slots  baseline {b:.2f} ms  now {n:.2f} ms  ratio {n / b:.3f}x  "
              f"target <= 1.05x   {verdict(n / b <= 1.05)}")
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
