"""The pool of pre-started sandboxes, seen from outside: /healthz, the processes and
cgroups below the server, and what calls get.

Each test starts its own server (SQLite store) with the pool settings it is about. The
pool is on by default in every other test module too; the attack suite runs against a
pooled and a cold server.
"""
import threading
from pathlib import Path

import pytest

from tests.helpers import assert_ok, descendants, proc_table, wait_until

TWO_SECONDS = "import time\ntime.sleep(2)\nreturn 1"


def pool(server):
    return server.get("/healthz").body["pool"]


def idle_counts(server):
    return {name: state["idle"] for name, state in pool(server).items()}


ZYGOTE = "/usr/bin/python3 -I /faas/wrappers/zygote.py"


def sandbox_pids(server):
    """Interpreters running below the server: its pooled (and running) sandboxes. A Python
    sandbox the zygote forked shows the zygote's command line; it is the call's pid 2,
    whose parent (the call's init) is the zygote's child."""
    table = proc_table()

    def command(pid):
        return table.get(pid, {}).get("cmdline", "")
    return {pid for pid, info in descendants(server.proc.pid, table).items()
            if info["cmdline"].startswith(("/usr/bin/python3 -I /faas/", "/usr/bin/node /faas/"))
            and (not info["cmdline"].startswith(ZYGOTE) or command(table[info["ppid"]]["ppid"]).startswith(ZYGOTE))}


def not_zygote(server):
    """Processes below the server other than its zygote (and the zygote's bwrap)."""
    table = proc_table()
    below = descendants(server.proc.pid, table)
    zygotes = {pid for pid, info in below.items()
               if info["cmdline"].startswith(ZYGOTE) and table[info["ppid"]]["comm"] == "bwrap"}
    chain = set(zygotes)
    for pid in zygotes:
        while table[pid]["ppid"] != server.proc.pid:
            pid = table[pid]["ppid"]
            chain.add(pid)
    return set(below) - chain


def started_sandboxes(server, count):
    """The interpreters' pids once `count` of them run: a pooled sandbox counts as idle as
    soon as it is launched, its interpreter appears a few milliseconds later."""
    seen = {}

    def settled():
        seen["pids"] = sandbox_pids(server)
        return len(seen["pids"]) == count
    assert wait_until(settled, timeout=10), (count, seen["pids"])
    return seen["pids"]


def run(server, language, code, **extra):
    return assert_ok(server.run_now(language, code, **extra))


@pytest.fixture(scope="module")
def pooled(faas):
    s = faas.start(store="sqlite")
    yield s
    s.stop()


def test_healthz_shows_each_pool_filling_to_its_default_size(pooled):
    assert wait_until(lambda: idle_counts(pooled) == {"python": 2, "node": 2}, timeout=20), pool(pooled)
    for state in pool(pooled).values():
        assert state["size"] == 2 and state["started"] >= 2, state
        assert set(state) == {"size", "idle", "hits", "misses", "started", "spawn_ms_avg"}, state
        assert state["spawn_ms_avg"] > 0, state
    started_sandboxes(pooled, 4)


def test_a_call_takes_a_pooled_sandbox_and_a_new_one_replaces_it(pooled):
    assert wait_until(lambda: idle_counts(pooled) == {"python": 2, "node": 2}, timeout=20)
    before = pool(pooled)
    waiting = started_sandboxes(pooled, 4)
    assert run(pooled, "python", "return 41 + 1")["data"] == 42
    assert run(pooled, "javascript", "return 41 + 1")["data"] == 42
    assert run(pooled, "typescript", "const n: number = 41; return n + 1")["data"] == 42
    assert wait_until(lambda: idle_counts(pooled) == {"python": 2, "node": 2}, timeout=20)
    after = pool(pooled)
    assert after["python"]["hits"] == before["python"]["hits"] + 1, (before, after)
    assert after["node"]["hits"] == before["node"]["hits"] + 2, (before, after)
    assert after["python"]["started"] == before["python"]["started"] + 1
    assert after["node"]["started"] == before["node"]["started"] + 2
    # the sandboxes that served the calls are gone; the others still wait
    now = started_sandboxes(pooled, 4)
    assert len(waiting - now) == 3, (waiting, now)


def test_pooled_sandboxes_share_nothing_between_calls(pooled):
    """Files, interpreter state and processes a call leaves behind are not seen by the
    next call, which also gets a pre-started sandbox."""
    leave = ("import builtins, subprocess\n"
             "open('/tmp/left-behind', 'w').write('x')\n"
             "builtins.LEFT_BEHIND = 1\n"
             "subprocess.Popen(['sleep', '30'])\n"
             "return 'left'")
    look = ("import builtins, os\n"
            "procs = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "return [os.path.exists('/tmp/left-behind'), hasattr(builtins, 'LEFT_BEHIND'), len(procs)]")
    for _ in range(3):
        assert wait_until(lambda: idle_counts(pooled)["python"] == 2, timeout=20)
        hits = pool(pooled)["python"]["hits"]
        assert run(pooled, "python", leave)["data"] == "left"
        assert wait_until(lambda: idle_counts(pooled)["python"] == 2, timeout=20)
        # bwrap's init and the interpreter: the sleeper of the previous call is not here
        assert run(pooled, "python", look)["data"] == [False, False, 2]
        assert pool(pooled)["python"]["hits"] == hits + 2


def test_a_lowered_memory_limit_applies_to_a_pooled_sandbox(pooled):
    assert wait_until(lambda: idle_counts(pooled)["python"] == 2, timeout=20)
    hits = pool(pooled)["python"]["hits"]
    grab = "x = bytearray(80 << 20)\nreturn len(x)"
    r = pooled.run_now("python", grab, memory="48M")
    assert r.body.get("status") == "oom", r.body
    assert pool(pooled)["python"]["hits"] == hits + 1
    assert run(pooled, "python", grab)["data"] == 80 << 20   # the default limit is 128M


def test_a_call_that_finds_the_pool_empty_starts_its_own_sandbox(faas):
    s = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "1"})
    try:
        assert wait_until(lambda: idle_counts(s) == {"python": 1, "node": 1}, timeout=20)
        answers = []
        calls = [threading.Thread(target=lambda: answers.append(s.run_now("python", TWO_SECONDS)))
                 for _ in range(3)]
        for t in calls:
            t.start()
        for t in calls:
            t.join()
        assert [r.body.get("data") for r in answers] == [1, 1, 1], [r.body for r in answers]
        state = pool(s)["python"]
        assert state["hits"] >= 1 and state["misses"] >= 1 and state["hits"] + state["misses"] == 3, state
        assert wait_until(lambda: idle_counts(s) == {"python": 1, "node": 1}, timeout=20)
    finally:
        s.stop()


def test_pool_size_per_interpreter_and_zero_turns_it_off(faas):
    s = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "1", "FAAS_POOL_SIZE_PYTHON": "3",
                                        "FAAS_POOL_SIZE_NODE": "0"})
    try:
        assert wait_until(lambda: idle_counts(s) == {"python": 3, "node": 0}, timeout=20), pool(s)
        assert pool(s)["python"]["size"] == 3 and pool(s)["node"]["size"] == 0
        assert run(s, "javascript", "return 'cold'")["data"] == "cold"
        assert pool(s)["node"]["hits"] == 0 and pool(s)["node"]["started"] == 0
        # the cold call's sandbox ends after its answer was sent (answer_early): wait for it
        assert wait_until(lambda: not any("node" in info["cmdline"] for info in descendants(s.proc.pid).values()),
                          timeout=5), descendants(s.proc.pid)
    finally:
        s.stop()
    off = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "0"})
    try:
        assert run(off, "python", "return 'cold'")["data"] == "cold"
        assert idle_counts(off) == {"python": 0, "node": 0}
        assert wait_until(lambda: not not_zygote(off), timeout=5), descendants(off.proc.pid)
    finally:
        off.stop()


def test_idle_sandboxes_are_replaced_after_pool_idle_seconds(faas):
    s = faas.start(store="sqlite", env={"FAAS_POOL_IDLE": "1"})
    try:
        assert wait_until(lambda: idle_counts(s) == {"python": 2, "node": 2}, timeout=20)
        first = started_sandboxes(s, 4)
        assert wait_until(lambda: not first & sandbox_pids(s), timeout=10), (first, sandbox_pids(s))
        assert wait_until(lambda: idle_counts(s) == {"python": 2, "node": 2}, timeout=20)
        assert all(state["started"] >= 4 for state in pool(s).values()), pool(s)
        assert run(s, "python", "return 'fresh'")["data"] == "fresh"
    finally:
        s.stop()


def available_memory():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def test_the_pool_stays_empty_rather_than_fail_when_memory_is_short(faas):
    """A sandbox is pre-started only while the machine has twice the memory limit (plus a
    margin) available: with a limit above half the available memory, the pool starts
    nothing and every call runs cold, without an error."""
    limit_mib = available_memory() // 2 // (1 << 20) + 1024
    s = faas.start(store="sqlite", env={"MAX_MEMORY": f"{limit_mib}M"})
    try:
        for language in ("python", "javascript"):
            assert run(s, language, "return 'cold'")["data"] == "cold"
        assert idle_counts(s) == {"python": 0, "node": 0}
        state = pool(s)
        assert state["python"]["started"] == 0 and state["python"]["misses"] == 1, state
        assert wait_until(lambda: not not_zygote(s), timeout=5), descendants(s.proc.pid)   # the last call is ending
    finally:
        s.stop()
