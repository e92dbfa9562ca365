"""The Python zygote (research/forkserver.md §3.3), seen from outside: what a call forked by
it can see and do, what two concurrent calls share (nothing), what is left of a call in
memory, the zygote's failure paths (killed mid-call, malformed control messages), its
recycling, the bwrap fallback, and that no sandbox outlives a server killed with SIGKILL.

Every test drives `python3 faas.py` with real bwrap, real cgroups and real processes; host
checks read /proc directly. The attack suite and the limit/outcome tests of test_faas.py
run through both spawn paths as well (their fixtures are parametrized).
"""
import ctypes
import json
import os
import pwd
import re
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import assert_ok, descendants, proc_table, wait_until

ZYGOTE_CMDLINE = "/usr/bin/python3 -I /faas/wrappers/zygote.py"
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup", "user")
TOKEN = "zygote-test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER_SECRET = "server-secret-" + uuid.uuid4().hex
THREAD_VARIABLES = {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"}   # see Layers


# --------------------------------------------------------------------------- helpers

def run(server, code, **extra):
    return server.post("/run-now", {"language": "python", "code": code, **extra}, headers=AUTH, timeout=60)


def value(r):
    body = assert_ok(r)
    assert body.get("status") == "ok", body
    return body["data"]


def zygote(server):
    return server.get("/healthz").body["zygote"]


def spawn_paths(server):
    return server.get("/healthz").body["spawn_paths"].get("python", {})


def zygote_pids(server):
    """The zygote processes below the server: the interpreter whose parent is bwrap (the
    calls it forked have the same command line, and a zygote as parent)."""
    return zygote_pids_below(server.proc.pid)


def zygote_pids_below(pid):
    table = proc_table()
    return {p for p, info in descendants(pid, table).items()
            if info["cmdline"].startswith(ZYGOTE_CMDLINE) and table.get(info["ppid"], {}).get("comm") == "bwrap"}


def the_zygote(server):
    pids = wait_until(lambda: zygote_pids(server) if len(zygote_pids(server)) == 1 else None, timeout=10)
    assert pids, f"not exactly one zygote: {zygote_pids(server)}"
    return pids.pop()


def vm_rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def memory_holds(pid, needles):
    """Which needles occur in the readable memory of process pid (read as root)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found |= {n for n in needles if n.encode() in data}
    return found


def alive(pids):
    table = proc_table()
    return {p for p in pids if p in table and not table[p]["state"].startswith("Z")}


def in_background(server, code, **extra):
    """A call in a thread: its answer lands in box["r"], or what it raised in box["error"]."""
    box = {}

    def call():
        try:
            box["r"] = run(server, code, **extra)
        except OSError as error:   # the server was killed under it
            box["error"] = error
    thread = threading.Thread(target=call)
    thread.start()
    return thread, box


def marker():
    """A unique, harmless argument for `sleep` that identifies a process on the host."""
    return f"{1000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**9:09d}"


def sleeper(mark, seconds=2):
    """Python lines that run `sleep MARK` for `seconds`, then go on."""
    return (f"import subprocess\ntry:\n    subprocess.run(['sleep', '{mark}'], timeout={seconds})\n"
            f"except subprocess.TimeoutExpired:\n    pass\n")


def running_marker(mark):
    return {p for p, i in proc_table().items() if mark in i["cmdline"] and not i["state"].startswith("Z")}


# --------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def zserver(faas):
    s = faas.start(store="redis", env={"FAAS_ZYGOTE": "on", "FAAS_TOKEN": TOKEN,
                                       "FAAS_TEST_SECRET": SERVER_SECRET})
    assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20), zygote(s)
    yield s
    s.stop()
    assert "Traceback" not in s.stderr_text(), s.stderr_text()[-3000:]


# --------------------------------------------------------------------------- paths

def test_python_calls_take_the_zygote_path_and_health_and_metrics_say_so(zserver):
    before = spawn_paths(zserver).get("zygote", 0)
    assert value(run(zserver, "return 41 + 1")) == 42
    assert spawn_paths(zserver)["zygote"] == before + 1
    js = zserver.post("/run-now", {"language": "javascript", "code": "return 1"}, headers=AUTH)
    assert assert_ok(js)["data"] == 1
    assert zserver.get("/healthz").body["spawn_paths"]["javascript"] == {"bwrap": 1}
    state = zygote(zserver)
    assert state["state"] == "up" and state["calls"] >= 1 and state["started"] >= 1, state
    metrics = zserver.get("/metrics", headers=AUTH).body
    assert re.search(r'faas_calls_by_spawn_path_total\{language="python",path="zygote"\} \d+', metrics), metrics
    assert 'faas_calls_by_spawn_path_total{language="javascript",path="bwrap"} 1' in metrics


def test_zygote_off_keeps_the_bwrap_path(faas):
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "off"})
    try:
        assert s.get("/healthz").body["zygote"] == {"state": "off", "why": "FAAS_ZYGOTE=off"}
        assert assert_ok(s.run_now("python", "return 7"))["data"] == 7
        assert s.get("/healthz").body["spawn_paths"]["python"] == {"bwrap": 1}
        assert not zygote_pids(s)
    finally:
        s.stop()


# --------------------------------------------------------------------------- inside one call

def test_a_call_has_no_capability_no_new_privs_seccomp_and_its_own_uid_map(zserver):
    code = """import os
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
return {"status": {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh",
                                                 "NoNewPrivs", "Seccomp", "Seccomp_filters", "Uid", "Gid")},
        "uid_map": open("/proc/self/uid_map").read().split(), "gid_map": open("/proc/self/gid_map").read().split(),
        "setgroups": open("/proc/self/setgroups").read().strip(),
        "cgroup": sorted({l.split(":", 2)[2] for l in open("/proc/self/cgroup").read().splitlines()}),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "me": [os.getpid(), os.getppid()],
        "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")), "cwd": os.getcwd(),
        "environ": sorted(os.environ), "hostname": os.uname().nodename}"""
    got = value(run(zserver, code))
    status = got["status"]
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(status[cap], 16) == 0, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    assert status["Seccomp_filters"] == "2", status   # the zygote's and the call's own
    uid = zserver.get("/healthz").body["sandbox_uid"]   # as in a bwrap sandbox: faas's own user
    gid = str(pwd.getpwuid(uid).pw_gid)
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [gid] * 4, status
    assert got["uid_map"] == [str(uid), "0", "1"] and got["gid_map"] == [gid, "0", "1"], got
    assert got["setgroups"] == "deny"
    assert got["cgroup"] == ["/"], got
    assert got["pids"] == [1, 2] and got["me"] == [2, 1], got
    assert got["fds"] == [0, 1, 2, 3, 4], got   # 4: the directory listing itself
    assert got["cwd"] == "/tmp" and got["hostname"] == "sandbox", got
    assert set(got["environ"]) <= {"PATH", "HOME", "LANG", "PWD", *THREAD_VARIABLES}, got


def test_dangerous_calls_are_refused_and_threads_subprocess_posix_spawn_work(zserver):
    code = """import ctypes, errno, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def attempt(name, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(*args)
    if ret == 0 and name.startswith("clone"):
        os._exit(0)   # a child: must never happen
    return errno.errorcode.get(ctypes.get_errno(), ret) if ret < 0 else ("ALLOWED", ret)
out = {
    "unshare_user": attempt("unshare", 272, 0x10000000),
    "unshare_mnt": attempt("unshare", 272, 0x20000),
    "unshare_net": attempt("unshare", 272, 0x40000000),
    "setns": attempt("setns", 308, os.open("/proc/self/ns/net", os.O_RDONLY), 0),
    "mount": attempt("mount", 165, b"none", b"/tmp", b"tmpfs", 0, None),
    "umount": attempt("umount2", 166, b"/proc", 2),
    "ptrace": attempt("ptrace", 101, 16, 1, 0, 0),
    "bpf": attempt("bpf", 321, 0, 0, 0),
    "io_uring_setup": attempt("io_uring_setup", 425, 8, 0),
    "clone_newuser": attempt("clone", 56, 0x10000000 | 17, 0, 0, 0, 0),
    "clone3": attempt("clone3", 435, 0, 0),
    "keyctl": attempt("keyctl", 250, 0, 0, 0, 0, 0),
}
seen = []
t = threading.Thread(target=lambda: seen.append(1))
t.start(); t.join()
out["thread"] = seen
out["subprocess"] = subprocess.run(["/usr/bin/echo", "hi"], capture_output=True, text=True).stdout
pid = os.posix_spawn("/usr/bin/true", ["true"], {})
out["posix_spawn"] = os.waitpid(pid, 0)[1]
out["fork"] = subprocess.run(["/bin/sh", "-c", "(exit 3)"]).returncode
return out"""
    got = value(run(zserver, code))
    for name in ("unshare_user", "unshare_mnt", "unshare_net", "setns", "mount", "umount", "ptrace", "bpf",
                 "io_uring_setup", "clone_newuser", "keyctl"):
        assert got[name] == "EPERM", (name, got)
    assert got["clone3"] == "ENOSYS", got   # glibc falls back to clone
    assert got["thread"] == [1] and got["subprocess"] == "hi\n" and got["posix_spawn"] == 0 and got["fork"] == 3, got


# --------------------------------------------------------------------------- two calls at once

SIBLING = """import ctypes, os, socket, time
libc = ctypes.CDLL(None, use_errno=True)
ns = {n: os.readlink("/proc/self/ns/" + n) for n in %r}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0faas-sibling-" + event["tag"])
s.listen(1)
shm = libc.shmget(0x5157, 4096, 0o1666)
msg = libc.msgget(0x5158, 0o1666)
sem = libc.semget(0x5159, 1, 0o1666)
open("/tmp/sibling-file", "w").write("x")
open("/dev/shm/sibling-shm", "w").write("x")
master = os.posix_openpt(os.O_RDWR) if hasattr(os, "posix_openpt") else os.open("/dev/ptmx", os.O_RDWR)
time.sleep(event["sleep"])
return {"ns": ns, "ipc": [shm >= 0, msg >= 0, sem >= 0], "pts": sorted(os.listdir("/dev/pts"))}
""" % (NAMESPACES,)

PROBE = """import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
ns = {n: os.readlink("/proc/self/ns/" + n) for n in %r}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect("\\0faas-sibling-" + event["tag"])
    abstract = "connected"
except OSError as e:
    abstract = errno.errorcode[e.errno]
def ipc(fn, *args):
    ctypes.set_errno(0)
    return "found" if fn(*args) >= 0 else errno.errorcode[ctypes.get_errno()]
return {"ns": ns, "abstract": abstract, "shm": ipc(libc.shmget, 0x5157, 0, 0), "msg": ipc(libc.msgget, 0x5158, 0),
        "sem": ipc(libc.semget, 0x5159, 0, 0), "tmp": os.listdir("/tmp"), "dev_shm": os.listdir("/dev/shm"),
        "pts": sorted(os.listdir("/dev/pts"))}
""" % (NAMESPACES,)


def test_two_concurrent_calls_share_no_namespace_and_no_channel(zserver):
    tag = uuid.uuid4().hex[:8]
    zpid = the_zygote(zserver)
    zygote_ns = {n: os.readlink(f"/proc/{zpid}/ns/{n}") for n in NAMESPACES}
    first, box = in_background(zserver, SIBLING, input={"tag": tag, "sleep": 2})
    time.sleep(0.8)   # the sibling has set up its channels (its answer says so below)
    probe = value(run(zserver, PROBE, input={"tag": tag}))
    first.join()
    sibling = value(box["r"])
    assert sibling["ipc"] == [True, True, True] and "0" in sibling["pts"], sibling
    for name in NAMESPACES:
        three = {sibling["ns"][name], probe["ns"][name], zygote_ns[name]}
        assert len(three) == 3, (name, sibling["ns"][name], probe["ns"][name], zygote_ns[name])
    assert probe["abstract"] == "ECONNREFUSED", probe
    assert probe["shm"] == probe["msg"] == probe["sem"] == "ENOENT", probe
    assert probe["tmp"] == [] and probe["dev_shm"] == [] and probe["pts"] == ["ptmx"], probe


def test_kill_minus_one_and_a_fork_bomb_stay_inside_one_call(zserver):
    zpid = the_zygote(zserver)
    sibling, box = in_background(zserver, "import time\ntime.sleep(1.5)\nreturn 'sibling'")
    time.sleep(0.5)
    code = """import os, signal
out = []
for target in (1, -1):
    try:
        os.kill(target, signal.SIGKILL)
        out.append("sent")
    except OSError as e:
        out.append(e.errno)
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            import time
            time.sleep(3)
            os._exit(0)
        n += 1
except OSError:
    pass
return [out, n]"""
    got = value(run(zserver, code))
    assert got[1] < 100, got   # the run's pids limit
    sibling.join()
    assert value(box["r"]) == "sibling"
    assert the_zygote(zserver) == zpid
    assert value(run(zserver, "return 'alive'")) == "alive"


# --------------------------------------------------------------------------- memory

def test_memory_holds_nothing_of_an_earlier_call_or_of_the_server(zserver):
    """An earlier call's secret (in its memory and /tmp) is in no later call, pooled or
    running, nor in the zygote; nor is anything of the server's environment. Positive
    control: the running call's own secret is found in its memory."""
    earlier = "earlier-call-" + uuid.uuid4().hex
    value(run(zserver, f"s = {earlier!r} * 3\nopen('/tmp/s', 'w').write(s)\nreturn len(s)"))
    own, mark = "own-call-" + uuid.uuid4().hex, marker()
    code = f"keep = {own!r} * 3\n" + sleeper(mark) + "return 1"
    thread, box = in_background(zserver, code)
    assert wait_until(lambda: running_marker(mark), timeout=10)
    table = proc_table()
    zpid = the_zygote(zserver)
    forked = descendants(zpid, table)
    interpreters = [p for p, i in forked.items() if i["cmdline"].startswith(ZYGOTE_CMDLINE)]
    assert len(interpreters) >= 4, forked   # the running call and the pooled ones: B and C each
    server_things = [SERVER_SECRET, TOKEN, zserver.env["REDIS_URL"], zserver.env["FAAS_REDIS_PREFIX"]]
    found = {pid: memory_holds(pid, [earlier, own, *server_things]) for pid in [zpid, *interpreters]}
    thread.join()
    assert value(box["r"]) == 1
    assert any(own in hits for hits in found.values()), "positive control: the call's own secret not found"
    leaks = {pid: hits - {own} for pid, hits in found.items() if hits - {own}}
    assert not leaks, leaks
    assert own not in found[zpid]


# --------------------------------------------------------------------------- failures

@pytest.fixture
def mid_call(faas):
    """A server without a pool whose zygote runs a call that sleeps 20 s: (server, zygote
    pid, the call's marker, its thread, the box its answer lands in)."""
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_POOL_SIZE": "0"})
    try:
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
        zpid = the_zygote(s)
        mark = marker()
        thread, box = in_background(s, sleeper(mark, 20) + "return 1")
        assert wait_until(lambda: running_marker(mark), timeout=10)
        yield s, zpid, mark, thread, box
    finally:
        s.stop()
    assert "Traceback" not in s.stderr_text()


def assert_replaced(s, zpid, mark, thread, box, counter):
    """The running call ended `killed` (not at its time limit), nothing of it is left, and
    another zygote is up, `counter` (died, hung) counting the old one."""
    thread.join()
    r = box["r"]
    assert r.status == 500 and r.body.get("status") == "killed" and isinstance(r.body.get("error"), str), r.body
    assert wait_until(lambda: not running_marker(mark), timeout=5), "the call outlived its zygote"
    assert wait_until(lambda: zygote(s)["state"] == "up" and zygote(s)[counter] == 1, timeout=20), zygote(s)
    assert the_zygote(s) != zpid and not alive({zpid})
    before = spawn_paths(s)["zygote"]
    assert value(run(s, "return 'forked again'")) == "forked again"
    assert spawn_paths(s)["zygote"] == before + 1
    assert wait_until(lambda: len(run_cgroups(s)) == 1, timeout=10), run_cgroups(s)   # the zygote's own


def test_zygote_killed_mid_call_fails_the_call_cleanly_and_is_restarted(mid_call):
    s, zpid, mark, thread, box = mid_call
    os.kill(zpid, signal.SIGKILL)
    assert_replaced(s, zpid, mark, thread, box, "died")


def test_a_stopped_zygote_is_replaced_and_the_call_that_found_it_takes_the_bwrap_path(mid_call):
    """SIGSTOP leaves the zygote alive but deaf: the next call is not left waiting for its
    time limit, the zygote is killed with the calls it had, and another one takes over."""
    s, zpid, mark, thread, box = mid_call
    before = spawn_paths(s).get("bwrap", 0)
    os.kill(zpid, signal.SIGSTOP)
    try:
        assert value(run(s, "return 'fell back'")) == "fell back"
    finally:
        if alive({zpid}):
            os.kill(zpid, signal.SIGCONT)
    assert spawn_paths(s)["bwrap"] == before + 1
    assert_replaced(s, zpid, mark, thread, box, "hung")


def test_while_the_zygote_is_down_python_calls_take_the_bwrap_path(faas):
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_POOL_SIZE": "0"})
    try:
        fell_back = False
        for _ in range(5):   # the zygote is back within about a second: retry if it won the race
            assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
            before = spawn_paths(s).get("bwrap", 0)
            os.kill(the_zygote(s), signal.SIGKILL)
            assert wait_until(lambda: zygote(s)["state"] == "down", timeout=5)
            assert value(run(s, "return 'fallback'")) == "fallback"
            if spawn_paths(s).get("bwrap", 0) == before + 1:
                fell_back = True
                break
        assert fell_back, s.get("/healthz").body
        assert zygote(s)["fallbacks"] >= 1
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
        assert value(run(s, "return 'back'")) == "back"
    finally:
        s.stop()
    assert "Traceback" not in s.stderr_text()


def run_cgroups(server):
    """Run cgroups of the server under the v1 pids controller (its zygote's included)."""
    found = set()
    for parent in Path("/sys/fs/cgroup/pids").rglob(f"faas-{server.proc.pid}"):
        found |= {p.name for p in parent.iterdir() if p.is_dir()}
    return found


def open_fds(pid):
    """fd -> link target of a running process (its other threads open and close fds meanwhile)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass   # closed since the listing
    return found


def control_socket_of(server):
    """A duplicate of the server's end of its zygote's control socket (pidfd_getfd, as root)."""
    inodes = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[4] == "0005":   # SOCK_SEQPACKET
            inodes[fields[6]] = fields
    ours = [int(fd) for fd, target in open_fds(server.proc.pid).items()
            if (m := re.fullmatch(r"socket:\[(\d+)\]", target)) and m.group(1) in inodes]
    assert len(ours) == 1, ours
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pidfd = os.pidfd_open(server.proc.pid)
    try:
        fd = libc.syscall(438, pidfd, ours[0], 0)   # pidfd_getfd
        assert fd >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


def test_malformed_control_messages_are_refused_and_the_zygote_keeps_serving(faas, tmp_path):
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_POOL_SIZE": "0"})
    try:
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
        zpid = the_zygote(s)
        served = zygote(s)["calls"]
        control = control_socket_of(s)
        junk = os.open(tmp_path / "junk", os.O_RDWR | os.O_CREAT)
        readonly = os.open(tmp_path / "junk", os.O_RDONLY)
        good = {"id": "abc", "args": [], "limits": {"data": 1 << 27, "tmp_size": 1 << 20, "cpu_seconds": 2},
                "cgroups": 0}
        messages = [
            (b"", []), (b"\xff" * 100, []), (b"run", []), (b"run {", []), (b"run []", []),
            (b"run " + json.dumps(good).encode(), []),                       # no fds
            (b"run " + json.dumps(good).encode(), [junk] * 3),               # too few
            (b"run " + json.dumps({**good, "cgroups": 9}).encode(), [junk] * 4),
            (b"run " + json.dumps({**good, "id": "../x"}).encode(), [junk] * 4),
            (b"run " + json.dumps({**good, "args": ["-c", "x"]}).encode(), [junk] * 4),
            (b"run " + json.dumps({**good, "cgroups": "1"}).encode(), [junk] * 5),
            (b"run " + json.dumps({**good, "limits": {"data": -1}}).encode(), [junk] * 4),
            (b"kill nobody", []), (b"kill ", [junk]), (b"x" * 60000, []),
            # well-formed, but its "cgroup join file" is read-only: the call's set-up fails
            (b"run " + json.dumps({**good, "id": "failjoin", "cgroups": 1}).encode(), [readonly] * 5),
        ]
        for message, fds in messages:
            if message:
                control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(
                    b"".join(fd.to_bytes(4, "little") for fd in fds)))] if fds else [])
        control.close()
        os.close(junk)
        os.close(readonly)
        assert value(run(s, "return 'still here'")) == "still here"
        assert the_zygote(s) == zpid and zygote(s)["died"] == 0, zygote(s)
        assert zygote(s)["calls"] == served + 1
        failed_join = "zygote 1: a call's sandbox could not be set up: cgroup join: Bad file descriptor"
        assert wait_until(lambda: s.stderr_text().count("zygote 1: bad") >= 10 and failed_join in s.stderr_text(),
                          timeout=10), s.stderr_text()[-3000:]   # the server logs the reports as they come
        assert len(os.listdir(f"/proc/{zpid}/fd")) <= 8, os.listdir(f"/proc/{zpid}/fd")   # no fd kept
    finally:
        s.stop()
    assert "Traceback" not in s.stderr_text()


def test_the_zygote_is_recycled_after_n_calls(faas):
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_ZYGOTE_CALLS": "4", "FAAS_POOL_SIZE": "0"})
    try:
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
        first = the_zygote(s)
        for batch in range(3):   # the replacement takes over once it is ready: wait for it
            generation = zygote(s)["generation"]
            assert [value(run(s, f"return {i}")) for i in range(4)] == list(range(4))
            assert wait_until(lambda: zygote(s)["generation"] > generation, timeout=20), zygote(s)
        assert zygote(s)["recycled"] == 3 and zygote(s)["died"] == 0, zygote(s)
        assert wait_until(lambda: len(zygote_pids(s)) == 1, timeout=10), zygote_pids(s)   # old ones ended
        assert the_zygote(s) != first
        assert spawn_paths(s) == {"zygote": 12}
    finally:
        s.stop()


BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4:\n    pass\nreturn 1"


def test_rlimit_mode_reports_the_calls_cpu_or_none(faas):
    """Without cgroups, a zygote's call reports the CPU its init counted; a bwrap sandbox's
    CPU is not knowable (bwrap does not wait for its pid 1), so no figure rather than ~0."""
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_LIMITS": "rlimit"})
    try:
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
        assert assert_ok(s.run_now("python", BUSY))["cpu_ms"] >= 300
        assert spawn_paths(s) == {"zygote": 1}
    finally:
        s.stop()
    s = faas.start(store="sqlite", env={"FAAS_LIMITS": "rlimit", "FAAS_ZYGOTE": "off"})
    try:
        body = assert_ok(s.run_now("python", BUSY))
        assert "cpu_ms" not in body and spawn_paths(s) == {"bwrap": 1}, body
    finally:
        s.stop()


# --------------------------------------------------------------------------- many calls

def test_many_calls_keep_the_zygote_flat_and_leave_nothing(faas):
    """10,000 calls (after 200 to warm up): the zygote's RSS stays flat, its mount table
    unchanged, no cgroup or process is left."""
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_POOL_SIZE": "0",
                                        "FAAS_ZYGOTE_CALLS": "100000"})
    try:
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20)
        zpid = the_zygote(s)
        mounts = Path(f"/proc/{zpid}/mountinfo").read_text()

        def calls(n):
            errors = []

            def client():
                for _ in range(n // 4):
                    r = run(s, "return event['n'] * 2", input={"n": 21})
                    if r.status != 200 or r.body.get("data") != 42:
                        errors.append(r.body)
            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors[:3]
        calls(200)
        rss = vm_rss(zpid)
        calls(10_000)
        assert vm_rss(zpid) - rss < 2 << 20, (rss, vm_rss(zpid))
        assert the_zygote(s) == zpid
        assert Path(f"/proc/{zpid}/mountinfo").read_text() == mounts
        assert wait_until(lambda: not descendants(zpid), timeout=10), descendants(zpid)
        assert wait_until(lambda: len(run_cgroups(s)) == 1, timeout=10), run_cgroups(s)
    finally:
        s.stop()


# --------------------------------------------------------------------------- kill -9

@pytest.mark.parametrize("zygote_setting", ["on", "off"])
def test_no_sandbox_outlives_a_server_killed_with_sigkill(faas, zygote_setting):
    """A full pool and calls in flight (one sleeping, one spinning, one with an orphan),
    then SIGKILL to the server: every process below it ends."""
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": zygote_setting, "FAAS_POOL_SIZE": "2"})
    assert wait_until(lambda: all(p["idle"] == 2 for p in s.get("/healthz").body["pool"].values()), timeout=20)
    marks = [marker() for _ in range(3)]
    codes = [f"import subprocess\nsubprocess.run(['sleep', '{marks[0]}'])",
             f"import subprocess\np = subprocess.Popen(['sleep', '{marks[1]}'])\nwhile True:\n    pass",
             f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{marks[2]}'])\nimport time\ntime.sleep(60)"]
    calls = [in_background(s, code) for code in codes]
    assert wait_until(lambda: all(running_marker(m) for m in marks), timeout=15)
    below = set(descendants(s.proc.pid))
    assert len(below) >= 10, below
    s.proc.kill()
    s.proc.wait()
    left = wait_until(lambda: not alive(below) and not any(running_marker(m) for m in marks), timeout=15)
    assert left, {p: proc_table().get(p) for p in alive(below)}
    for thread, box in calls:
        thread.join()
        assert "error" in box, box   # the connection ended with the server


# --------------------------------------------------------------------------- the zygote itself

CAPABILITY_BITS = {"CAP_SETPCAP": 8, "CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_SETFCAP": 31}


def test_the_zygote_holds_nothing_of_the_server_and_only_its_own_capabilities(zserver):
    zpid = the_zygote(zserver)
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{zpid}/status").read_text().splitlines()
                  if ":\t" in line)
    uid = zserver.get("/healthz").body["sandbox_uid"]   # faas's own sandbox user on the host
    gid = pwd.getpwuid(uid).pw_gid
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4, status
    assert uid not in (0, 65534), uid
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
    assert int(status["CapEff"], 16) == sum(1 << bit for bit in CAPABILITY_BITS.values()), status["CapEff"]
    assert os.readlink(f"/proc/{zpid}/ns/user") != os.readlink("/proc/self/ns/user")
    environ = Path(f"/proc/{zpid}/environ").read_bytes().split(b"\0")
    assert {e.split(b"=")[0].decode() for e in environ if e} <= {"PATH", "HOME", "LANG", "PWD", *THREAD_VARIABLES}, \
        environ
    for fd in os.listdir(f"/proc/{zpid}/fd"):
        target = os.readlink(f"/proc/{zpid}/fd/{fd}")
        assert target.startswith(("socket:", "pipe:", "/dev/null")) or fd == "2", (fd, target)


SECRET_PROBE = """import os
return [os.environ.get("A_SECRET"), os.environ.get("OPENBLAS_NUM_THREADS"), os.path.isdir("/faas/layers")]"""


def test_secrets_and_layers_reach_a_zygote_call_and_never_the_zygote(faas):
    """A function's secrets travel in its request, which only the call reads: a zygote call
    sees them, the zygote's memory never holds them. The layer store and the thread
    variables of the bwrap path are there too; a networked call takes the bwrap path."""
    s = faas.start(store="sqlite", env={"FAAS_ZYGOTE": "on", "FAAS_TOKEN": TOKEN, "FAAS_NETWORK": "allow"})
    try:
        assert wait_until(lambda: zygote(s)["state"] == "up", timeout=20), zygote(s)
        secret = "secret-" + uuid.uuid4().hex
        path = "zygote-secrets-" + uuid.uuid4().hex[:8]
        assert_ok(s.post("/upload", {"path": path, "language": "python", "code": SECRET_PROBE}, headers=AUTH))
        assert_ok(s.request("PUT", f"/functions/{path}/secrets", {"A_SECRET": secret}, headers=AUTH))
        before = spawn_paths(s).get("zygote", 0)
        got = value(s.post(f"/run/{path}", {}, headers=AUTH))
        assert got == [secret, "1", True], got
        assert spawn_paths(s).get("zygote", 0) > before, spawn_paths(s)
        assert not memory_holds(the_zygote(s), [secret]), "a call's secret is in the zygote's memory"
        bwrap_before = spawn_paths(s).get("bwrap", 0)
        assert value(run(s, "return 1", network="internet")) == 1
        assert spawn_paths(s).get("bwrap", 0) == bwrap_before + 1, spawn_paths(s)
    finally:
        s.stop()
