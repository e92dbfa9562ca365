"""The gate: the first process of every sandbox joins its run's cgroups itself. A join
that fails is the server's fault (a cgroup removed under it), never the code's: the call
must fail as an internal error, not as the function's, and leave nothing behind.

A failed join cannot be provoked through HTTP, so this drives faas.Sandbox directly with
the real cgroup-v1 backend and real bwrap, and removes one of a run's cgroups before its
sandbox starts.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import faas   # the repository root is on sys.path through its conftest.py
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/fs/cgroup/cpuacct").is_dir(),
    reason="needs root and cgroup v1 hierarchies")


class CpuCgroupRemoved:
    """The real backend, but every run loses its cpu cgroup before the gate joins it."""
    name = "cgroup-v1"

    def __init__(self, real):
        self.real = real
        self.runs = []

    def create(self, run_id, limits):
        run = self.real.create(run_id, limits)
        os.rmdir(run.dirs["cpu"])
        self.runs.append(run)
        return run

    def close(self):
        self.real.close()


@pytest.fixture
def runtime_dir():
    """Where the server would put it: a fresh /tmp directory the sandbox user can reach."""
    path = Path(tempfile.mkdtemp(prefix="faas-runtime-test-"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def sandbox(runtime_dir):
    config = faas.Config.from_env({})
    backend = CpuCgroupRemoved(faas.CgroupV1Backend())
    yield faas.Sandbox(config, backend, runtime_dir), backend, faas.Limits.from_config(config)
    backend.close()


def test_a_failed_join_is_a_server_error_and_leaves_nothing(sandbox):
    box, backend, limits = sandbox
    request = json.dumps({"code": "return 1", "event": None, "language": "python"}).encode()
    with pytest.raises(faas.SandboxError, match="could not join its cgroups"):
        box.run(list(faas.RUNTIMES["python"].argv), request, limits)
    run = backend.runs[-1]
    assert not any(os.path.exists(directory) for directory in run.dirs.values()), run.dirs


def test_a_joined_sandbox_that_fails_is_the_functions_failure(runtime_dir):
    """The same path with nothing removed: an exit without a result stays the code's."""
    config = faas.Config.from_env({})
    backend = faas.CgroupV1Backend()
    try:
        box = faas.Sandbox(config, backend, runtime_dir)
        request = json.dumps({"code": "import os\nos._exit(3)", "event": None, "language": "python"}).encode()
        outcome = box.run(list(faas.RUNTIMES["python"].argv), request, faas.Limits.from_config(config))
        assert (outcome.exit_code, outcome.result, outcome.joined) == (3, None, True), outcome.stderr
    finally:
        backend.close()


def test_a_pooled_sandbox_that_could_not_join_is_logged_and_not_used(sandbox, caplog):
    box, backend, limits = sandbox
    argv = faas.RUNTIMES["python"].argv
    pool = faas.Pool(box, {argv: 1}, limits, idle_seconds=300)
    try:
        assert wait_until(lambda: pool.describe()["python"]["idle"] == 1, timeout=10)
        assert wait_until(lambda: pool.idle[argv] and pool.idle[argv][0].proc.poll() is not None, timeout=10)
        assert pool.take(argv, limits) is None
        assert "could not join its cgroups" in caplog.text
    finally:
        pool.close()
    assert not any(os.path.exists(d) for run in backend.runs for d in run.dirs.values())
