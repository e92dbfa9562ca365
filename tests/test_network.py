"""Opt-in internet for functions, tested in the lab of research/network.md (tests/netlab.py):
the faas server runs inside a lab namespace whose only links lead to a lab "internet" and a
lab "LAN", so no packet of these tests can leave the machine, even if the filter were
broken. The test process itself talks to that server from inside the lab namespace.
Needs root (namespaces, nftables, slirp4netns)."""
import concurrent.futures
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import conftest
from conftest import FAAS_PY, FaasServer, assert_clean_log, clean_env, free_port
from tests import netlab
from tests.helpers import assert_error, assert_ok, descendants, proc_table, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("slirp4netns", "nft", "ip", "nsenter")),
    reason="needs root, slirp4netns, nftables and iproute2")

MAX_CONNECTIONS = 10
CONNECT_ERRORS = {"EHOSTUNREACH", "ENETUNREACH", "ECONNREFUSED", "EPERM", "EACCES"}

# One connect per target, 3 s each: the answer is the server's tag, or the connect error.
PROBE_PY = """import errno, socket
out = {}
for host, port in event["tcp"]:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        out[f"{host}:{port}"] = "OPEN:" + s.recv(4096).decode().rsplit("\\n", 1)[-1]
    except socket.timeout:
        out[f"{host}:{port}"] = "TIMEOUT"
    except socket.gaierror as e:
        out[f"{host}:{port}"] = "DNS:" + str(e)
    except OSError as e:
        out[f"{host}:{port}"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
for host, port in event.get("udp", []):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(event["mark"].encode(), (host, port))
        out[f"udp:{host}:{port}"] = "SENT"
    except OSError as e:
        out[f"udp:{host}:{port}"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
return out"""

NODE_FETCH = """const http = require('http');
const get = (url) => new Promise((resolve) => {
  const req = http.get(url, { timeout: 3000 }, (res) => {
    let body = '';
    res.on('data', (c) => { body += c; });
    res.on('end', () => resolve('OPEN:' + body));
  });
  req.on('timeout', () => { req.destroy(); resolve('TIMEOUT'); });
  req.on('error', (e) => resolve(e.code || String(e)));
});
const out = {};
for (const url of event.urls) out[url] = await get(url);
return out;"""


class LabServer(FaasServer):
    """A faas server inside the lab host namespace; its client calls run there too."""
    lab = None

    def request(self, method, path, body=None, headers=None, timeout=60):
        with netlab.netns(self.lab.host):
            return conftest.request(self.url, method, path, body, headers, timeout)

    def get(self, path, headers=None, timeout=60):
        return self.request("GET", path, None, headers, timeout)

    def post(self, path, body=None, headers=None, timeout=60):
        return self.request("POST", path, body, headers, timeout)

    def sse(self, path, body=None, headers=None, timeout=60):
        with netlab.netns(self.lab.host):   # the connection is made here; reading it works anywhere
            return conftest.SSEStream(self.url, path, body, headers, timeout)


def in_lab_host(lab, argv):
    """argv run in the lab host's network namespace, with the lab's resolver."""
    resolv = f"/etc/netns/{lab.host}/resolv.conf"
    return ["nsenter", f"--net=/run/netns/{lab.host}", "--", "unshare", "--mount", "--propagation", "private",
            "--", "/bin/sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv, *argv]


def start_in_lab(faas, lab, env, own_mounts=True):
    """`python3 faas.py` in the lab host's network namespace (nsenter, so the cgroup mounts
    stay as they are) with the lab resolver as its /etc/resolv.conf (a private mount), or,
    without own_mounts, in this machine's mount namespace (and its resolv.conf: such a
    server's functions must not look up names, which would leave the lab)."""
    full = clean_env()
    port = free_port()
    full.update(FAAS_DATA_DIR=str(faas.tmp.mktemp("faas-data")), HTTP_PORT=str(port), **env)
    logdir = faas.tmp.mktemp("faas-log")
    command = in_lab_host(lab, [sys.executable, str(FAAS_PY)]) if own_mounts else \
        ["nsenter", f"--net=/run/netns/{lab.host}", "--", sys.executable, str(FAAS_PY)]
    with open(logdir / "stderr.txt", "wb") as err, open(logdir / "stdout.txt", "wb") as out:
        proc = subprocess.Popen(command, cwd=str(conftest.REPO), env=full, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
    server = LabServer(proc, port, "127.0.0.1", logdir / "stderr.txt", logdir / "stdout.txt", full, "sqlite",
                       conftest.REPO)
    server.lab = lab
    faas.servers.append(server)
    faas.wait_healthy(server)
    return server


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    built = netlab.Lab(tmp_path_factory.mktemp("netlab"))
    try:
        built.up()
        yield built
    finally:
        built.down()


@pytest.fixture(scope="module")
def srv(faas, lab):
    server = start_in_lab(faas, lab, {"FAAS_NETWORK": "allow", "FAAS_POOL_SIZE": "1", "TIMEOUT_SCRIPT": "10",
                                      "FAAS_NETWORK_MAX_CONNECTIONS": str(MAX_CONNECTIONS)})
    assert wait_until(lambda: all(p["idle"] == p["size"] == 1 for p in server.get("/healthz").body["network_pool"].values()),
                      timeout=20), server.get("/healthz").body["network_pool"]
    yield server
    server.stop()
    assert_clean_log(server)


def probe(server, tcp, udp=(), mark="", network="internet"):
    body = assert_ok(server.run_now("python", PROBE_PY, input={"tcp": tcp, "udp": list(udp), "mark": mark},
                                    network=network))
    return body["data"]


def test_the_lab_answers_from_the_host_namespace(lab):
    """Positive control: every target the sandbox must not reach does answer when asked
    directly from the lab host, so a refusal below is the filter's doing."""
    assert lab.fetch(netlab.INTERNET) == "INTERNET"
    assert lab.fetch(netlab.ROUTER) == "INTERNET"
    for address in (netlab.LAN, *netlab.LAN_EXTRA):
        assert lab.fetch(address) == "LAN", address
    assert lab.fetch(netlab.HOST_PUBLIC, 9000) == lab.fetch(netlab.HOST_LAN, 9000) == "HOST-ANYADDR"
    assert lab.fetch("127.0.0.1", 6379) == "HOST-REDIS"


def test_a_networked_function_reaches_the_internet_by_address_and_by_name(srv):
    got = probe(srv, [[netlab.INTERNET, 80], ["api.example.test", 80]])
    assert got == {f"{netlab.INTERNET}:80": "OPEN:INTERNET", "api.example.test:80": "OPEN:INTERNET"}
    node = assert_ok(srv.run_now("javascript", NODE_FETCH, network="internet",
                                 input={"urls": [f"http://{netlab.INTERNET}/", "http://api.example.test/",
                                                 "http://169.254.169.254/"]}))["data"]
    assert node[f"http://{netlab.INTERNET}/"] == "OPEN:INTERNET"
    assert node["http://api.example.test/"] == "OPEN:INTERNET"
    assert node["http://169.254.169.254/"] in CONNECT_ERRORS, node
    ts = "const r: string = await new Promise((ok) => require('http').get('http://api.example.test/', " \
         "(res: any) => { let b = ''; res.on('data', (c: any) => b += c); res.on('end', () => ok(b)); })); return r;"
    assert assert_ok(srv.run_now("typescript", ts, network="internet"))["data"] == "INTERNET"
    pools = srv.get("/healthz").body["network_pool"]
    assert pools["python"]["hits"] >= 1 and pools["node"]["hits"] >= 1, pools   # pre-started ones were used


HTTPS_PY = """import ssl, urllib.request
system = ssl.create_default_context().cert_store_stats()["x509_ca"]
lab = ssl.create_default_context(cadata=event["ca"])
body = urllib.request.urlopen("https://api.example.test/", context=lab, timeout=5).read().decode()
try:
    urllib.request.urlopen("https://api.example.test/", timeout=5)
    unknown = "accepted"
except Exception as e:
    unknown = "CERTIFICATE_VERIFY_FAILED" if "CERTIFICATE_VERIFY_FAILED" in str(e) else repr(e)
return [system, body, unknown]"""
HTTPS_JS = """const https = require('https'), tls = require('tls');
const get = (ca) => new Promise((ok) => https.get({ host: 'api.example.test', path: '/', ca, timeout: 5000 }, (res) => {
  let b = ''; res.on('data', (c) => { b += c; }); res.on('end', () => ok(b)); }).on('error', (e) => ok(e.code)));
return [tls.rootCertificates.length, await get(event.ca), await get(undefined)];"""


def test_https_works_with_the_system_certificates_and_verifies(srv, lab):
    """The system CA store is there (Python loads it from /etc/ssl/certs, Node has its own),
    and TLS through slirp verifies: the lab's CA is trusted only when the code says so."""
    ca = lab.serve_https()
    system, body, unknown = assert_ok(srv.run_now("python", HTTPS_PY, network="internet", input={"ca": ca}))["data"]
    assert system > 50 and body == "INTERNET-TLS" and unknown == "CERTIFICATE_VERIFY_FAILED", (system, body, unknown)
    roots, body, unknown = assert_ok(srv.run_now("javascript", HTTPS_JS, network="internet", input={"ca": ca}))["data"]
    assert roots > 50 and body == "INTERNET-TLS" and unknown == "UNABLE_TO_VERIFY_LEAF_SIGNATURE", (roots, body, unknown)


def test_the_host_its_networks_and_private_ranges_are_refused_at_once(srv, lab):
    port = srv.port
    targets = [["127.0.0.1", port], ["127.0.0.1", 6379], ["localhost", port],   # the sandbox's own loopback
               ["10.0.2.2", port], ["10.0.2.2", 6379], ["10.0.2.3", 80],       # slirp's host aliases
               [netlab.HOST_PUBLIC, 9000], [netlab.HOST_LAN, 9000], [netlab.HOST_PUBLIC, port],
               [netlab.ROUTER, 80],                                            # an on-link neighbour
               [netlab.LAN, 80], *([a, 80] for a in netlab.LAN_EXTRA),
               ["rebind.test", 80], ["meta.test", 80]]                         # names resolving there
    mark = "faas-udp-" + os.urandom(4).hex()
    udp = [[netlab.LAN, 5353], ["169.254.169.254", 5353], ["172.16.5.5", 5353], ["224.0.0.251", 5353]]
    got = probe(srv, targets, udp, mark)
    for target, outcome in got.items():
        if target.startswith("udp:"):
            assert outcome in CONNECT_ERRORS, (target, outcome)
        else:
            assert outcome in CONNECT_ERRORS, (target, outcome)   # an error at once: not OPEN, not TIMEOUT
    # nothing arrived at the LAN's UDP logger, which does log what the lab host sends it
    with netlab.netns(lab.host):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"control-" + mark.encode(), (netlab.LAN, 5353))
    assert wait_until(lambda: lab.udp_log.exists() and b"control-" + mark.encode() in lab.udp_log.read_bytes())
    assert mark.encode() + b"\n" not in lab.udp_log.read_bytes().replace(b"control-" + mark.encode(), b"")
    assert srv.get("/healthz").status == 200


def test_an_address_the_host_gains_later_is_refused_too(srv, lab):
    """The filter is rewritten when the host's addresses change (checked every 2 s), and a
    pre-started networked sandbox whose filter predates the change is not used."""
    new = "192.0.2.77"   # not a private range: only "it is the host's own" blocks it
    assert wait_until(lambda: srv.get("/healthz").body["network_pool"]["python"]["idle"] == 1, timeout=10)
    netlab.sh("ip", "-n", lab.host, "addr", "add", f"{new}/32", "dev", "lo")
    try:
        assert lab.fetch(new, 9000) == "HOST-ANYADDR"
        time.sleep(2.5)   # the addresses are looked at again when 2 s have passed
        before = srv.get("/healthz").body["network_pool"]["python"]["hits"]
        for _ in range(3):   # the first would have used the sandbox pre-started before the change
            assert probe(srv, [[new, 9000]])[f"{new}:9000"] in CONNECT_ERRORS
            wait_until(lambda: srv.get("/healthz").body["network_pool"]["python"]["idle"] == 1, timeout=10)
        assert srv.get("/healthz").body["network_pool"]["python"]["hits"] > before
    finally:
        netlab.sh("ip", "-n", lab.host, "addr", "del", f"{new}/32", "dev", "lo")


def test_a_function_without_network_has_none(srv):
    got = probe(srv, [[netlab.INTERNET, 80], ["127.0.0.1", srv.port]], network="none")
    assert got[f"{netlab.INTERNET}:80"] == "ENETUNREACH" and got[f"127.0.0.1:{srv.port}"] == "ECONNREFUSED"
    srv.upload("plain/probe", "python", PROBE_PY)
    body = assert_ok(srv.run("plain/probe", input={"tcp": [[netlab.INTERNET, 80]]}))
    assert body["data"] == {f"{netlab.INTERNET}:80": "ENETUNREACH"}


def test_a_streamed_networked_call(srv):
    code = ("import urllib.request\nprint('fetching', flush=True)\n"
            "return urllib.request.urlopen('http://api.example.test/', timeout=5).read().decode()")
    events = srv.sse("/run-now", {"language": "python", "code": code, "network": "internet"}).all_events()
    assert events[0] == {"event": "log", "data": "fetching", "type": "text", "stream": "stdout"}, events
    assert events[-1]["event"] == "result" and events[-1]["data"] == "INTERNET", events


def test_a_stored_networked_function_keeps_its_network(srv):
    r = srv.post("/upload", {"path": "net/probe", "language": "python", "code": PROBE_PY, "network": "internet"})
    assert_ok(r)
    described = assert_ok(srv.get("/functions/net/probe"))
    assert described["network"] == "internet" and described["versions"][-1]["network"] == "internet"
    body = assert_ok(srv.run("net/probe", input={"tcp": [[netlab.INTERNET, 80], [netlab.LAN, 80]]}))
    assert body["data"][f"{netlab.INTERNET}:80"] == "OPEN:INTERNET"
    assert body["data"][f"{netlab.LAN}:80"] in CONNECT_ERRORS


ESCAPE_PY = """import os, socket, subprocess
out = {"uid": os.getuid(), "caps": [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]}
for name, args in (("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("raw_tcp", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)),
                   ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0x0300)),
                   ("icmp_dgram", (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))):
    try:
        socket.socket(*args).close()
        out[name] = "created"
    except OSError as e:
        out[name] = type(e).__name__
for name, cmd in (("flush", ["/usr/sbin/nft", "flush", "ruleset"]), ("delete", ["/usr/sbin/nft", "delete", "table", "inet", "faas"]),
                  ("add", ["/usr/sbin/nft", "add", "table", "inet", "mine"]), ("route", ["/usr/sbin/ip", "route", "add", "10.0.0.0/8", "dev", "tap0"]),
                  ("addr", ["/usr/sbin/ip", "addr", "add", "10.77.0.99/24", "dev", "tap0"])):
    done = subprocess.run(cmd, capture_output=True)
    out[name] = done.returncode
for name, target in (("v6_internet", ("2001:db8:1::1", 80)), ("v6_loopback", ("::1", 8080))):
    s = socket.socket(socket.AF_INET6)
    s.settimeout(3)
    try:
        s.connect(target)
        out[name] = "OPEN"
    except OSError as e:
        out[name] = type(e).__name__ + ":" + str(e.errno)
    s.close()
out["resolv"] = open("/etc/resolv.conf").read()
out["certs"] = len(os.listdir("/etc/ssl/certs")) > 0
import ssl
out["cas"] = len(ssl.create_default_context().get_ca_certs()) > 0 or bool(ssl.get_default_verify_paths().cafile)
return out"""


def test_inside_no_raw_sockets_no_capabilities_and_the_filter_cannot_be_changed(srv):
    got = assert_ok(srv.run_now("python", ESCAPE_PY, network="internet"))["data"]
    sandbox_uid = srv.get("/healthz").body["sandbox_uid"]
    assert got["uid"] == sandbox_uid and sandbox_uid not in (0, 65534), got
    assert int(got["caps"], 16) == 0, got
    for name in ("raw", "raw_tcp", "packet", "icmp_dgram"):
        assert got[name] == "PermissionError", (name, got)
    for name in ("flush", "delete", "add", "route", "addr"):
        assert got[name] != 0, (name, got)
    assert got["resolv"] == "nameserver 10.0.2.3\n" and got["certs"] and got["cas"], got
    assert got["v6_internet"] == "OSError:101" and got["v6_loopback"] == "ConnectionRefusedError:111", got   # no IPv6 route
    # the next call still has its filter (every call gets its own, nothing is shared)
    again = probe(srv, [[netlab.LAN, 80], [netlab.INTERNET, 80]])
    assert again[f"{netlab.LAN}:80"] in CONNECT_ERRORS and again[f"{netlab.INTERNET}:80"] == "OPEN:INTERNET"


HOLD_PY = """import errno, socket
held, outcome = [], None
for _ in range(event["n"]):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((event["host"], 8888))
        held.append(s)
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e))
        break
return {"held": len(held), "then": outcome}"""


def test_the_connection_cap_holds(srv):
    got = assert_ok(srv.run_now("python", HOLD_PY, network="internet",
                                input={"n": MAX_CONNECTIONS + 5, "host": netlab.INTERNET}))["data"]
    assert got == {"held": MAX_CONNECTIONS, "then": "ECONNREFUSED"}, got
    # the cap is per call: the next call has all of its own
    got = assert_ok(srv.run_now("python", HOLD_PY, network="internet",
                                input={"n": MAX_CONNECTIONS, "host": netlab.INTERNET}))["data"]
    assert got == {"held": MAX_CONNECTIONS, "then": None}, got


NETNS_PY = """import urllib.request
return urllib.request.urlopen("http://198.51.100.1/", timeout=5).read().decode()"""


def held_namespaces(pid):
    """Network namespaces a process holds open (a pinned sandbox namespace would stay)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("net:["):
            found.append(target)
    return found


def test_nothing_is_left_after_100_networked_calls(srv, lab):
    """No slirp4netns, no networked sandbox, no namespace held, no rule anywhere but in the
    (gone) sandboxes' own namespaces: after ordinary calls and calls killed at their time
    limit while holding connections."""
    host_rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout

    def one(i):
        if i % 25 == 7:
            return srv.run_now("python", "import socket\ns = socket.create_connection(('198.51.100.1', 8888))\n"
                                         "while True:\n    pass", network="internet", timeout=1)
        if i % 25 == 9:
            return srv.run_now("javascript", "require('net').connect(8888, '198.51.100.1'); await new Promise(() => {})",
                               network="internet", timeout=1)
        return srv.run_now("python", NETNS_PY, network="internet")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(100)))
    assert [r.body["data"] for r in answers if r.status == 200] == ["INTERNET"] * 92, \
        [r.body for r in answers if r.status not in (200, 504)][:3]
    assert sum(r.status == 504 for r in answers) == 8, [r.status for r in answers]

    def leftovers():
        """What networked calls left below the server beyond the networked pool's idle
        sandboxes (each: one outer bwrap and one slirp4netns), and namespaces it holds."""
        idle = sum(p["idle"] for p in srv.get("/healthz").body["network_pool"].values())
        below = descendants(srv.proc.pid, proc_table())
        slirps = [i for i in below.values() if i["comm"] == "slirp4netns"]
        sandboxes = [i for i in below.values() if "--share-net" in i["cmdline"] and "--share-net" not in
                     below.get(i["ppid"], {}).get("cmdline", "")]
        stray = [i["cmdline"] for i in below.values() if i["comm"] in ("unshare", "nft", "faas-slirp")]
        if len(slirps) == len(sandboxes) == idle and not stray:
            return held_namespaces(srv.proc.pid)
        return [f"idle {idle}", *(i["cmdline"][:80] for i in slirps + sandboxes), *stray]
    assert wait_until(lambda: not leftovers(), timeout=10), leftovers()
    assert sum(p["size"] for p in srv.get("/healthz").body["network_pool"].values()) == 2
    assert subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout == host_rules
    assert subprocess.run(["ip", "netns", "exec", lab.host, "nft", "list", "ruleset"],
                          capture_output=True, text=True).stdout == ""
    assert srv.get("/healthz").status == 200


def test_slirp4netns_runs_in_the_calls_cgroups(srv):
    """Its CPU and memory count against the call's limits, and the run's cgroup kill ends it."""
    if srv.get("/healthz").body["limits"] not in ("cgroup-v1", "cgroup-v2"):
        pytest.skip("the lab server has no per-run cgroups here")
    mark = f"9{random.randrange(10**8, 10**9)}"   # a unique number of seconds to sleep
    code = f"import subprocess, time\np = subprocess.Popen(['sleep', '{mark}'])\ntime.sleep(2)\np.kill()\nreturn 1"
    box = {}
    slow = threading.Thread(target=lambda: box.setdefault("r", srv.run_now("python", code, network="internet")))
    slow.start()
    try:
        def sleeper():
            return next((pid for pid, i in descendants(srv.proc.pid, proc_table()).items()
                         if f"sleep {mark}" in i["cmdline"]), None)
        pid = wait_until(sleeper, timeout=10)
        assert pid, "the slow networked call did not start"
        memory = next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                      if ":memory:" in line or line.startswith("0::"))
        slirps = [p for p, i in descendants(srv.proc.pid, proc_table()).items() if i["comm"] == "slirp4netns"]
        cgroups = {p: Path(f"/proc/{p}/cgroup").read_text() for p in slirps}
        assert sum(memory in text.splitlines() for text in cgroups.values()) == 1, (memory, cgroups)
        assert memory not in Path(f"/proc/{srv.proc.pid}/cgroup").read_text().splitlines()
    finally:
        slow.join()
    assert_ok(box["r"])


def test_secrets_reach_a_networked_function(srv):
    srv.post("/upload", {"path": "net/secret", "language": "python", "network": "internet",
                         "code": "import os\nreturn os.environ.get('API_KEY')"})
    assert_ok(srv.request("PUT", "/functions/net/secret/secrets", {"API_KEY": "k-net"}))
    assert assert_ok(srv.run("net/secret"))["data"] == "k-net"


def lab_mounts(lab):
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if any(f"/run/netns/{ns} " in line for ns in (lab.host, lab.inet, lab.lan))]


def test_networked_calls_leave_the_hosts_mounts_alone(faas, lab):
    """slirp4netns's own sandbox detaches a root of its own: started from the server's
    mount namespace it once took the host's /run/netns/* mounts with it. A server in this
    machine's mount namespace; the lab's three namespace mounts must survive its calls."""
    before = lab_mounts(lab)
    assert len(before) == 3, before
    server = start_in_lab(faas, lab, {"FAAS_NETWORK": "allow", "FAAS_POOL_SIZE": "0"}, own_mounts=False)
    try:
        for _ in range(3):
            assert probe(server, [[netlab.INTERNET, 80]]) == {f"{netlab.INTERNET}:80": "OPEN:INTERNET"}
        assert lab_mounts(lab) == before
    finally:
        server.stop()
        assert_clean_log(server)


DOWNLOAD_PY = """import socket, time
began = time.monotonic()
got = 0
with socket.create_connection(("198.51.100.1", 8080), timeout=20) as s:
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
return [got, time.monotonic() - began]"""


def test_the_bandwidth_cap_slows_a_download(faas, lab):
    """FAAS_NETWORK_RATE=1M: 4 MiB cannot arrive in less than (4 MiB - burst) / rate, about
    3.75 s (a lower bound only: a busy machine can only make it slower)."""
    server = start_in_lab(faas, lab, {"FAAS_NETWORK": "allow", "FAAS_POOL_SIZE": "0", "FAAS_NETWORK_RATE": "1M",
                                      "TIMEOUT_SCRIPT": "60"})
    try:
        got, seconds = assert_ok(server.run_now("python", DOWNLOAD_PY, network="internet"))["data"]
        assert got == netlab.BULK and seconds >= 3.0, (got, seconds)
    finally:
        server.stop()
        assert_clean_log(server)


def runtime_dir_of(server):
    """The server's runtime directory, from the bwrap command line of a slow call."""
    box = {}
    slow = threading.Thread(target=lambda: box.setdefault("r", server.run_now("python", "import time\ntime.sleep(2)")))
    slow.start()
    try:
        def find():
            for info in descendants(server.proc.pid, proc_table()).values():
                for arg in info["cmdline"].split():
                    if arg.endswith("/passwd") and "faas-runtime-" in arg:
                        return Path(arg).parent
        return wait_until(find, timeout=10)
    finally:
        slow.join()


def test_a_filter_that_does_not_load_fails_the_call_closed(faas, lab):
    # no zygote: its own bwrap would be a bwrap below the server that stays
    server = start_in_lab(faas, lab, {"FAAS_NETWORK": "allow", "FAAS_POOL_SIZE": "0", "FAAS_ZYGOTE": "off"})
    try:
        rules = runtime_dir_of(server) / "net" / "net.nft"
        good = rules.read_text()
        rules.write_text(good.replace("reject with icmpx type admin-prohibited", "reject with nonsense", 1))
        r = server.run_now("python", PROBE_PY, network="internet", input={"tcp": [[netlab.LAN, 80]]})
        assert_error(r, 500)
        assert "LAN" not in r.raw.decode()
        assert "network filter could not be loaded" in server.stderr_text()
        assert wait_until(lambda: not [i for i in descendants(server.proc.pid, proc_table()).values()
                                       if i["comm"] in ("slirp4netns", "bwrap", "unshare")], timeout=10)
        rules.write_text(good)
        assert probe(server, [[netlab.LAN, 80]])[f"{netlab.LAN}:80"] in CONNECT_ERRORS
    finally:
        server.stop()


def test_operator_deny_list(faas, lab):
    server = start_in_lab(faas, lab, {"FAAS_NETWORK": "allow", "FAAS_POOL_SIZE": "0",
                                      "FAAS_NETWORK_DENY": f"{netlab.INTERNET}/32, 2001:db8::/32"})
    try:
        assert probe(server, [[netlab.INTERNET, 80]])[f"{netlab.INTERNET}:80"] in CONNECT_ERRORS
    finally:
        server.stop()
        assert_clean_log(server)


# ------------------------------------------------------------------- the operator's switch
# These servers run outside the lab: with network off nothing networked ever starts, and the
# allowed one below only stores a function (its syntax check runs without network).

@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_network_off_refuses_uploads_and_calls(faas, uid, store):
    allowed = faas.start(store=store, env={"FAAS_NETWORK": "allow", "FAAS_POOL_SIZE": "0"})
    same_store = {k: allowed.env[k] for k in ("FAAS_DATA_DIR", "REDIS_URL", "FAAS_REDIS_PREFIX") if k in allowed.env}
    assert_ok(allowed.post("/upload", {"path": f"{uid}/net", "language": "python", "code": "return 1",
                                       "network": "internet"}))
    allowed.stop()
    off = faas.start(store=store, env={**same_store, "FAAS_POOL_SIZE": "0"})
    try:
        assert off.get("/healthz").body["network"] == "off"
        body = assert_error(off.run(f"{uid}/net"), 403)
        assert body["reason"] == "network_disabled" and "FAAS_NETWORK" in body["error"], body
        assert off.get(f"/functions/{uid}/net").body["network"] == "internet"
        for r in (off.post("/upload", {"path": f"{uid}/new", "language": "python", "code": "return 1",
                                       "network": "internet"}),
                  off.run_now("python", "return 1", network="internet")):
            body = assert_error(r, 400)
            assert "FAAS_NETWORK=off" in body["error"] and body["reason"] == "network_disabled", body
        assert_error(off.get(f"/functions/{uid}/new"), 404)
        assert assert_ok(off.run_now("python", "return 1", network="none"))["data"] == 1
        for bad in ("yes", True, "host", ["internet"]):
            assert "network must be one of" in assert_error(off.run_now("python", "return 1", network=bad), 400)["error"]
    finally:
        off.stop()
        assert_clean_log(off)


@pytest.mark.parametrize("env,needle", [
    ({"FAAS_NETWORK": "maybe"}, "FAAS_NETWORK="),
    ({"FAAS_NETWORK": "allow", "FAAS_NETWORK_DENY": "10.0.0.0/8, not-a-net"}, "FAAS_NETWORK_DENY"),
    ({"FAAS_NETWORK_MAX_CONNECTIONS": "0"}, "FAAS_NETWORK_MAX_CONNECTIONS"),
])
def test_bad_network_settings_stop_the_server(faas, env, needle):
    server = faas.start(store="sqlite", env=env, wait=False)
    assert server.proc.wait(20) == 2
    assert needle in server.stderr_text()


def test_check_reports_the_network_tools_and_runs_its_self_test(lab):
    env = {**clean_env(), "FAAS_NETWORK": "allow", "HTTP_PORT": "8080"}
    done = subprocess.run(in_lab_host(lab, [sys.executable, str(FAAS_PY), "check"]),
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if len(line.split()) > 1}
    lines["network"] = next(line for line in done.stdout.splitlines() if line.startswith("info") and " network " in line)
    for name in ("slirp4netns", "nft", "unshare", "/dev/net/tun", "root"):
        assert lines[name].startswith("ok"), done.stdout
    assert "allow: blocks" in lines["network"] and f"DNS via {netlab.DNS}" in lines["network"], lines["network"]
    test_line = next(line for line in done.stdout.splitlines() if "network test" in line)
    assert test_line.startswith("ok"), test_line
    assert f"10.0.2.2:8080 EHOSTUNREACH, {netlab.HOST_LAN}:8080 EHOSTUNREACH" in test_line, test_line


def test_a_store_made_before_the_network_column_is_upgraded(faas, tmp_path):
    """A SQLite store written by an earlier faas (no `network` column) opens, its versions
    run without network, and new uploads record theirs."""
    data = tmp_path / "old-store"
    data.mkdir()
    db = sqlite3.connect(data / "faas.sqlite3")
    db.executescript("""
        CREATE TABLE functions (path TEXT PRIMARY KEY, latest INTEGER NOT NULL, high_water INTEGER NOT NULL,
                                updated REAL NOT NULL);
        CREATE TABLE versions (path TEXT NOT NULL, version INTEGER NOT NULL, language TEXT NOT NULL,
                               code TEXT NOT NULL, compiled TEXT, created REAL NOT NULL, limits TEXT,
                               PRIMARY KEY (path, version));
        INSERT INTO functions VALUES ('old/f', 100, 100, 1.0);
        INSERT INTO versions VALUES ('old/f', 100, 'python', 'return 41 + 1', NULL, 1.0, NULL);""")
    db.commit()
    db.close()
    server = faas.start(store="sqlite", env={"FAAS_DATA_DIR": str(data), "FAAS_POOL_SIZE": "0", "FAAS_NETWORK": "allow"})
    try:
        assert assert_ok(server.get("/functions/old/f"))["network"] == "none"
        assert assert_ok(server.run("old/f"))["data"] == 42
        assert_ok(server.post("/upload", {"path": "old/f", "language": "python", "code": "return 1",
                                          "network": "internet"}))
        assert [v["network"] for v in server.get("/functions/old/f").body["versions"]] == ["none", "internet"]
    finally:
        server.stop()
        assert_clean_log(server)
