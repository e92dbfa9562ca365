"""faas.service and faas.slice under a real systemd (issue 4).

Two runs, each a subprocess that prints one `FAAS-SYSTEMD-SUMMARY {json}` line:
- tests/systemd/container.sh: Debian 12's systemd as PID 1 in a systemd-nspawn container on
  this host's cgroup v1;
- tests/systemd/vm.sh: Debian 12 with Debian's kernel in qemu, systemd on pure cgroup v2.
Both install faas with `python3 faas.py install`, `systemctl enable --now faas` and check it
with curl (tests/systemd/checks.py). They need root (debootstrap, nspawn, mounts); the root
filesystem, kernel and VM image are cached under /var/cache/faas-ci (FAAS_CI_CACHE).
Full output: FAAS_SYSTEMD_LOG_DIR (default /tmp) holds faas-systemd-<where>.log."""
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "systemd"
LOG_DIR = Path(os.environ.get("FAAS_SYSTEMD_LOG_DIR", "/tmp"))

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: debootstrap, systemd-nspawn and mounts"),
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                       reason="the container and VM images are Debian amd64"),
]

# Checks each run must report as passed (names from tests/systemd/checks.py), so that a check
# silently dropped from checks.py cannot make a run look green.
COMMON = [
    "python3 faas.py install",
    "systemctl enable --now faas",
    "Type=notify: /healthz answers as soon as systemctl returns",
    "upload python", "run python", "upload javascript", "run javascript", "upload typescript", "run typescript",
    "memory hog (64M) -> status oom",
    "fork bomb capped by the run's pids limit (FAAS_MAX_PIDS=64)",
    "each run has its own cgroup below faas.service, with the call's memory limit",
    "sandbox processes never run as root on the host",
    "faas.slice MemoryMax/TasksMax/CPUQuota are in the kernel's cgroup files",
    "systemctl stop waited for the running call, which answered 200",
    "stored functions survive the restart (/var/lib/faas)",
    "healthz names the systemd-run backend",
    "python runs in a systemd-run scope",
    "memory hog in a scope -> status oom; the service keeps running",
    "systemctl status faas: active (exit 0)",
]
V2_ONLY = [
    "server moved itself into <faas.service>/server",
    "faas.service enabled memory pids cpu for its children",
    "timeout kills the whole run tree (cgroup.kill): status timeout, no stray processes",
    "OOM kills were counted in faas.service memory.events, and the service kept running (OOMPolicy=continue)",
    "answers carry usage (cpu_ms, memory_peak_bytes)",
]
CONTAINER_ONLY = [
    "killed with SIGKILL -> restarted by systemd and ready",
    "WATCHDOG=1 pings arrive (timestamp advances) and the service stays up",
]


def run_script(where: str, argv: list[str], timeout: float) -> tuple[dict, dict, str]:
    log = LOG_DIR / f"faas-systemd-{where}.log"
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        output = done.stdout
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        output += f"\n[test_systemd] {where} run killed after {timeout} s\n"
    log.write_text(output)
    print(f"{where}: {time.monotonic() - started:.0f} s, full output in {log}")
    summary, timing = {}, {}
    for line in output.splitlines():
        if line.startswith("FAAS-SYSTEMD-SUMMARY "):
            summary = json.loads(line.split(" ", 1)[1])
        elif line.startswith("FAAS-SYSTEMD-TIMING "):
            timing = json.loads(line.split(" ", 1)[1])
    return summary, timing, output


def assert_summary(where: str, summary: dict, output: str, required: list[str]) -> None:
    failed_lines = "\n".join(l for l in output.splitlines() if l.startswith("[FAIL]"))
    assert summary, f"{where}: no FAAS-SYSTEMD-SUMMARY line; last output:\n" + "\n".join(output.splitlines()[-40:])
    assert summary["fail"] == 0, f"{where}: {summary['fail']} checks failed:\n{failed_lines}"
    missing = [name for name in required if name not in summary["checks"]]
    assert not missing, f"{where}: checks that did not run: {missing}"


@pytest.mark.skipif(not shutil.which("unshare") or not Path("/sys/fs/cgroup").is_dir(),
                    reason="needs util-linux unshare and a cgroup file system")
def test_service_in_systemd_container_cgroup_v1():
    summary, timing, output = run_script("container", ["bash", str(HERE / "container.sh")], timeout=600)
    print("timings:", json.dumps(summary.get("timings", {})), json.dumps(timing))
    assert_summary("container", summary, output, COMMON + CONTAINER_ONLY)
    assert summary["cgroup"] == "v1" or Path("/sys/fs/cgroup/cgroup.controllers").exists()


def test_service_in_qemu_vm_cgroup_v2():
    summary, timing, output = run_script("vm", ["bash", str(HERE / "vm.sh")], timeout=1000)
    print("timings:", json.dumps(summary.get("timings", {})), json.dumps(timing))
    assert_summary("vm", summary, output, COMMON + V2_ONLY)
    assert summary["cgroup"] == "v2"
