#!/usr/bin/env python3
"""Zygote benchmark: Python calls forked by the zygote against today's bwrap path and the
seed-like cold pipeline, in one run, with the ratios issue 13 names.

    python3 bench/zygote.py [--quick] [--samples N] [--duration S] [--calls N]

Standard library only; reuses bench.py's servers, clients and seed-like pipeline. Starts two
faas.py servers (SQLite, default pool of 2): "zygote" (the default) and "bwrap"
(FAAS_ZYGOTE=off). Measures, in interleaved rounds where it can:

  isolated     p50 of one call with a pause (--pause, 50 ms) between calls, so the pool is
               full: Python and JavaScript on both servers (Node must not change)
  one client   back to back, no pause: p50/p90 of Python on both servers and of the
               seed-like cold pipeline (a bwrap + interpreter per call, bench.py's)
  8 clients    calls/s for --duration s on each server, and the seed-like cold-spawn limit
               (2 loops spawning back to back)
  many calls   --calls calls (10,000) with 8 clients on the zygote server: the zygote's RSS
               before and after, its mount table, and that no run cgroup or call process is
               left once they are done

Prints one line per figure and the targets with PASS/MISS (a MISS does not fail the run;
wrong answers or a dead server do, exit 1). The machine is shared: compare ratios, which
are measured in the same run, not absolute figures.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as base  # noqa: E402

ZYGOTE_CMDLINE = b"/usr/bin/python3\0-I\0/faas/wrappers/zygote.py\0"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few samples, short runs")
    parser.add_argument("--samples", type=int, help="latency samples per series (200)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between isolated calls (0.05)")
    parser.add_argument("--duration", type=float, help="seconds of each throughput run (10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--calls", type=int, help="calls of the many-calls run (10000)")
    parser.add_argument("--server-python", default=base.PYTHON, help="interpreter running faas.py")
    args = parser.parse_args(argv)
    args.samples = args.samples or (20 if args.quick else 200)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.calls = args.calls or (300 if args.quick else 10_000)
    return args


def children(pid: int) -> set[int]:
    """Every descendant of pid."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def zygote_pid(server: base.Server) -> int:
    """The zygote of a server: the interpreter below it whose parent is bwrap."""
    for pid in children(server.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
            if cmdline.startswith(ZYGOTE_CMDLINE) and Path(f"/proc/{parent}/comm").read_text().strip() == "bwrap":
                return pid
        except (OSError, ValueError):
            continue
    raise base.BenchError(f"server {server.name} has no zygote")


def run_cgroups(server: base.Server) -> set[str]:
    found = set()
    for parent in Path("/sys/fs/cgroup/pids").rglob(f"faas-{server.proc.pid}"):
        found |= {p.name for p in parent.iterdir() if p.is_dir()}
    return found


def verdict(name: str, ratio: float, target: float, below: bool) -> bool:
    ok = ratio <= target if below else ratio >= target
    print(f"target   {name:<58} {ratio:6.2f}x  ({'<=' if below else '>='} {target:g})  {'PASS' if ok else 'MISS'}")
    return ok


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    base.check_prerequisites()
    print(f"load     at start {base.loadavg()} (1/5/15 min); the machine may be shared: compare ratios")
    root = Path(tempfile.mkdtemp(prefix="faas-bench-zygote-"))
    servers: list[base.Server] = []
    errors = 0
    try:
        # one zygote for the whole run, so the many-calls run watches a single one (default: 1000)
        zygote = base.Server("zygote", None, root, args.server_python,
                             {"FAAS_ZYGOTE": "on", "FAAS_ZYGOTE_CALLS": "1000000"})
        servers.append(zygote)
        bwrap = base.Server("bwrap", None, root, args.server_python, {"FAAS_ZYGOTE": "off"})
        servers.append(bwrap)
        for server in servers:
            server.upload()
            server.wait_pool_full()
        if zygote.health()["zygote"]["state"] != "up":
            raise base.BenchError(f"the zygote is not up: {zygote.health()['zygote']}")

        # -- isolated (pool full) and one client back to back --------------------------------------
        def series(server: base.Server, language: str, mode: str) -> base.Series:
            client = server.client()
            pool = "python" if language == "python" else "node"
            return base.Series(f"{mode}.{server.name}.{base.SHORT[language]}", f"{language:<10} {server.name:<7}",
                               lambda: client.run(f"bench/{base.SHORT[language]}"), server,
                               pool if mode == "isolated" else None)
        isolated = [series(s, lang, "isolated") for lang in ("python", "javascript") for s in servers]
        print("isolated calls...", file=sys.stderr, flush=True)
        base.measure_latency(isolated, args.samples, args.rounds, args.pause, warmup=3)
        back = [series(s, "python", "back") for s in servers]
        back.append(base.Series("back.seed.py", f"{'python':<10} seed-like", base.seed_call("python")))
        for s in back:
            s.server = None   # back to back: do not wait for a full pool between rounds
        print("one client back to back...", file=sys.stderr, flush=True)
        base.measure_latency(back, args.samples, args.rounds, 0, warmup=3)
        p50 = {s.key: base.p50(s.samples) for s in isolated + back}
        p90 = {s.key: base.percentile(s.samples, 90) for s in back}
        for s in isolated:
            print(f"isolated {s.label}  p50 {p50[s.key]:7.2f} ms  (n={len(s.samples)}, pool hits {s.hits}/{s.hits + s.misses})")
        for s in back:
            print(f"1 client {s.label}  p50 {p50[s.key]:7.2f} ms  p90 {p90[s.key]:7.2f} ms  (n={len(s.samples)})")

        # -- 8 clients --------------------------------------------------------------------------
        rates = {}
        for server in servers:
            print(f"{args.clients} clients on {server.name}...", file=sys.stderr, flush=True)
            server.wait_pool_full(timeout=5)
            deadline = time.monotonic() + args.duration
            load = base.run_clients(server, "bench/py", args.clients, lambda total: time.monotonic() >= deadline)
            server.alive()
            errors += load["errors"]
            rates[server.name] = load["ok"] / load["elapsed"]
            print(f"8 client python     {server.name:<7} {rates[server.name]:7.1f} calls/s  ({load['ok']} ok, "
                  f"{load['errors']} errors, p50 {base.p50(load['latencies']):.1f} ms, "
                  f"p90 {base.percentile(load['latencies'], 90):.1f} ms)")
            time.sleep(1)
        cold = base.cold_spawn_limit("python", 2, args.duration)
        errors += len(cold["errors"])
        rates["seed"] = cold["spawns"] / cold["elapsed"]
        print(f"8 client python     seed-like cold-spawn limit {rates['seed']:7.1f} spawns/s (2 loops)")

        # -- many calls -------------------------------------------------------------------------
        print(f"{args.calls} calls on the zygote server...", file=sys.stderr, flush=True)
        zpid = zygote_pid(zygote)
        generation = zygote.health()["zygote"]["generation"]
        rss_before = base.rss_kib(zpid)[0]
        mounts_before = Path(f"/proc/{zpid}/mountinfo").read_text()
        load = base.run_clients(zygote, "bench/py", args.clients, lambda total: total >= args.calls)
        errors += load["errors"]
        zygote.alive()
        state = zygote.health()["zygote"]
        same = zygote_pid(zygote) == zpid
        rss_after = base.rss_kib(zpid)[0] if same else None
        mounts_same = same and Path(f"/proc/{zpid}/mountinfo").read_text() == mounts_before
        time.sleep(2)
        calls_left = children(zpid) if same else set()
        pooled = zygote.health()["pool"]["python"]["idle"]
        cgroups = run_cgroups(zygote)
        print(f"many     {load['ok']} ok, {load['errors']} errors in {load['elapsed']:.1f} s; zygote pid {zpid} "
              f"generation {generation} -> {state['generation']} (FAAS_ZYGOTE_CALLS=1000000 here)")
        if same:
            print(f"many     zygote RSS {rss_before} -> {rss_after} KiB; its mount table "
                  f"{'unchanged' if mounts_same else 'CHANGED'}; processes below it {len(calls_left)} "
                  f"(= 2 per pooled sandbox: {2 * pooled})")
        print(f"many     run cgroups left: {len(cgroups)} (pooled sandboxes, Python + Node, and the zygote's own)")

        # -- targets ----------------------------------------------------------------------------
        print(f"load     at end {base.loadavg()}")
        verdict("python 8 clients: zygote / today's path", rates["zygote"] / rates["bwrap"], 2.5, False)
        verdict("python 8 clients: zygote / seed-like cold-spawn limit", rates["zygote"] / rates["seed"], 2.5, False)
        verdict("python 1 client back to back p50: zygote / seed-like",
                p50["back.zygote.py"] / p50["back.seed.py"], 0.3, True)
        verdict("python 1 client back to back p90: zygote / seed-like",
                p90["back.zygote.py"] / p90["back.seed.py"], 0.6, True)
        verdict("python isolated pooled call: zygote / today's path",
                p50["isolated.zygote.py"] / p50["isolated.bwrap.py"], 1.05, True)
        verdict("node isolated pooled call: zygote server / today's",
                p50["isolated.zygote.js"] / p50["isolated.bwrap.js"], 1.05, True)
        print(f"info     python 1 client back to back, today's path: p50 {p50['back.bwrap.py'] / p50['back.seed.py']:.2f}x "
              f"p90 {p90['back.bwrap.py'] / p90['back.seed.py']:.2f}x of seed-like")
    except base.BenchError as error:
        print(f"ERROR    {error}")
        return 1
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    if errors:
        print(f"ERROR    {errors} calls failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
