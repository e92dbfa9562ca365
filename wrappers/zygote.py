"""The Python zygote: one long-lived process that forks a fresh sandbox for every Python call.

    /usr/bin/python3 -I zygote.py CONTROL_FD CALL_SECCOMP_FD CALL_UID CALL_GID

It runs inside one bwrap sandbox of its own (faas's flags, except uid 0 *in its own user
namespace*, which is faas's sandbox uid on the host, and CAP_SYS_ADMIN/CAP_SETPCAP/CAP_SETFCAP there only).
It imports the Python wrapper once, then, per call, clones a child that becomes the call's
sandbox (research/forkserver.md, design (a)):

  B, pid 1 of new mount, pid, net, ipc and uts namespaces, in this order, each step checked
  and `_exit(125)` on any failure: joins the call's cgroups through the files the server
  (root) opened, unshares a cgroup namespace rooted there, brings up lo, mounts a fresh /tmp, /dev/shm,
  devpts and /proc (+ read-only /proc/sys),
  enters a user namespace of its own (bwrap's uid/gid for a call: no capability over any namespace it
  lives in, all of which belong to the zygote's), drops every capability, sets
  no_new_privs and the call's seccomp filter (faas's deny-list, plus clone(CLONE_NEWUSER)
  and clone3 refused), then forks
  C, pid 2: the call's rlimits and environment, its four pipes on fds 0-3 and no other fd,
  and the wrapper's main(), which reads the request. B stays the namespace's init: it
  reaps, and exits with C's status (128+n when C died of signal n), which ends whatever
  C left behind. Layout and statuses are those of a bwrap sandbox.

The control socket (SOCK_SEQPACKET) is the zygote's only input; it holds nothing of the
server (bwrap cleared its environment). Messages, one per packet:
  server -> zygote  b"run " + JSON {"id", "args", "limits", "cgroups"} with SCM_RIGHTS
                    [stdin_r, stdout_w, stderr_w, result_w, cgroup join files...]
                    b"kill ID"     end that call (B kills its namespace, reaps, exits 137)
  zygote -> server  b"ready", then b"exit ID CODE CPU_US" once B is reaped (CODE as
                    os.waitstatus_to_exitcode; CPU_US is B's and everything it reaped), and
                    b"bad ID REASON" for a message it refused (ID "-" when it has none), and
                    so for a call it could not start: that call is over
  B -> server       b"fail ID REASON" when a step of its set-up failed (then it exits 125).
EOF on the socket (the server is gone) ends the zygote, and with it every call: they live in
namespaces nested in the zygote sandbox's pid namespace.
"""
import array
import ctypes
import fcntl
import gc
import io
import os
import resource
import select
import signal
import socket
import struct
import sys

WRAPPERS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, WRAPPERS)
import python as wrapper  # noqa: E402  imported once: every call starts with it loaded

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long
libc.pthread_self.restype = ctypes.c_void_p

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x00200000, 0x01000000
CALL_NAMESPACES = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
PR_SET_PDEATHSIG, PR_GET_SECCOMP, PR_SET_SECCOMP, PR_CAPBSET_READ, PR_CAPBSET_DROP = 1, 21, 22, 23, 24
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 39, 47, 4
SYSCALLS = {   # the few calls the os module lacks: x86_64, aarch64
    "x86_64": {"clone": 56, "capset": 126, "capget": 125, "gettid": 186},
    "aarch64": {"clone": 220, "capset": 91, "capget": 90, "gettid": 178},
}[os.uname().machine]
CAP_LAST = int(open("/proc/sys/kernel/cap_last_cap").read())
CALL_UID = CALL_GID = -1   # the uid and gid a bwrap sandbox has: set by main()
MAX_FDS = 16                # 4 pipes + at most 12 cgroup join files
BASE_ENV = dict(os.environ)  # bwrap's --clearenv + PATH, HOME, LANG


class StepFailed(Exception):
    pass


def check(ret, what):
    if ret == -1:
        error = ctypes.get_errno()
        raise StepFailed(f"{what}: {os.strerror(error)}")
    return ret


def expect(condition, what):
    if not condition:
        raise StepFailed(what)


# -- clone() with namespace flags, from Python ----------------------------------------------
# os.fork() takes no flags and fork + unshare + fork costs ~0.7 ms more per call. A raw clone
# through ctypes.pythonapi (the GIL stays held), CPython's before/after-fork hooks around it,
# and CLONE_CHILD_SETTID pointed at glibc's cached tid in its struct pthread (as glibc's own
# fork() does), so raise()/pthread_kill() in the child address the child.
_pyapi = ctypes.pythonapi
_pyapi.syscall.restype = ctypes.c_long
_pyapi.syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_ulong]


def tid_offsets():
    """Offsets of the ints in this thread's struct pthread that equal its tid."""
    base, tid = libc.pthread_self(), libc.syscall(SYSCALLS["gettid"])
    words = (ctypes.c_int * 1024).from_address(base)
    return {i for i in range(1024) if words[i] == tid}


def glibc_tid_address():
    """The address of the int in this thread's struct pthread that holds its tid: the
    offset that equals the tid both here and in a forked child (glibc's fork updates it;
    small tids such as a sandbox's 2 also match unrelated fields)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, " ".join(map(str, tid_offsets())).encode())
        os._exit(0)
    os.close(write_end)
    in_child = {int(i) for i in os.read(read_end, 65536).split()}
    os.close(read_end)
    os.waitpid(child, 0)
    hits = tid_offsets() & in_child
    if len(hits) != 1:
        raise SystemExit(f"zygote: cannot find glibc's cached tid ({len(hits)} candidates)")
    return libc.pthread_self() + 4 * hits.pop()


TID_ADDRESS = glibc_tid_address()


def clone(flags):
    _pyapi.PyOS_BeforeFork()
    pid = _pyapi.syscall(SYSCALLS["clone"], flags | signal.SIGCHLD | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID,
                         None, None, TID_ADDRESS, 0)
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")
    return pid


# -- the steps of B ------------------------------------------------------------------------
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def read_filter(fd):
    """The call's seccomp program, read once from the fd the server gave."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    if not data or len(data) % 8:
        raise SystemExit("zygote: the seccomp program is empty or not whole instructions")
    program = ctypes.create_string_buffer(data, len(data))
    return program, SockFprog(len(data) // 8, ctypes.addressof(program))


CALL_FILTER = None


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source, target, fstype, flags, data), f"mount {target!r}")


def join_cgroups(fds):
    """Write 0 ("myself") to each join file the server opened: before anything of the call
    runs or is born. Then a cgroup namespace rooted there (/proc/self/cgroup reads "/")."""
    for fd in fds:
        try:
            os.write(fd, b"0")
        except OSError as error:
            raise StepFailed(f"cgroup join: {error.strerror}") from None
        os.close(fd)
    check(libc.unshare(CLONE_NEWCGROUP), "unshare cgroup")


def fresh_mounts(tmp_size):
    """What bwrap's --tmpfs /tmp, --tmpfs /dev/shm, --dev (devpts) and --proc give a call.
    Mounts here are private (bwrap made them so), so nothing propagates back to the zygote
    or a sibling."""
    mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=%d" % tmp_size)
    mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=%d" % (16 << 20))
    mount(b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC, b"newinstance,ptmxmode=0666,mode=620")
    mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(b"/proc/sys", b"/proc/sys", None, MS_BIND)
    mount(None, b"/proc/sys", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir("/tmp")   # the old cwd is the zygote's /tmp, under the new mount


def loopback_up():
    """The new network namespace's lo is down: up, as bwrap does (127.0.0.1 then refuses
    connections instead of being unreachable, and a call can talk to itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        flags = 0x1 | 0x8 | 0x40   # IFF_UP | IFF_LOOPBACK | IFF_RUNNING
        fcntl.ioctl(probe, 0x8914, struct.pack("16sH22x", b"lo", flags))   # SIOCSIFFLAGS


def own_user_namespace():
    """A user namespace nested in the zygote's, the call's uid/gid mapped to its 0 (the
    zygote's own host uid and gid)."""
    check(libc.unshare(CLONE_NEWUSER), "unshare user")
    for name, text in (("setgroups", b"deny"), ("uid_map", b"%d 0 1" % CALL_UID),
                       ("gid_map", b"%d 0 1" % CALL_GID)):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            expect(os.write(fd, text) == len(text), f"write {name}")
        finally:
            os.close(fd)


def drop_everything():
    """No capability in any set, the call's uid and gid, no_new_privs, seccomp; each checked."""
    for cap in range(CAP_LAST + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop bounding set")
    os.setresgid(CALL_GID, CALL_GID, CALL_GID)
    os.setresuid(CALL_UID, CALL_UID, CALL_UID)
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
    header, data = CapHeader(0x20080522, 0), (CapData * 2)()
    check(libc.syscall(SYSCALLS["capset"], ctypes.byref(header), ctypes.byref(data)), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(CALL_FILTER[1]), 0, 0), "seccomp")
    # the result, as the kernel sees it
    check(libc.syscall(SYSCALLS["capget"], ctypes.byref(header), ctypes.byref(data)), "capget")
    expect(all(getattr(d, f) == 0 for d in data for f in ("effective", "permitted", "inheritable")),
           "capabilities left")
    expect(all(libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 0 for cap in range(CAP_LAST + 1)),
           "bounding set not empty")
    expect(os.getresuid() == (CALL_UID,) * 3 and os.getresgid() == (CALL_GID,) * 3, "ids")
    expect(libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1, "no_new_privs not set")
    expect(libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) == 2, "seccomp not in filter mode")


def set_rlimits(limits):
    """faas's second layer (rlimit_commands), set by C on itself."""
    cpu_seconds = limits["cpu_seconds"]
    for kind, value in ((resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_DATA, (limits["data"],) * 2),
                        (resource.RLIMIT_FSIZE, (limits["tmp_size"],) * 2),
                        (resource.RLIMIT_NOFILE, (1024, 1024)),
                        (resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))):
        resource.setrlimit(kind, value)


def fresh_std_streams():
    """The inherited sys.std* were built for the zygote's fds (stdin /dev/null: seekable);
    build them anew on the call's pipes as a fresh `python3 -I` would."""
    def stream(fd, mode, **options):
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", **options)
    sys.stdin = sys.__stdin__ = stream(0, "r")
    sys.stdout = sys.__stdout__ = stream(1, "w")
    sys.stderr = sys.__stderr__ = stream(2, "w", errors="backslashreplace", line_buffering=True)


def warm_up():
    """A pre-started call waits for its request: write now, off the call's path, to the
    pages a call writes (reference counts of the wrapper's and the interpreter's objects),
    which it shares copy-on-write with the zygote. Leaves nothing behind: fresh globals,
    results dropped. Twice: the second pass reaches what the first one's allocations
    moved (measured: a pooled call 1.9 ms -> 1.25 ms once -> 0.97 ms twice; bwrap's 0.91)."""
    for _ in range(2):
        code, is_async = wrapper.build("return [len(event), 'x', {'y': 2.5}, None, True]")
        wrapper.dump({"ok": True, "value": wrapper.run(code, is_async, {"a": 1})})
        wrapper.loads('{"code": "return 1", "event": {"a": [1, 2.5, "x", null, true, false]}}')


def become_call(request, pipes):
    """C: the call itself, as `python3 -I python.py` would start it. Never returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # KeyboardInterrupt, as at start-up
    sys.path.remove(WRAPPERS)   # -I keeps a script's directory off the path
    set_rlimits(request["limits"])
    for target, fd in enumerate(pipes):
        os.dup2(fd, target)
    os.closerange(4, 1 << 20)
    os.environ.clear()
    os.environ.update(BASE_ENV)
    fresh_std_streams()
    if not {"--cold", "--check"} & set(request["args"]):
        warm_up()
    wrapper.main(request["args"] + ["3"])   # reads the request, answers, os._exit(0)
    os._exit(0)


KILLED = False   # B: the server asked to end the call (SIGTERM from the zygote)


def kill_all(*_):
    """B: SIGKILL everything else in the call's pid namespace (B is its init)."""
    global KILLED
    KILLED = True
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass


def be_init(child):
    """B after the fork: the namespace's init. Reaps; leaves with C's status. On SIGTERM
    (the server's kill) it kills everything in its namespace first and still reaps it, so
    its own rusage counts the call's CPU (what rlimit mode reports)."""
    if KILLED:   # asked before C existed
        kill_all()
    os.closerange(0, 1 << 20)   # the call's pipes close when C and what it started end
    status = None
    while True:
        try:
            pid, code = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            status = os.waitstatus_to_exitcode(code)
            kill_all()   # whatever C left behind ends with it, as under bwrap
    os._exit(125 if status is None else status if status >= 0 else 128 - status)


def child_b(request, fds, control):
    """pid 1 of the call's namespaces. Never returns. A failed step is reported to the
    server on the control socket, which B closes before anything of the call exists."""
    try:
        signal.signal(signal.SIGTERM, kill_all)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in fds]   # clear of 0..3
        pipes, cgroup_fds = fds[:4], fds[4:]
        join_cgroups(cgroup_fds)
        loopback_up()
        fresh_mounts(request["limits"]["tmp_size"])
        own_user_namespace()
        drop_everything()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # again, after the credential changes
        control.close()
        child = os.fork()
        if child == 0:
            become_call(request, pipes)
        be_init(child)
    except BaseException as error:
        try:
            control.send(f"fail {request['id']} {error}"[:1000].encode())
        except OSError:   # already closed: the call had started
            os.write(2, f"faas zygote: call {request['id']}: {error}\n".encode())
        finally:
            os._exit(125)


# -- the control loop ------------------------------------------------------------------------
def valid_id(token):
    return isinstance(token, str) and 0 < len(token) <= 32 and token.isascii() and token.isalnum()


def request_id(message):
    """The id of a run request, if it has a valid one, else "-" (for refusals)."""
    try:
        token = wrapper.loads(message[4:].decode()).get("id")
    except Exception:   # ValueError, UnicodeDecodeError; the C scanner's SystemError on ""
        return "-"
    return token if valid_id(token) else "-"


def parse_request(message, fds):
    """The run request, validated, or a reason to refuse it."""
    try:
        request = wrapper.loads(message[4:].decode())
    except Exception:
        return None, "not JSON"
    shapes = {"id": str, "args": list, "limits": dict, "cgroups": int}
    if not isinstance(request, dict) or any(not isinstance(request.get(k), t) for k, t in shapes.items()):
        return None, "fields missing or of the wrong type"
    limits = request["limits"]
    if not valid_id(request["id"]):
        return None, "invalid id"
    if len(fds) != 4 + request["cgroups"]:
        return None, f"{len(fds)} fds for {request['cgroups']} cgroups"
    if not all(isinstance(limits.get(k), int) and limits[k] > 0 for k in ("data", "tmp_size", "cpu_seconds")):
        return None, "invalid limits"
    if not all(isinstance(a, str) and a.startswith("--") for a in request["args"]):
        return None, "invalid args"
    return request, None


class Zygote:
    def __init__(self, control):
        self.control = control
        self.running = {}   # B's pid -> the call's id
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def reply(self, text):
        try:
            self.control.send(text.encode())
        except OSError:
            os._exit(0)   # the server is gone: so are the calls (our pid namespace ends)

    def serve(self):
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        gc.collect()
        gc.freeze()   # what is loaded now: a child's collections never touch (copy) it
        self.reply("ready")
        while True:
            ready, _, _ = select.select([self.control, self.wake_r], [], [])
            if self.wake_r in ready:
                self.reap()
            if self.control in ready:
                self.receive()

    def reap(self):
        while True:
            try:
                os.read(self.wake_r, 512)
            except BlockingIOError:
                break
        while self.running:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            cpu_us = int((usage.ru_utime + usage.ru_stime) * 1_000_000)
            self.reply(f"exit {self.running.pop(pid)} {os.waitstatus_to_exitcode(status)} {cpu_us}")

    def receive(self):
        fds = array.array("i")
        try:
            message, ancillary, flags, _ = self.control.recvmsg(
                1 << 16, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        except OSError:
            os._exit(0)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        fds = list(fds)
        if not message:
            os._exit(0)   # EOF: the server closed us
        token = request_id(message) if message.startswith(b"run ") else "-"
        try:
            if message.startswith(b"run ") and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                self.run(message, fds)
            elif message.startswith(b"kill ") and not fds:
                self.kill(message[5:].decode("ascii", "replace"))
            else:
                self.reply(f"bad {token} unknown or truncated message")
        except Exception as error:   # never the zygote's end: the message is refused
            self.reply(f"bad {token} {type(error).__name__}: {error}"[:500])
        finally:
            for fd in fds:
                os.close(fd)

    def run(self, message, fds):
        request, reason = parse_request(message, fds)
        if request is None:
            self.reply(f"bad {request_id(message)} {reason}")
            return
        pid = clone(CALL_NAMESPACES)
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGCHLD, signal.SIGINT):   # pid 1 ignores what it does not handle
                signal.signal(number, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            child_b(request, fds, self.control)
        self.running[pid] = request["id"]
        self.reply(f"forked {request['id']}")   # the server waits for this: a hung zygote is seen at once

    def kill(self, token):
        for pid, running in self.running.items():
            if running == token:
                os.kill(pid, signal.SIGTERM)


def main(argv):
    global CALL_FILTER, CALL_UID, CALL_GID
    for fd in (0, 1, 2):   # fds received later must never land on 0..2
        try:
            os.fstat(fd)
        except OSError:
            os.open("/dev/null", os.O_RDWR)
    control_fd, filter_fd, CALL_UID, CALL_GID = (int(arg) for arg in argv[:4])
    CALL_FILTER = read_filter(filter_fd)
    Zygote(socket.socket(fileno=control_fd)).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
