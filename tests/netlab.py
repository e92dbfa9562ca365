"""The network lab of research/network.md (Appendix A), built and removed by the tests: a
"host" namespace the faas server runs in, whose only links lead to an "internet" namespace
and a "LAN" namespace. Nothing here touches the root namespace's network: every address,
route and server lives in namespaces made here, so no packet can leave the machine even if
the feature under test were broken.

    lab-inet ("internet")                                  lab-lan ("LAN" + metadata)
    203.0.113.1/24 (router, HTTP :80 too),                 10.77.0.10/24, 172.16.5.5, 192.168.5.5,
    web 198.51.100.1:80, hold :8888, bulk :8080,           100.64.5.5, 169.254.169.254 (HTTP :80
    DNS 198.51.100.53 (rebind.*->10.77.0.10,               on all), UDP logger :5353
    meta.*->169.254.169.254, else 198.51.100.1)
                  | veth                                          | veth
                  +------------- lab-host ("the faas host") ------+
                       203.0.113.2/24, 10.77.0.2/24, default via 203.0.113.1,
                       /32 routes to 172.16.5.5 ... 169.254.169.254 via the LAN
                       lo: "redis" 127.0.0.1:6379; 0.0.0.0:9000 (a service on every address)

Run as a program, it is one of the lab's servers: `netlab.py http ADDR PORT TAG`,
`netlab.py https ADDR PORT CERT KEY TAG`, `netlab.py hold ADDR PORT`, `netlab.py bulk ADDR PORT SIZE`, `netlab.py dns ADDR`, `netlab.py udplog ADDR PORT FILE`.
"""
import contextlib
import ctypes
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

INTERNET = "198.51.100.1"
DNS = "198.51.100.53"
HOST_PUBLIC = "203.0.113.2"
ROUTER = "203.0.113.1"
HOST_LAN = "10.77.0.2"
LAN = "10.77.0.10"
LAN_EXTRA = ("172.16.5.5", "192.168.5.5", "100.64.5.5", "169.254.169.254")
BULK = 4 << 20   # bytes the bulk server sends per connection
CLONE_NEWNET = 0x40000000


def sh(*argv, check=True):
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@contextlib.contextmanager
def netns(name):
    """Run the calling thread in network namespace `name` (sockets made inside stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


class Lab:
    def __init__(self, workdir: Path):
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.host, self.inet, self.lan = f"faaslab-{tag}-host", f"faaslab-{tag}-inet", f"faaslab-{tag}-lan"
        self.workdir = workdir
        self.servers = []
        self.udp_log = workdir / "udp.log"

    def up(self):
        t = self.tag
        for ns in (self.host, self.inet, self.lan):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        etc = Path(f"/etc/netns/{self.host}")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS}\n")   # slirp's DNS goes to the lab
        sh("ip", "link", "add", f"h{t}", "netns", self.host, "type", "veth", "peer", "name", f"i{t}", "netns", self.inet)
        sh("ip", "-n", self.host, "addr", "add", f"{HOST_PUBLIC}/24", "dev", f"h{t}")
        sh("ip", "-n", self.inet, "addr", "add", f"{ROUTER}/24", "dev", f"i{t}")
        for ns, dev in ((self.host, f"h{t}"), (self.inet, f"i{t}")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for addr in (INTERNET, DNS):
            sh("ip", "-n", self.inet, "addr", "add", f"{addr}/32", "dev", "lo")
        sh("ip", "-n", self.host, "route", "add", "default", "via", ROUTER)
        sh("ip", "link", "add", f"l{t}", "netns", self.host, "type", "veth", "peer", "name", f"m{t}", "netns", self.lan)
        sh("ip", "-n", self.host, "addr", "add", f"{HOST_LAN}/24", "dev", f"l{t}")
        sh("ip", "-n", self.lan, "addr", "add", f"{LAN}/24", "dev", f"m{t}")
        for ns, dev in ((self.host, f"l{t}"), (self.lan, f"m{t}")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for addr in LAN_EXTRA:
            sh("ip", "-n", self.lan, "addr", "add", f"{addr}/32", "dev", "lo")
            sh("ip", "-n", self.host, "route", "add", f"{addr}/32", "via", LAN)
        sh("ip", "-n", self.lan, "route", "add", "default", "via", HOST_LAN)
        self.serve(self.inet, "http", "0.0.0.0", "80", "INTERNET")
        self.serve(self.inet, "hold", INTERNET, "8888")
        self.serve(self.inet, "bulk", INTERNET, "8080", str(BULK))
        self.serve(self.inet, "dns", DNS)
        self.serve(self.lan, "http", "0.0.0.0", "80", "LAN")
        self.serve(self.lan, "udplog", "0.0.0.0", "5353", str(self.udp_log))
        self.serve(self.host, "http", "127.0.0.1", "6379", "HOST-REDIS")
        self.serve(self.host, "http", "0.0.0.0", "9000", "HOST-ANYADDR")
        self.wait_ready()

    def serve(self, ns, *args):
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(self.workdir / f"server-{len(self.servers)}.log", "wb"))
        self.servers.append(proc)

    def wait_ready(self):
        """Every TCP server answers from the lab host (the positive control)."""
        targets = [(INTERNET, 80), (INTERNET, 8888), (INTERNET, 8080), (LAN, 80), (HOST_PUBLIC, 9000), ("127.0.0.1", 6379),
                   *((addr, 80) for addr in LAN_EXTRA)]
        deadline = time.monotonic() + 15
        for addr, port in targets:
            while True:
                try:
                    with netns(self.host), socket.create_connection((addr, port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"lab server {addr}:{port} did not start")
                    time.sleep(0.05)

    def serve_https(self):
        """An HTTPS server on the internet address (port 443), its CA's PEM returned."""
        ca, cert, key = make_certificates(self.workdir)
        self.serve(self.inet, "https", INTERNET, "443", str(cert), str(key), "INTERNET-TLS")
        deadline = time.monotonic() + 15
        while True:
            try:
                with netns(self.host), socket.create_connection((INTERNET, 443), timeout=1):
                    return ca.read_text()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the lab's HTTPS server did not start")
                time.sleep(0.05)

    def fetch(self, addr, port=80):
        """GET / from the lab host itself (not through faas): the server's tag."""
        with netns(self.host), socket.create_connection((addr, port), timeout=3) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return conn.recv(4096).decode().rsplit("\n", 1)[-1]

    def down(self):
        for proc in self.servers:
            proc.kill()
            proc.wait()
        for ns in (self.host, self.inet, self.lan):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(f"/etc/netns/{self.host}", ignore_errors=True)


# --------------------------------------------------------------------------- lab servers

def serve_http(addr, port, tag):
    body = tag.encode()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer((addr, int(port)), Handler).serve_forever()


def serve_bulk(addr, port, size):
    """Sends `size` bytes to every connection, then closes it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, int(port)))
    listener.listen(64)
    chunk = b"x" * 65536
    while True:
        conn = listener.accept()[0]

        def send(conn=conn):
            with conn:
                left = int(size)
                while left > 0:
                    left -= conn.send(chunk[:left])
        threading.Thread(target=send, daemon=True).start()


def serve_https(addr, port, cert, key, tag):
    """serve_http behind TLS with the given certificate."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    body = tag.encode()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

        def get_request(self):
            conn, client = self.socket.accept()
            return context.wrap_socket(conn, server_side=True), client

    Server((addr, int(port)), Handler).serve_forever()


def make_certificates(directory):
    """A throw-away CA and a certificate for api.example.test it signed (openssl)."""
    d = Path(directory)
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out",
       str(d / "ca.pem"), "-days", "2", "-subj", "/CN=faas lab CA")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server.key"), "-out",
       str(d / "server.csr"), "-subj", "/CN=api.example.test")
    (d / "ext.cnf").write_text("subjectAltName=DNS:api.example.test\n")
    sh("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
       "-CAcreateserial", "-out", str(d / "server.pem"), "-days", "2", "-extfile", str(d / "ext.cnf"))
    return d / "ca.pem", d / "server.pem", d / "server.key"


def serve_hold(addr, port):
    """Accepts and keeps every connection open (for the connection cap)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, int(port)))
    listener.listen(1024)
    held = []
    while True:
        held.append(listener.accept()[0])


def serve_dns(addr):
    """A records only: rebind* -> the LAN, meta* -> the metadata address, else the internet."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    while True:
        query, client = sock.recvfrom(512)
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode().lower())
            at += 1 + query[at]
        qtype = struct.unpack(">H", query[at + 1:at + 3])[0]
        question = query[12:at + 5]
        answer_ip = LAN if labels[0].startswith("rebind") else "169.254.169.254" if labels[0].startswith("meta") \
            else INTERNET
        header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if qtype == 1 else 0, 0, 0)
        record = struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(answer_ip) if qtype == 1 else b""
        sock.sendto(header + question + record, client)


def serve_udplog(addr, port, path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, int(port)))
    with open(path, "ab", buffering=0) as log:
        while True:
            data, client = sock.recvfrom(2048)
            log.write(f"{client[0]} ".encode() + data + b"\n")


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    {"http": serve_http, "https": serve_https, "hold": serve_hold, "bulk": serve_bulk, "dns": serve_dns, "udplog": serve_udplog}[kind](*rest)
