"""Sandboxes run as a host user of faas's own, never as the shared `nobody` (65534): its
namespaces would otherwise be owned by every other process running as that uid
(research/network.md §7). Needs root (only root drops to another uid)."""
import os
import pwd
import subprocess
import uuid

import pytest

from tests.helpers import assert_ok, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox user exists only for a root server")

NOBODY = 65534
WHOAMI = "import os\nreturn [os.getuid(), os.geteuid(), os.getgid(), open('/proc/self/status').read()]"


def free_uid():
    """A uid no user and no process has."""
    used = {int(line.split()[1]) for pid in os.listdir("/proc") if pid.isdigit()
            for line in _status(pid) if line.startswith("Uid:")}
    for uid in range(61000, 62000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in used:
                return uid
    raise AssertionError("no free uid found")


def _status(pid):
    try:
        return open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return []


def test_default_sandbox_user_is_faas_own_and_created(faas):
    server = faas.start(store="sqlite", env={"FAAS_POOL_SIZE": "1"})
    try:
        uid = server.get("/healthz").body["sandbox_uid"]
        entry = pwd.getpwnam("faas-sandbox")
        assert uid == entry.pw_uid and uid not in (0, NOBODY), (uid, entry)
        for language, code in (("python", WHOAMI), ("javascript", "return [process.getuid(), process.geteuid(), "
                                                    "process.getgid(), require('fs').readFileSync('/proc/self/status', 'utf8')]")):
            got = assert_ok(server.run_now(language, code))["data"]
            assert got[:3] == [uid, uid, entry.pw_gid], got[:3]
            assert "CapEff:\t0000000000000000" in got[3]
    finally:
        server.stop()


def test_a_missing_sandbox_user_is_created_by_the_server(faas):
    name = "faastest" + uuid.uuid4().hex[:8]
    server = faas.start(store="sqlite", env={"FAAS_SANDBOX_USER": name, "FAAS_POOL_SIZE": "0"})
    try:
        entry = pwd.getpwnam(name)
        assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_uid < 1000, entry
        got = assert_ok(server.run_now("python", WHOAMI))["data"]
        assert got[0] == entry.pw_uid
    finally:
        server.stop()
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_nobody_is_refused(faas):
    server = faas.start(store="sqlite", env={"FAAS_SANDBOX_UID": str(NOBODY)}, wait=False)
    assert server.proc.wait(20) == 2
    assert "FAAS_SANDBOX_UID=65534" in server.stderr_text() and "nobody" in server.stderr_text()


def test_a_uid_another_host_process_runs_as_is_refused(faas):
    uid = free_uid()
    squatter = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "60"])
    try:
        assert wait_until(lambda: any(line.split()[1] == str(uid) for line in _status(squatter.pid)
                                      if line.startswith("Uid:")), timeout=5)
        server = faas.start(store="sqlite", env={"FAAS_SANDBOX_UID": str(uid)}, wait=False)
        assert server.proc.wait(20) == 1
        err = server.stderr_text()
        assert f"host uid {uid}" in err and f"pid {squatter.pid}" in err and "faas alone" in err, err
    finally:
        squatter.kill()
        squatter.wait()
    # the same uid, once free, is accepted, and two servers may share it (their sandboxes are theirs)
    first = faas.start(store="sqlite", env={"FAAS_SANDBOX_UID": str(uid), "FAAS_POOL_SIZE": "1"})
    second = faas.start(store="sqlite", env={"FAAS_SANDBOX_UID": str(uid), "FAAS_POOL_SIZE": "1"})
    try:
        for server in (first, second):
            assert assert_ok(server.run_now("python", WHOAMI))["data"][0] == uid
    finally:
        first.stop()
        second.stop()
