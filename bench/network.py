#!/usr/bin/env python3
"""faas benchmark: a networked trivial call against a non-networked one, pool on and off.

    python3 bench/network.py [--samples N] [--rounds N] [--pause S]

Needs root, slirp4netns, nftables, iproute2. Standard library only. Both servers run inside a
network namespace made for this run with nothing in it but its loopback (`ip netns add`), so
no packet can leave the machine; the calls themselves send none. The trivial function is
`return event["a"] + 1` (Python), stored twice per server: without network and with
`"network": "internet"`. Series are measured in interleaved rounds (one call of each per
step) so drift hits them alike; the figures are p50/p90 latency of POST /run/<path> over a
keep-alive connection, and the median `cpu_ms` the answers report (the run's cgroup: the
sandbox, and for a networked call its slirp4netns too). Prints the ratios networked/plain
for pool on and pool off against the target (at most 1.3x) with PASS/MISS.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
FAAS = REPO / "faas.py"
CODE = 'return event["a"] + 1'
TARGET = 1.3
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """The calling thread in network namespace `name`; sockets made inside stay there."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            libc.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


class Server:
    def __init__(self, name: str, ns: str, port: int, pool: int, root: Path) -> None:
        self.name, self.ns, self.port = name, ns, port
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FAAS_", "HTTP_PORT"))}
        env.update(HTTP_PORT=str(port), FAAS_DATA_DIR=str(root / name), FAAS_POOL_SIZE=str(pool),
                   FAAS_POOL_SIZE_NETWORK=str(min(pool, 1)), FAAS_NETWORK="allow")
        self.log = root / f"{name}.log"
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, str(FAAS)],
                                     env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        with netns(ns):
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                self.conn.close()
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"server {name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        for network in ("none", "internet"):
            status, body = self.request("POST", "/upload", {"path": f"bench/{network}", "language": "python",
                                                            "code": CODE, "network": network})
            if status != 200:
                raise SystemExit(f"upload answered {status}: {body}")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        with netns(self.ns):   # a reconnect must happen in the lab namespace too
            self.conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
            response = self.conn.getresponse()
            return response.status, json.loads(response.read())

    def call(self, network: str) -> tuple[float, int]:
        began = time.perf_counter()
        status, body = self.request("POST", f"/run/bench/{network}", {"input": {"a": 41}})
        took = (time.perf_counter() - began) * 1000
        if status != 200 or body.get("data") != 42:
            raise SystemExit(f"{self.name} {network}: {status} {str(body)[:300]}")
        return took, body.get("cpu_ms", 0)

    def wait_pool(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = self.request("GET", "/healthz")[1]
            pools = [*health.get("pool", {}).values(), *health.get("network_pool", {}).values()]
            if all(p["idle"] >= p["size"] for p in pools):
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(15)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between calls (the pool refills)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/network.py needs root (network namespaces, nftables, slirp4netns)")
    ns = f"faasbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    servers: list[Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="faas-bench-net-") as tmp:
            servers = [Server("pool-on", ns, 18181, 2, Path(tmp)), Server("pool-off", ns, 18182, 0, Path(tmp))]
            print(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
            series: dict[tuple[str, str], list[tuple[float, int]]] = {
                (s.name, n): [] for s in servers for n in ("none", "internet")}
            for server in servers:   # warm-up
                for _ in range(3):
                    server.wait_pool()
                    server.call("none")
                    server.wait_pool()
                    server.call("internet")
            for _ in range(args.rounds):
                for _ in range(args.samples // args.rounds):
                    for server in servers:
                        for network in ("none", "internet"):
                            server.wait_pool()
                            time.sleep(args.pause)
                            series[(server.name, network)].append(server.call(network))
            for (name, network), values in series.items():
                ms = sorted(v[0] for v in values)
                print(f"{name:<9} {network:<9} p50 {statistics.median(ms):6.1f} ms  "
                      f"p90 {ms[int(len(ms) * 0.9) - 1]:6.1f} ms  cpu_ms median {statistics.median(v[1] for v in values):5.1f}"
                      f"  (n={len(ms)})")
            for server in servers:
                plain = statistics.median(v[0] for v in series[(server.name, "none")])
                networked = statistics.median(v[0] for v in series[(server.name, "internet")])
                ratio = networked / plain
                print(f"ratio {server.name}: networked/plain p50 = {ratio:.2f}x (target <= {TARGET}x) "
                      f"{'PASS' if ratio <= TARGET else 'MISS'}; +{networked - plain:.1f} ms per call")
            print(f"load average at end: {open('/proc/loadavg').read().split()[:3]} (a shared machine moves every figure)")
    finally:
        for server in servers:
            server.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
