#!/usr/bin/env python3
"""faas — a Function-as-a-Service server for one Linux box.

Users POST Python, JavaScript or TypeScript function bodies; each upload becomes a new,
immutable version of an HTTP endpoint. Every call runs in a fresh Bubblewrap sandbox and
answers as JSON or as a live Server-Sent-Events stream. Compatible with go-faas's HTTP API
and environment variables.

The module reads top to bottom in the order a request flows through it:
Config -> Store -> Runtimes -> Limits -> Sandbox -> Invocation -> HTTP -> CLI.
Standard library only; redis-py is imported only when a Redis store is configured.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import http
import http.server
import ipaddress
import json
import logging
import math
import os
import platform
import queue
import re
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("faas")


class ApiError(Exception):
    """An error the user caused or must be told about: becomes a JSON answer."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


# ==========================================================================================
# 1. Config
# ==========================================================================================

class ConfigError(Exception):
    """A setting has a value the server cannot use; the message names the variable."""


# The pre-started sandboxes are per wrapper program: node's serves JavaScript and TypeScript.
POOLS = ("python", "node")
SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(name: str, text: str) -> int:
    """Bytes from systemd-style sizes: 128M, 1G, 65536, 64K (binary units, as systemd)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGTB]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"{name}={text!r} is not a size (examples: 128M, 1G, 65536)")
    value = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be greater than zero")
    return value


def parse_number(name: str, text: str, kind: type = int, minimum: float = 0,
                 maximum: float = float("inf")) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not minimum <= value <= maximum:
        bounds = f"at least {minimum:g}" if maximum == float("inf") else f"between {minimum:g} and {maximum:g}"
        raise ConfigError(f"{name}={text!r} must be {bounds}")
    return value


def parse_switch(name: str, text: str) -> bool:
    if text.lower() in ("on", "1", "true", "yes"):
        return True
    if text.lower() in ("off", "0", "false", "no"):
        return False
    raise ConfigError(f"{name}={text!r} must be on or off")


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (as go-faas reads it); comments, `export` and quotes allowed."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


@dataclasses.dataclass(frozen=True)
class Config:
    host: str
    port: int
    data_dir: Path
    redis_url: str | None
    redis_prefix: str
    redis_timeout: float
    max_memory: int
    max_cpus: float
    max_pids: int
    body_max: int
    timeout: float
    max_output: int
    tmp_size: int
    max_runs: int
    queue_timeout: float
    max_queue: int
    max_connections: int
    pool_sizes: dict[str, int]   # per POOLS name
    pool_idle: float
    token: str | None
    invoke_token: str | None
    insecure: bool
    sandbox_uid: int
    sandbox_gid: int
    limits: str
    esbuild: Path | None
    zygote: bool = True           # Python calls forked by the zygote (FAAS_ZYGOTE=off: bwrap each)
    zygote_calls: int = 1000      # a zygote is replaced after this many calls...
    zygote_seconds: float = 600   # ...or this many seconds

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Config":
        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        data_dir = get("FAAS_DATA_DIR") or get("STATE_DIRECTORY").split(":")[0] or "faas-data"
        redis_url = get("REDIS_URL") or None
        if not redis_url and get("REDIS_HOST"):
            redis_url = redis_url_from_parts(get)
        limits = get("FAAS_LIMITS", "auto")
        if limits not in LIMIT_BACKENDS:
            raise ConfigError(f"FAAS_LIMITS={limits!r} must be one of {', '.join(LIMIT_BACKENDS)}")
        host = get("FAAS_HOST", "127.0.0.1")
        token = get("FAAS_TOKEN") or None
        invoke_token = get("FAAS_INVOKE_TOKEN") or None
        if invoke_token and not token:
            raise ConfigError("FAAS_INVOKE_TOKEN is set but FAAS_TOKEN is not: set an admin token too")
        insecure = get("FAAS_INSECURE").lower() in ("1", "true", "yes")
        if not is_loopback(host) and not token and not insecure:
            raise ConfigError(f"FAAS_HOST={host!r} is not a loopback address: anyone reaching it "
                              "could run code. Set FAAS_TOKEN, or FAAS_INSECURE=1 to accept that")
        esbuild = get("FAAS_ESBUILD") or str(HERE / "node_modules/@esbuild/linux-x64/bin/esbuild")
        uid = parse_number("FAAS_SANDBOX_UID", get("FAAS_SANDBOX_UID", "65534"), int, 1)
        cpus = os.cpu_count() or 1
        pool_size = parse_number("FAAS_POOL_SIZE", get("FAAS_POOL_SIZE", "2"), int, 0, 64)
        return cls(
            host=host,
            port=parse_number("HTTP_PORT", get("HTTP_PORT", "8080"), int, 0, 65535),
            data_dir=Path(data_dir),
            redis_url=redis_url,
            redis_prefix=get("FAAS_REDIS_PREFIX", "faas:"),
            redis_timeout=parse_number("REDIS_TIMEOUT_SECONDS", get("REDIS_TIMEOUT_SECONDS", "5"), float, 0.1),
            max_memory=parse_size("MAX_MEMORY", get("MAX_MEMORY", "128M")),
            max_cpus=parse_number("MAX_CPUS", get("MAX_CPUS", "1"), float, 0.01),
            max_pids=parse_number("FAAS_MAX_PIDS", get("FAAS_MAX_PIDS", "64"), int, 4),
            body_max=parse_number("CODE_MAX_SIZE", get("CODE_MAX_SIZE", "262144"), int, 1),
            timeout=parse_number("TIMEOUT_SCRIPT", get("TIMEOUT_SCRIPT", "30"), float, 0.1),
            max_output=parse_size("FAAS_MAX_OUTPUT", get("FAAS_MAX_OUTPUT", "1M")),
            tmp_size=parse_size("FAAS_TMP_SIZE", get("FAAS_TMP_SIZE", "64M")),
            max_runs=parse_number("FAAS_MAX_RUNS", get("FAAS_MAX_RUNS", str(4 * cpus)), int, 1),
            queue_timeout=parse_number("FAAS_QUEUE_TIMEOUT", get("FAAS_QUEUE_TIMEOUT", "2"), float, 0),
            max_queue=parse_number("FAAS_MAX_QUEUE", get("FAAS_MAX_QUEUE", str(8 * cpus)), int, 0),
            max_connections=parse_number("FAAS_MAX_CONNECTIONS", get("FAAS_MAX_CONNECTIONS", "256"), int, 1),
            pool_sizes={pool: parse_number(f"FAAS_POOL_SIZE_{pool.upper()}",
                                           get(f"FAAS_POOL_SIZE_{pool.upper()}", str(pool_size)), int, 0, 64)
                        for pool in POOLS},
            pool_idle=parse_number("FAAS_POOL_IDLE", get("FAAS_POOL_IDLE", "300"), float, 1),
            token=token,
            invoke_token=invoke_token,
            insecure=insecure,
            sandbox_uid=uid,
            sandbox_gid=parse_number("FAAS_SANDBOX_GID", get("FAAS_SANDBOX_GID", str(uid)), int, 1),
            limits=limits,
            esbuild=Path(esbuild),
            zygote=parse_switch("FAAS_ZYGOTE", get("FAAS_ZYGOTE", "on")),
            zygote_calls=parse_number("FAAS_ZYGOTE_CALLS", get("FAAS_ZYGOTE_CALLS", "1000"), int, 1),
            zygote_seconds=parse_number("FAAS_ZYGOTE_SECONDS", get("FAAS_ZYGOTE_SECONDS", "600"), float, 1),
        )


def redis_url_from_parts(get: Callable[..., str]) -> str:
    """The seed's REDIS_HOST/PORT/PASSWORD/DB as one redis:// URL."""
    port = parse_number("REDIS_PORT", get("REDIS_PORT", "6379"), int, 1)
    db = parse_number("REDIS_DB", get("REDIS_DB", "0"), int, 0)
    password = get("REDIS_PASSWORD")
    auth = f":{urllib.parse.quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{get('REDIS_HOST')}:{port}/{db}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ==========================================================================================
# 2. Store
# ==========================================================================================

PATH_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
PATH_MAX = 200


def check_path(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise ApiError(400, "path is required: a string like 'team/hello'")
    if len(path) > PATH_MAX:
        raise ApiError(400, f"path is longer than {PATH_MAX} characters")
    if not PATH_RE.fullmatch(path) or any(part in (".", "..") for part in path.split("/")):
        raise ApiError(400, "path must be segments of letters, digits, '.', '_' or '-' "
                            "separated by single '/', without '.' or '..' segments")
    return path


@dataclasses.dataclass(frozen=True)
class Version:
    """One immutable upload. `compiled` is what runs (TypeScript's JavaScript), else None."""
    path: str
    version: int
    language: str
    code: str
    compiled: str | None
    created: float
    limits: dict[str, Any] | None = None   # the upload's own lower timeout/memory

    @property
    def runnable(self) -> str:
        return self.compiled if self.compiled is not None else self.code

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "language": self.language, "size": len(self.code.encode()),
                "sha256": hashlib.sha256(self.code.encode()).hexdigest(), "created": self.created,
                "limits": self.limits}


def next_version(previous: int) -> int:
    """Versions are Unix seconds, but always above the previous one: no two uploads collide."""
    return max(int(time.time()), previous + 1)


class Store(Protocol):
    kind: str

    def put(self, path: str, language: str, code: str, compiled: str | None,
            limits: dict[str, Any] | None) -> Version: ...
    def get(self, path: str, version: int | None = None) -> Version | None: ...
    def find(self, path: str, version: int | None = None) -> int | None: ...
    def describe(self, path: str) -> dict[str, Any] | None: ...
    def list_functions(self) -> list[dict[str, Any]]: ...
    def list_versions(self, path: str) -> list[dict[str, Any]]: ...
    def set_latest(self, path: str, version: int) -> bool: ...
    def delete(self, path: str, version: int | None = None) -> int: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class SQLiteStore:
    """The embedded default: one SQLite file, WAL, synchronous=FULL (a 200 means it is on disk)."""
    kind = "sqlite"
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS functions (
            path TEXT PRIMARY KEY, latest INTEGER NOT NULL, high_water INTEGER NOT NULL,
            updated REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS versions (
            path TEXT NOT NULL, version INTEGER NOT NULL, language TEXT NOT NULL,
            code TEXT NOT NULL, compiled TEXT, created REAL NOT NULL, limits TEXT,
            PRIMARY KEY (path, version));
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.file = data_dir / "faas.sqlite3"
        self.idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        with self.connection() as db:
            db.executescript(self.SCHEMA)

    IDLE_CONNECTIONS = 4   # each holds a page cache (up to 2 MiB): a burst must not keep them

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection borrowed from the idle ones, opened when none is free: as many as
        requests use the store at once, not one per HTTP thread. Beyond IDLE_CONNECTIONS,
        a returned connection is closed."""
        try:
            db = self.idle.get_nowait()
        except queue.Empty:
            db = sqlite3.connect(self.file, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        try:
            yield db
        finally:
            if self.idle.qsize() < self.IDLE_CONNECTIONS:
                self.idle.put(db)
            else:
                db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: writers queue on SQLite's lock, so a version is read and written
        by one upload at a time."""
        with self.connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.connection() as db:
            return db.execute(sql, params).fetchall()

    COLUMNS = "path, version, language, code, compiled, created, limits"

    def put(self, path: str, language: str, code: str, compiled: str | None,
            limits: dict[str, Any] | None) -> Version:
        with self.transaction() as db:
            row = db.execute("SELECT high_water FROM functions WHERE path=?", (path,)).fetchone()
            version = next_version(row[0] if row else 0)
            now = time.time()
            db.execute(f"INSERT INTO versions ({self.COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                       (path, version, language, code, compiled, now, json.dumps(limits) if limits else None))
            db.execute("INSERT INTO functions VALUES (?,?,?,?) ON CONFLICT(path) DO UPDATE SET "
                       "latest=excluded.latest, high_water=excluded.high_water, updated=excluded.updated",
                       (path, version, version, now))
        return Version(path, version, language, code, compiled, now, limits)

    @staticmethod
    def version_from_row(row: tuple) -> Version:
        *fields, limits = row
        return Version(*fields, json.loads(limits) if limits else None)

    def find(self, path: str, version: int | None = None) -> int | None:
        """The latest version's number, or `version` if it exists: a cheap look-up."""
        if version is None:
            rows = self.rows("SELECT latest FROM functions WHERE path=?", (path,))
        else:
            rows = self.rows("SELECT version FROM versions WHERE path=? AND version=?", (path, version))
        return rows[0][0] if rows else None

    def get(self, path: str, version: int | None = None) -> Version | None:
        if version is None:
            rows = self.rows(f"SELECT {self.COLUMNS} FROM versions WHERE path=? AND version="
                             "(SELECT latest FROM functions WHERE path=?)", (path, path))
        else:
            rows = self.rows(f"SELECT {self.COLUMNS} FROM versions WHERE path=? AND version=?", (path, version))
        return self.version_from_row(rows[0]) if rows else None

    FUNCTION_SUMMARY = ("SELECT f.path, v.language, f.latest, (SELECT count(*) FROM versions c WHERE "
                        "c.path=f.path), f.updated FROM functions f JOIN versions v ON v.path=f.path "
                        "AND v.version=f.latest")

    @staticmethod
    def function_from_row(row: tuple) -> dict[str, Any]:
        return dict(zip(("path", "language", "latest", "versions", "updated"), row))

    def describe(self, path: str) -> dict[str, Any] | None:
        rows = self.rows(self.FUNCTION_SUMMARY + " WHERE f.path=?", (path,))
        return self.function_from_row(rows[0]) if rows else None

    def list_functions(self) -> list[dict[str, Any]]:
        return [self.function_from_row(row) for row in self.rows(self.FUNCTION_SUMMARY + " ORDER BY f.path")]

    def list_versions(self, path: str) -> list[dict[str, Any]]:
        rows = self.rows(f"SELECT {self.COLUMNS} FROM versions WHERE path=? ORDER BY version", (path,))
        return [self.version_from_row(row).summary() for row in rows]

    def set_latest(self, path: str, version: int) -> bool:
        with self.connection() as db:
            return db.execute(
                "UPDATE functions SET latest=?, updated=? WHERE path=? AND EXISTS "
                "(SELECT 1 FROM versions WHERE path=? AND version=?)",
                (version, time.time(), path, path, version)).rowcount > 0

    def delete(self, path: str, version: int | None = None) -> int:
        with self.transaction() as db:
            if version is None:
                gone = db.execute("DELETE FROM versions WHERE path=?", (path,)).rowcount
            else:
                gone = db.execute("DELETE FROM versions WHERE path=? AND version=?", (path, version)).rowcount
            newest = db.execute("SELECT max(version) FROM versions WHERE path=?", (path,)).fetchone()[0]
            if newest is None:
                db.execute("DELETE FROM functions WHERE path=?", (path,))
            else:
                db.execute("UPDATE functions SET latest=? WHERE path=? AND latest NOT IN "
                           "(SELECT version FROM versions WHERE path=?)", (newest, path, path))
        return gone

    def ping(self) -> None:
        self.rows("SELECT 1")

    def close(self) -> None:
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return


class RedisStore:
    """Versions in Redis under readable keys, all starting with the configured prefix:
    `<prefix>functions` (set of paths), `<prefix>function:<path>` (hash: latest, high_water,
    updated), `<prefix>function:<path>:versions` (sorted set), `<prefix>function:<path>:v:<n>`
    (hash: language, code, compiled, created). A Lua script assigns versions atomically."""
    kind = "redis"
    PUT_SCRIPT = """
        local high = tonumber(redis.call('HGET', KEYS[2], 'high_water') or '0')
        local version = math.max(tonumber(ARGV[1]), high + 1)
        redis.call('HSET', KEYS[3] .. version, 'language', ARGV[2], 'code', ARGV[3],
                   'compiled', ARGV[4], 'has_compiled', ARGV[5], 'created', ARGV[6], 'limits', ARGV[8])
        redis.call('ZADD', KEYS[4], version, version)
        redis.call('HSET', KEYS[2], 'latest', version, 'high_water', version, 'updated', ARGV[6])
        redis.call('SADD', KEYS[1], ARGV[7])
        return version
    """
    SET_LATEST_SCRIPT = """
        if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
        redis.call('HSET', KEYS[2], 'latest', ARGV[1], 'updated', ARGV[2])
        return 1
    """
    DELETE_SCRIPT = """
        local versions
        if ARGV[2] == '' then
            versions = redis.call('ZRANGE', KEYS[4], 0, -1)
        elseif redis.call('ZSCORE', KEYS[4], ARGV[2]) then
            versions = {ARGV[2]}
        else
            return 0
        end
        for _, v in ipairs(versions) do
            redis.call('DEL', KEYS[3] .. v)
            redis.call('ZREM', KEYS[4], v)
        end
        local newest = redis.call('ZRANGE', KEYS[4], -1, -1)
        if #newest == 0 then
            redis.call('DEL', KEYS[2], KEYS[4])
            redis.call('SREM', KEYS[1], ARGV[1])
        elseif not redis.call('ZSCORE', KEYS[4], redis.call('HGET', KEYS[2], 'latest')) then
            redis.call('HSET', KEYS[2], 'latest', newest[1])
        end
        return #versions
    """

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        import redis  # only needed with a Redis store
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                          health_check_interval=30)
        self.prefix = prefix
        self.put_script = self.redis.register_script(self.PUT_SCRIPT)
        self.delete_script = self.redis.register_script(self.DELETE_SCRIPT)
        self.set_latest_script = self.redis.register_script(self.SET_LATEST_SCRIPT)
        self.ping()

    def keys(self, path: str) -> list[str]:
        base = f"{self.prefix}function:{path}"
        return [f"{self.prefix}functions", base, f"{base}:v:", f"{base}:versions"]

    def put(self, path: str, language: str, code: str, compiled: str | None,
            limits: dict[str, Any] | None) -> Version:
        now = time.time()
        version = int(self.put_script(keys=self.keys(path), args=[
            int(now), language, code, compiled or "", int(compiled is not None), repr(now), path,
            json.dumps(limits) if limits else ""]))
        return Version(path, version, language, code, compiled, now, limits)

    def find(self, path: str, version: int | None = None) -> int | None:
        _, base, _, versions = self.keys(path)
        if version is None:
            latest = self.redis.hget(base, "latest")
            return int(latest) if latest is not None else None
        return version if self.redis.zscore(versions, version) is not None else None

    def get(self, path: str, version: int | None = None) -> Version | None:
        _, base, version_prefix, _ = self.keys(path)
        if version is None:
            latest = self.redis.hget(base, "latest")
            if latest is None:
                return None
            version = int(latest)
        fields = self.redis.hgetall(f"{version_prefix}{version}")
        return self.version_from_hash(path, version, fields) if fields else None

    @staticmethod
    def version_from_hash(path: str, version: int, fields: dict[bytes, bytes]) -> Version:
        compiled = fields[b"compiled"].decode() if fields.get(b"has_compiled") == b"1" else None
        limits = json.loads(fields[b"limits"]) if fields.get(b"limits") else None
        return Version(path, version, fields[b"language"].decode(), fields[b"code"].decode(),
                       compiled, float(fields[b"created"]), limits)

    def describe(self, path: str) -> dict[str, Any] | None:
        _, base, version_prefix, versions = self.keys(path)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(base, "latest", "updated")
            pipe.zcard(versions)
            (latest, updated), count = pipe.execute()
        if latest is None:
            return None
        language = self.redis.hget(f"{version_prefix}{int(latest)}", "language")
        return {"path": path, "language": (language or b"").decode(), "latest": int(latest),
                "versions": count, "updated": float(updated)}

    def list_functions(self) -> list[dict[str, Any]]:
        paths = sorted(raw.decode() for raw in self.redis.smembers(f"{self.prefix}functions"))
        return [found for found in map(self.describe, paths) if found is not None]

    def list_versions(self, path: str) -> list[dict[str, Any]]:
        _, _, version_prefix, versions = self.keys(path)
        numbers = [int(v) for v in self.redis.zrange(versions, 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for number in numbers:
                pipe.hgetall(f"{version_prefix}{number}")
            hashes = pipe.execute()
        return [self.version_from_hash(path, n, h).summary() for n, h in zip(numbers, hashes) if h]

    def set_latest(self, path: str, version: int) -> bool:
        return bool(self.set_latest_script(keys=self.keys(path), args=[version, repr(time.time())]))

    def delete(self, path: str, version: int | None = None) -> int:
        return int(self.delete_script(keys=self.keys(path), args=[path, "" if version is None else str(version)]))

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()


def open_store(config: Config) -> Store:
    if config.redis_url:
        return RedisStore(config.redis_url, config.redis_prefix, config.redis_timeout)
    return SQLiteStore(config.data_dir)


# ==========================================================================================
# 3. Runtimes
# ==========================================================================================

@dataclasses.dataclass(frozen=True)
class Runtime:
    """How one language runs: the interpreter argv inside the sandbox and its wrapper program.
    TypeScript runs on the JavaScript wrapper after esbuild turned it into JavaScript."""
    language: str
    interpreter: str
    argv: tuple[str, ...]
    transpile: bool = False


WRAPPERS_IN_SANDBOX = "/faas/wrappers"
ESBUILD_IN_SANDBOX = "/faas/esbuild"
RUNTIMES = {
    "python": Runtime("python", "/usr/bin/python3",
                      ("/usr/bin/python3", "-I", f"{WRAPPERS_IN_SANDBOX}/python.py")),
    "javascript": Runtime("javascript", "/usr/bin/node",
                          ("/usr/bin/node", f"{WRAPPERS_IN_SANDBOX}/node.js")),
}
RUNTIMES["typescript"] = dataclasses.replace(RUNTIMES["javascript"], language="typescript", transpile=True)
TS_HEADER = "async function __main(event: any, input: any) {"
ESBUILD_ARGS = ("--loader=ts", "--sourcemap=inline", "--sourcefile=function.ts", "--log-level=error",
                "--target=node18")   # Debian 12's Node; newer syntax is lowered at upload


def check_language(language: Any) -> Runtime:
    if not isinstance(language, str) or language not in RUNTIMES:
        raise ApiError(400, f"language must be one of {', '.join(RUNTIMES)}")
    return RUNTIMES[language]


def check_code(code: Any) -> str:
    if not isinstance(code, str) or not code.strip():
        raise ApiError(400, "code is required: the function body as a non-empty string")
    return code


# ==========================================================================================
# 4. Limits
# ==========================================================================================

@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run may use. The configured values are maxima; a call may lower
    `timeout` and `memory` (see `lowered`), never raise them."""
    memory: int
    cpus: float
    pids: int
    timeout: float
    output: int
    tmp_size: int

    @classmethod
    def from_config(cls, config: Config) -> "Limits":
        return cls(config.max_memory, config.max_cpus, config.max_pids, config.timeout,
                   config.max_output, config.tmp_size)

    def lowered(self, requested: dict[str, Any] | None) -> "Limits":
        """These limits with the caller's `timeout`/`memory` applied; 400 if above the maximum."""
        if not requested:
            return self
        if not isinstance(requested, dict):
            raise ApiError(400, "limits must be given as top-level timeout and memory fields")
        changes: dict[str, Any] = {}
        timeout = requested.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= self.timeout:
                raise ApiError(400, f"timeout must be a number of seconds above 0 and at most {self.timeout:g}")
            changes["timeout"] = float(timeout)
        memory = requested.get("memory")
        if memory is not None:
            changes["memory"] = self.check_memory(memory)
        return dataclasses.replace(self, **changes)

    def check_memory(self, memory: Any) -> int:
        try:
            if isinstance(memory, bool) or not isinstance(memory, (int, str)):
                raise ConfigError("memory")
            value = memory if isinstance(memory, int) else parse_size("memory", memory)
        except ConfigError:
            raise ApiError(400, "memory must be bytes (an integer) or a size like '64M'") from None
        if not MIN_RUN_MEMORY <= value <= self.memory:
            raise ApiError(400, f"memory must be between {MIN_RUN_MEMORY} and {self.memory} bytes "
                                f"(the configured MAX_MEMORY)")
        return value


    def capped(self, stored: dict[str, Any] | None) -> "Limits":
        """A version's stored limits, never above today's maxima (MAX_MEMORY may have shrunk)."""
        stored = stored or {}
        return dataclasses.replace(self, timeout=min(self.timeout, stored.get("timeout", self.timeout)),
                                   memory=min(self.memory, stored.get("memory", self.memory)))


MIN_RUN_MEMORY = 32 << 20   # below this Node does not start


def requested_limits(body: dict[str, Any]) -> dict[str, Any] | None:
    """The `timeout`/`memory` a caller asked for in a request body, for storing or applying."""
    picked = {key: body[key] for key in ("timeout", "memory") if body.get(key) is not None}
    return picked or None


def rlimit_commands(limits: Limits, backend_name: str) -> str:
    """The second layer, in every mode, as shell `ulimit` commands the gate runs on itself
    before it becomes bwrap (prlimit on the sandbox user's process would need
    CAP_SYS_RESOURCE). RLIMIT_DATA rather than RLIMIT_AS, which breaks V8. With cgroups the
    data limit is loose: the cgroup is the real cap and the one that reports OOM."""
    values = rlimit_values(limits, backend_name)
    data, cpu_seconds = values["data"], values["cpu_seconds"]
    return (f"ulimit -c 0 && ulimit -d {data // 1024} && ulimit -f {limits.tmp_size // 512} && "
            f"ulimit -n 1024 && ulimit -S -t {cpu_seconds} && ulimit -H -t {cpu_seconds + 1}")


def rlimit_values(limits: Limits, backend_name: str) -> dict[str, int]:
    """RLIMIT_DATA, RLIMIT_FSIZE (bytes) and RLIMIT_CPU (soft, seconds; hard is one more)
    of a run: the gate's `ulimit`s, and what a zygote's call sets on itself."""
    return {"data": limits.memory if backend_name == "rlimit" else 2 * limits.memory,
            "tmp_size": limits.tmp_size, "cpu_seconds": int(limits.timeout * max(limits.cpus, 1)) + 1}


class RunCgroup(Protocol):
    """One run's fence, created before the process starts and removed after it ends."""
    drops_privileges: bool   # False when the command prefix itself switches uid (systemd-run)

    def command_prefix(self) -> list[str]: ...
    def join_files(self) -> list[str]: ...
    def joined(self) -> bool: ...
    def lower_memory(self, memory: int) -> bool: ...
    def oom_killed(self) -> bool: ...
    def usage(self) -> dict[str, int]: ...
    def kill(self) -> None: ...
    def remove(self) -> None: ...


class LimitBackend(Protocol):
    name: str

    def create(self, run_id: str, limits: Limits) -> RunCgroup: ...
    def close(self) -> None: ...


# A run's cgroup paths are plain strings: pathlib interns every path component, and a run
# id is new for every call, so the interpreter's table of interned strings would churn
# (and be reallocated, ~1 MiB) as calls go by.
FilePath = str | Path


def read_text(path: FilePath) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def write_text(path: FilePath, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def read_keyed(path: FilePath) -> dict[str, int]:
    """`key value` lines (memory.events, cpu.stat, memory.oom_control) as a dict."""
    values = {}
    for line in read_text(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def read_int(path: FilePath) -> int | None:
    text = read_text(path).strip()
    return int(text) if text.isdigit() else None


def remove_cgroup_dirs(dirs: list[FilePath], procs: FilePath, wait: float = 3.0) -> None:
    """rmdir once the processes are gone (SIGKILLed ones take a moment to exit)."""
    deadline = time.monotonic() + wait
    while read_text(procs).strip() and time.monotonic() < deadline:
        time.sleep(0.005)
    for directory in dirs:
        for _ in range(100):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            LOG.error("could not remove cgroup %s", directory)


def server_cgroup_dir(base: Path) -> Path:
    """`faas-<pid>` under base: this server's parent for its runs, so servers sharing a
    cgroup never touch each other's runs. Leftovers of servers that died are removed."""
    for stale in base.glob("faas-*"):
        pid = stale.name.removeprefix("faas-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                runs = [run for run in stale.iterdir() if run.is_dir()]
            except FileNotFoundError:
                continue   # another server starting at the same moment swept it first
            for run in runs:
                remove_cgroup_dirs([run], run / "cgroup.procs", wait=0)
            remove_cgroup_dirs([stale], stale / "cgroup.procs", wait=0)
    parent = base / f"faas-{os.getpid()}"
    parent.mkdir(exist_ok=True)
    return parent


class NoCgroup:
    """The rlimit backend's 'cgroup': nothing to place, read or remove."""
    drops_privileges = True

    def command_prefix(self) -> list[str]:
        return []

    def join_files(self) -> list[str]:
        return []

    def joined(self) -> bool:
        return True

    def lower_memory(self, memory: int) -> bool:
        return False   # RLIMIT_DATA is fixed once the process runs

    def oom_killed(self) -> bool:
        return False

    def usage(self) -> dict[str, int]:
        return {}

    def kill(self) -> None:
        pass

    def remove(self) -> None:
        pass


class RlimitBackend:
    """No per-run cgroups: rlimits, the sandbox and the time limit are the only fences."""
    name = "rlimit"

    def create(self, run_id: str, limits: Limits) -> RunCgroup:
        return NoCgroup()

    def close(self) -> None:
        pass


CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_cgroup(controller: str | None) -> str:
    """This process's cgroup path in one v1 hierarchy, or in the v2 one (controller None)."""
    for line in read_text(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or controller in controllers.split(","):
            return path
    raise OSError(f"no {controller or 'v2'} cgroup in /proc/self/cgroup")


class CgroupV1Run:
    drops_privileges = True

    def __init__(self, dirs: dict[str, str], limits: Limits) -> None:
        self.dirs = dirs
        for directory in dirs.values():
            os.mkdir(directory)
        self.set_memory(limits.memory)
        write_text(f"{dirs['pids']}/pids.max", str(limits.pids))
        period = 100_000
        write_text(f"{dirs['cpu']}/cpu.cfs_period_us", str(period))
        write_text(f"{dirs['cpu']}/cpu.cfs_quota_us", str(max(1000, int(limits.cpus * period))))

    def command_prefix(self) -> list[str]:
        return []

    def join_files(self) -> list[str]:
        """`tasks`, not `cgroup.procs`: a thread moving itself skips the kernel's global
        threadgroup lock, whose RCU grace period otherwise costs milliseconds per move on a
        busy host (unless cgroups are mounted with favordynmods)."""
        return [f"{directory}/tasks" for directory in self.dirs.values()]

    def joined(self) -> bool:
        """The gate joins in `dirs` order, cpuacct last, and stops at the first failure:
        CPU time counted in cpuacct means it got into every hierarchy."""
        return (read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") or 0) > 0

    def set_memory(self, memory: int) -> None:
        """Memory first, then memory+swap (no swap): memsw may never be below memory."""
        write_text(f"{self.dirs['memory']}/memory.limit_in_bytes", str(memory))
        memsw = f"{self.dirs['memory']}/memory.memsw.limit_in_bytes"
        if os.path.exists(memsw):
            write_text(memsw, str(memory))

    def lower_memory(self, memory: int) -> bool:
        try:
            self.set_memory(memory)
        except OSError:
            return False
        return True

    def oom_killed(self) -> bool:
        return read_keyed(f"{self.dirs['memory']}/memory.oom_control").get("oom_kill", 0) > 0

    def usage(self) -> dict[str, int]:
        usage = {}
        peak = read_int(f"{self.dirs['memory']}/memory.max_usage_in_bytes")
        if peak is not None:
            usage["memory_peak_bytes"] = peak
        cpu_ns = read_int(f"{self.dirs['cpuacct']}/cpuacct.usage")
        if cpu_ns is not None:
            usage["cpu_ms"] = cpu_ns // 1_000_000
        return usage

    def kill(self) -> None:
        """v1 has no cgroup.kill: SIGKILL every member (the pid namespace makes escapes moot)."""
        for _ in range(10):
            pids = read_text(f"{self.dirs['pids']}/cgroup.procs").split()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self) -> None:
        remove_cgroup_dirs(list(self.dirs.values()), f"{self.dirs['pids']}/cgroup.procs")


class CgroupV1Backend:
    """cgroup v1 (hybrid hosts like this one): memory, pids, cpu and cpuacct hierarchies, a
    `faas-<pid>` directory under the server's own cgroup in each, one child per run."""
    name = "cgroup-v1"
    CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self.parents = {}
        for controller in self.CONTROLLERS:
            self.parents[controller] = server_cgroup_dir(root / controller / own_cgroup(controller).lstrip("/"))
        if (self.parents["memory"] / "memory.use_hierarchy").exists():
            try:
                (self.parents["memory"] / "memory.use_hierarchy").write_text("1")
            except OSError:
                pass   # already hierarchical through its parent
        self.create(f"probe-{os.getpid()}", Limits(MIN_RUN_MEMORY, 1, 8, 1, 1, 1)).remove()

    def create(self, run_id: str, limits: Limits) -> RunCgroup:
        return CgroupV1Run({c: f"{p}/{run_id}" for c, p in self.parents.items()}, limits)

    def close(self) -> None:
        remove_cgroup_dirs(list(self.parents.values()), self.parents["pids"] / "cgroup.procs", wait=0)


class CgroupV2Run:
    drops_privileges = True

    def __init__(self, directory: str, limits: Limits) -> None:
        self.dir = directory
        os.mkdir(directory)
        write_text(f"{directory}/memory.max", str(limits.memory))
        if os.path.exists(f"{directory}/memory.swap.max"):
            write_text(f"{directory}/memory.swap.max", "0")
        write_text(f"{directory}/pids.max", str(limits.pids))
        write_text(f"{directory}/cpu.max", f"{max(1000, int(limits.cpus * 100_000))} 100000")

    def command_prefix(self) -> list[str]:
        return []

    def join_files(self) -> list[str]:
        return [f"{self.dir}/cgroup.procs"]

    def joined(self) -> bool:
        return read_keyed(f"{self.dir}/cpu.stat").get("usage_usec", 0) > 0

    def lower_memory(self, memory: int) -> bool:
        try:
            write_text(f"{self.dir}/memory.max", str(memory))
        except OSError:
            return False
        return True

    def oom_killed(self) -> bool:
        return read_keyed(f"{self.dir}/memory.events").get("oom_kill", 0) > 0

    def usage(self) -> dict[str, int]:
        return cgroup_v2_usage(self.dir)

    def kill(self) -> None:
        try:
            write_text(f"{self.dir}/cgroup.kill", "1")
        except OSError:
            pass   # already gone

    def remove(self) -> None:
        remove_cgroup_dirs([self.dir], f"{self.dir}/cgroup.procs")


def cgroup_v2_usage(directory: FilePath) -> dict[str, int]:
    usage = {}
    peak = read_int(f"{directory}/memory.peak")
    if peak is not None:
        usage["memory_peak_bytes"] = peak
    cpu_us = read_keyed(f"{directory}/cpu.stat").get("usage_usec")
    if cpu_us is not None:
        usage["cpu_ms"] = cpu_us // 1000
    return usage


class CgroupV2Backend:
    """Pure cgroup v2 with a delegated subtree (systemd's Delegate=yes, or root). The server
    moves itself into a `server` leaf (v2 forbids processes beside enabled controllers),
    enables memory, pids and cpu for its children, and creates one child per run."""
    name = "cgroup-v2"
    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        own = root / own_cgroup(None).lstrip("/")
        available = read_text(own / "cgroup.controllers").split()
        missing = [c for c in self.CONTROLLERS if c not in available]
        if missing:
            raise OSError(f"controllers {missing} are not delegated to {own}")
        if own == root:
            self.parent = server_cgroup_dir(root)
        else:
            self.parent = own
            leaf = own / "server"
            leaf.mkdir(exist_ok=True)
            for pid in read_text(own / "cgroup.procs").split():
                (leaf / "cgroup.procs").write_text(pid)
        for directory in {own, self.parent}:
            (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in self.CONTROLLERS))
        self.create(f"probe-{os.getpid()}", Limits(MIN_RUN_MEMORY, 1, 8, 1, 1, 1)).remove()

    def create(self, run_id: str, limits: Limits) -> RunCgroup:
        return CgroupV2Run(f"{self.parent}/{run_id}", limits)

    def close(self) -> None:
        if self.parent.name.startswith("faas-"):
            remove_cgroup_dirs([self.parent], self.parent / "cgroup.procs", wait=0)


def slice_oom_kills() -> int:
    """OOM kills so far anywhere in faas.slice (v2 memory.events counts the subtree)."""
    for events in (CGROUP_ROOT / "faas.slice/memory.events", CGROUP_ROOT / "unified/faas.slice/memory.events"):
        if events.exists():
            return read_keyed(events).get("oom_kill", 0)
    return read_keyed(CGROUP_ROOT / "memory/faas.slice/memory.oom_control").get("oom_kill", 0)


class SystemdScopeRun:
    """A transient scope started by `systemd-run --scope` around bwrap (the seed's way):
    systemd places the process before exec, so it never runs outside its limits.
    OOMPolicy=continue keeps systemd from stopping the whole scope on one OOM kill.

    The scope is collected the moment its last process exits, before its counters can be
    read: an OOM kill is seen in faas.slice's counter instead (a run that died of SIGKILL
    while that counter rose), and peak memory and CPU time are not reported."""
    drops_privileges = False   # systemd-run switches to --uid itself

    def __init__(self, run_id: str, limits: Limits, uid: int, gid: int) -> None:
        self.unit = f"faas-run-{run_id}.scope"
        self.prefix = [
            "systemd-run", "--scope", "--quiet", "--collect", f"--unit={self.unit}",
            "--slice=faas.slice", f"--uid={uid}", f"--gid={gid}",
            "-p", f"MemoryMax={limits.memory}", "-p", "MemorySwapMax=0", "-p", f"TasksMax={limits.pids}",
            "-p", f"CPUQuota={max(1, int(limits.cpus * 100))}%", "-p", "OOMPolicy=continue", "--"]
        self.oom_kills_before = slice_oom_kills()

    def command_prefix(self) -> list[str]:
        return self.prefix

    def join_files(self) -> list[str]:
        return []   # systemd-run places itself before it executes bwrap

    def joined(self) -> bool:
        return True

    def lower_memory(self, memory: int) -> bool:
        return False

    def oom_killed(self) -> bool:
        return slice_oom_kills() > self.oom_kills_before

    def usage(self) -> dict[str, int]:
        return {}

    def kill(self) -> None:
        subprocess.run(["systemctl", "kill", "--signal=SIGKILL", self.unit], capture_output=True, check=False)

    def remove(self) -> None:
        pass   # --collect: systemd removes the scope when it empties


class SystemdRunBackend:
    name = "systemd-run"

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid

    def create(self, run_id: str, limits: Limits) -> RunCgroup:
        return SystemdScopeRun(run_id, limits, self.uid, self.gid)

    def close(self) -> None:
        pass


def limit_backend_unavailable(name: str) -> str | None:
    """Why a limit backend cannot work here, without touching anything; None if it can."""
    try:
        if name == "cgroup-v2":
            own = CGROUP_ROOT / own_cgroup(None).lstrip("/")
            available = read_text(own / "cgroup.controllers").split()
            if not all(c in available for c in CgroupV2Backend.CONTROLLERS):
                return f"{own} does not offer memory, pids and cpu (not pure cgroup v2, or not delegated)"
            if not os.access(own, os.W_OK):
                return f"{own} is not writable (run as root or under systemd with Delegate=yes)"
        elif name == "cgroup-v1":
            for controller in CgroupV1Backend.CONTROLLERS:
                own = CGROUP_ROOT / controller / own_cgroup(controller).lstrip("/")
                if not os.access(own, os.W_OK):
                    return f"{own} is not writable"
        elif name == "systemd-run":
            if not Path("/run/systemd/system").is_dir():
                return "systemd is not running as init"
            if not shutil.which("systemd-run"):
                return "systemd-run is missing"
    except OSError as error:
        return str(error)
    return None


def make_limit_backend(name: str, config: Config) -> LimitBackend:
    if name == "cgroup-v2":
        return CgroupV2Backend()
    if name == "cgroup-v1":
        return CgroupV1Backend()
    if name == "systemd-run":
        return SystemdRunBackend(config.sandbox_uid, config.sandbox_gid)
    return RlimitBackend()


LIMIT_BACKENDS = ("auto", "cgroup-v2", "cgroup-v1", "systemd-run", "rlimit")


def limit_backend_candidates(config: Config) -> list[tuple[str, str | None]]:
    """Each backend FAAS_LIMITS allows, best first, with why it cannot work here (or None)."""
    names = LIMIT_BACKENDS[1:] if config.limits == "auto" else (config.limits,)
    return [(name, limit_backend_unavailable(name)) for name in names]


def choose_limit_backend(config: Config) -> LimitBackend:
    """The configured backend, or with FAAS_LIMITS=auto the first that works here:
    cgroups written directly (v2, then v1), then systemd-run scopes, then rlimits only."""
    reasons = []
    for name, reason in limit_backend_candidates(config):
        if reason is None:
            try:
                backend = make_limit_backend(name, config)
                break
            except OSError as error:
                reason = str(error)
        reasons.append(f"{name}: {reason}")
    else:
        raise ConfigError(f"FAAS_LIMITS={config.limits} cannot be used here: {'; '.join(reasons)}")
    if backend.name == "rlimit":
        LOG.warning("limits: NO per-run cgroups, so memory, CPU and process counts are only capped "
                    "per process by rlimits%s", f" ({'; '.join(reasons)})" if reasons else "")
    return backend


def describe_limits(config: Config) -> str:
    """What `choose_limit_backend` would pick, for `faas.py check`."""
    passed_over = []
    for name, reason in limit_backend_candidates(config):
        if reason is None:
            return name + (f" (passed over: {'; '.join(passed_over)})" if passed_over else "")
        passed_over.append(f"{name}: {reason}")
    return f"none usable: {'; '.join(passed_over)}"


# -- seccomp deny-list -------------------------------------------------------------------
# A classic-BPF program for `bwrap --seccomp FD`: foreign-architecture and x32 system calls
# kill the process, the calls below fail with EPERM, everything else is allowed. The
# numbers are the x86_64 and aarch64 system call tables (asm/unistd_64.h, asm-generic).
DENIED_SYSCALLS = {
    # name: (x86_64, aarch64)
    "ptrace": (101, 117), "syslog": (103, 116), "personality": (135, 92), "pivot_root": (155, 41),
    "chroot": (161, 51), "acct": (163, 89), "mount": (165, 40), "umount2": (166, 39),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "iopl": (172, None),
    "ioperm": (173, None), "init_module": (175, 105), "delete_module": (176, 106),
    "quotactl": (179, 60), "kexec_load": (246, 104), "add_key": (248, 217),
    "request_key": (249, 218), "keyctl": (250, 219), "unshare": (272, 97),
    "perf_event_open": (298, 241), "fanotify_init": (300, 262), "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265), "setns": (308, 268), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "finit_module": (313, 273), "kexec_file_load": (320, 294),
    "bpf": (321, 280), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "pidfd_getfd": (438, 438), "mount_setattr": (442, 442),
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
CLONE_SYSCALLS = {"x86_64": (56, 435), "aarch64": (220, 435)}   # clone, clone3
CLONE_NEWUSER = 0x10000000


def seccomp_program(machine: str, allowed: tuple[str, ...] = (), refuse_new_userns: bool = False) -> bytes:
    """The filter as struct sock_filter records {u16 code; u8 jt; u8 jf; u32 k}. The zygote's
    (see its section) leaves out the calls in `allowed` and refuses new user namespaces
    through clone (EPERM) and clone3 (ENOSYS: glibc falls back to clone), which replaces
    bwrap's --disable-userns where user namespaces must stay possible for unshare."""
    load_word, jump_eq, jump_ge, jump_set, ret = 0x20, 0x15, 0x35, 0x45, 0x06   # BPF_LD|W|ABS, JMP|JEQ|K, ...
    kill, allow, eperm = 0x80000000, 0x7FFF0000, 0x00050000 | errno.EPERM
    enosys = 0x00050000 | errno.ENOSYS
    column = 0 if machine == "x86_64" else 1

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    program = [op(load_word, 4), op(jump_eq, AUDIT_ARCH[machine], 1, 0), op(ret, kill), op(load_word, 0)]
    if machine == "x86_64":
        program += [op(jump_ge, 0x40000000, 0, 1), op(ret, kill)]   # x32 ABI
    for name, numbers in DENIED_SYSCALLS.items():
        if numbers[column] is not None and name not in allowed:
            program += [op(jump_eq, numbers[column], 0, 1), op(ret, eperm)]
    if refuse_new_userns:   # last: it loads the flags (args[0], low word) over the number
        clone, clone3 = CLONE_SYSCALLS[machine]
        program += [op(jump_eq, clone3, 0, 1), op(ret, enosys), op(jump_eq, clone, 0, 3), op(load_word, 16),
                    op(jump_set, CLONE_NEWUSER, 0, 1), op(ret, eperm)]
    program.append(op(ret, allow))
    return b"".join(program)


def seccomp_fd(program: bytes) -> int:
    """A fresh memfd holding the program: bwrap reads it to the end, so one per spawn."""
    fd = os.memfd_create("faas-seccomp", 0)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class SandboxError(Exception):
    """A sandbox could not be set up as required: a server-side failure, never the code's."""


@dataclasses.dataclass
class Outcome:
    """What happened to one sandboxed process."""
    status: str = "ok"                     # ok, error, timeout, output_limit, killed, oom, internal
    result: dict[str, Any] | None = None   # the wrapper's result document, if it wrote one
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytearray = dataclasses.field(default_factory=bytearray)
    stderr: bytearray = dataclasses.field(default_factory=bytearray)
    truncated: bool = False
    oom: bool = False
    duration_ms: int = 0
    spawn_ms: float = 0
    stopped_at_result: bool = False                    # answered before the sandbox exited...
    cleanup: Callable[[], None] = lambda: None         # ...which this then finishes
    usage: dict[str, int] = dataclasses.field(default_factory=dict)
    joined: bool = True                                # False: the gate failed to join its cgroups
    spawn_path: str = "bwrap"                          # Started.path of the sandbox that ran it


LineSink = Callable[[str, str], None]
LINE_MAX = 64 * 1024   # a longer line without a newline is delivered in pieces


class LineSplitter:
    """Turns a byte stream into text lines for the sink; keeps at most LINE_MAX pending."""

    def __init__(self, stream: str, sink: LineSink | None) -> None:
        self.stream = stream
        self.sink = sink
        self.pending = b""

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        while len(self.pending) > LINE_MAX:
            lines.append(self.pending[:LINE_MAX])
            self.pending = self.pending[LINE_MAX:]
        for line in lines:
            self.emit(line)

    def close(self) -> None:
        if self.pending:
            self.emit(self.pending)
            self.pending = b""

    def emit(self, line: bytes) -> None:
        if self.sink is not None:
            self.sink(self.stream, line.rstrip(b"\r").decode("utf-8", "replace"))


def reap(proc: "subprocess.Popen | ZygoteCall", wait: float) -> tuple[int | None, float | None]:
    """Popen.wait that gives the exit code and the sandbox's CPU seconds when known: a
    zygote's call reports its init's rusage, which counts the whole call; bwrap's does not
    (its monitor never waits for the sandbox's pid 1), so a bwrap run's CPU comes only
    from a cgroup. Gives (None, None) if the process is still running after `wait` seconds."""
    if isinstance(proc, ZygoteCall):
        return proc.wait_exit(wait)
    deadline = time.monotonic() + wait
    pause = 0.0002
    while proc.returncode is None:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break   # reaped elsewhere
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, None
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return proc.returncode, None


def first_json_document(data: bytes) -> dict[str, Any] | None:
    """The wrapper's result. Only the first document counts: a forked child of the user's
    code could write to the inherited result pipe too."""
    try:
        document, _ = json.JSONDecoder().raw_decode(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def passwd_files(uid: int, gid: int) -> dict[str, str]:
    return {"passwd": f"sandbox:x:{uid}:{gid}:sandbox:/tmp:/usr/sbin/nologin\n",
            "group": f"sandbox:x:{gid}:\n"}


# The environment of the gate and of bwrap, which is pid 1 inside the sandbox: its
# /proc/1/environ is readable there, so it must hold nothing of the server's (tokens, REDIS_URL).
SANDBOX_HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclasses.dataclass
class Started:
    """A running sandbox that has not been given its request yet."""
    proc: "subprocess.Popen | ZygoteCall"
    cgroup: "RunCgroup"
    result_r: int
    limits: Limits
    born: float
    spawn_ms: float
    path: str = "bwrap"   # how it was spawned: bwrap, or forked by the zygote


@dataclasses.dataclass(frozen=True)
class SpawnExtras:
    """What one call's sandbox gets beyond the base set: read-only directories (host
    path, path inside), environment variables, the network. Both spawn paths give the
    first two; a networked call always takes the bwrap path (see the Zygote section)."""
    ro_binds: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    network: bool = False


NO_EXTRAS = SpawnExtras()


class Sandbox:
    """Starts bwrap'd processes and pumps their output under a deadline and an output cap.

    Files the sandbox needs (wrappers, esbuild, /etc/passwd) are copied at start-up into a
    world-readable runtime directory, so the unprivileged sandbox user can read them wherever
    the server itself is installed."""

    def __init__(self, config: Config, limits: LimitBackend, runtime_dir: Path) -> None:
        self.config = config
        self.limits = limits
        self.bwrap = shutil.which("bwrap") or "bwrap"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self.drop_privileges = os.geteuid() == 0
        uid, gid = (config.sandbox_uid, config.sandbox_gid) if self.drop_privileges else (os.geteuid(), os.getegid())
        self.runtime_dir = runtime_dir
        self.install_runtime_files(uid, gid)
        self.base_argv = self.build_base_argv(uid, gid)
        self.seccomp = seccomp_program(platform.machine())
        self.zygote: Zygote | None = None   # set by App when Python calls are forked by one

    def install_runtime_files(self, uid: int, gid: int) -> None:
        os.chmod(self.runtime_dir, 0o755)
        wrappers = self.runtime_dir / "wrappers"
        shutil.copytree(HERE / "wrappers", wrappers, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name, text in passwd_files(uid, gid).items():
            (self.runtime_dir / name).write_text(text)
        esbuild = self.config.esbuild
        if esbuild and esbuild.is_file():
            shutil.copy(esbuild, self.runtime_dir / "esbuild")
        for path in [self.runtime_dir, *self.runtime_dir.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)

    @property
    def has_esbuild(self) -> bool:
        return (self.runtime_dir / "esbuild").is_file()

    def build_base_argv(self, uid: int, gid: int) -> list[str]:
        """The flag set of research/sandbox.md: every namespace, no capabilities, read-only
        system, size-limited tmpfs, no network, nothing of the host but /usr."""
        rt = str(self.runtime_dir)
        return [
            self.bwrap, "--unshare-all", "--unshare-user", "--uid", str(uid), "--gid", str(gid),
            "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys",
            "--dev", "/dev", "--size", str(16 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--size", str(self.config.tmp_size), "--tmpfs", "/tmp",
            "--ro-bind", f"{rt}/passwd", "/etc/passwd", "--ro-bind", f"{rt}/group", "/etc/group",
            "--ro-bind", f"{rt}/wrappers", WRAPPERS_IN_SANDBOX,
            *(["--ro-bind", f"{rt}/esbuild", ESBUILD_IN_SANDBOX] if self.has_esbuild else []),
            "--remount-ro", "/",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin",
            "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp",
        ]

    def gate(self, limits: Limits, cgroup: RunCgroup) -> list[str]:
        """The process started first: it joins the run's cgroups (writing 0, "myself"),
        sets its rlimits, drops to the sandbox user, then becomes bwrap. So every process
        of the run starts inside its limits, race-free and without preexec_fn. Dropping
        privileges here rather than with Popen(user=...) keeps Popen on its vfork path:
        forking a busy server costs milliseconds. `echo` is a builtin of /bin/sh (dash),
        so the gate itself writes the 0; if joining fails, the chain stops before bwrap."""
        steps = [f"echo 0 > {shlex.quote(path)}" for path in cgroup.join_files()]
        steps += [rlimit_commands(limits, self.limits.name), 'exec "$@"']
        return ["/bin/sh", "-c", " && ".join(steps), "faas-gate", *self.privilege_drop(cgroup)]

    def start(self, argv: list[str], limits: Limits, result_fd: bool = True,
              extras: SpawnExtras = NO_EXTRAS) -> "Started":
        """A fresh sandbox, placed in its own cgroup, its wrapper loading and then waiting for
        the request on stdin. Nothing of the caller's runs until `complete` sends it.
        The zygote forks it when it can (see its section), else bwrap starts it."""
        began = time.monotonic()
        cgroup = self.limits.create(uuid.uuid4().hex[:12], limits)
        if self.zygote is not None and result_fd and self.zygote.serves(argv, cgroup, extras):
            try:
                forked = self.zygote.spawn(argv, limits, cgroup, extras)
            except BaseException:
                cgroup.remove()
                raise
            if forked is not None:
                return Started(forked[0], cgroup, forked[1], limits, began, (time.monotonic() - began) * 1000,
                               "zygote")
        result_r = -1
        try:
            child_fds = [seccomp_fd(self.seccomp)]
            tail = []
            if result_fd:
                result_r, result_w = os.pipe()
                child_fds.append(result_w)
                tail = [str(result_w)]
            command = [*self.gate(limits, cgroup), *cgroup.command_prefix(), *self.with_extras(extras),
                       "--seccomp", str(child_fds[0]), "--", *argv, *tail]
            try:
                proc = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=child_fds, env=SANDBOX_HOST_ENV, cwd="/")
            finally:
                for fd in child_fds:
                    os.close(fd)
        except BaseException:
            if result_r >= 0:
                os.close(result_r)
            cgroup.remove()
            raise
        return Started(proc, cgroup, result_r, limits, began, (time.monotonic() - began) * 1000)

    def with_extras(self, extras: SpawnExtras) -> list[str]:
        """The bwrap flags with a call's extra read-only directories (made before the root
        turns read-only) and environment variables."""
        if extras == NO_EXTRAS:
            return self.base_argv
        argv = list(self.base_argv)
        at = len(argv) - argv[::-1].index("--remount-ro")   # just after the last --remount-ro
        argv[at - 1:at - 1] = [flag for source, target in extras.ro_binds for flag in ("--ro-bind", source, target)]
        return argv + [flag for name, value in extras.env for flag in ("--setenv", name, value)]

    def complete(self, started: "Started", stdin: bytes, limits: Limits, sink: LineSink | None,
                 since: float | None = None, answer_early: bool = False) -> Outcome:
        """Send the request to a started sandbox, pump its output, end it and clean up.
        `since` is when a cold call began, its sandbox's start-up included; None for a
        pre-started sandbox, whose start-up (time and CPU) is not the call's.

        With answer_early, the outcome is ready as soon as the wrapper's result has arrived
        (with the output printed before it): the sandbox is then still exiting, and
        `outcome.cleanup` must be called once the answer is sent. That saves the caller the
        interpreter's and the namespaces' teardown (1-3 ms)."""
        outcome = Outcome(spawn_ms=started.spawn_ms, spawn_path=started.path)
        began = time.monotonic() if since is None else since
        # A pre-started interpreter already used CPU loading itself: that is not the call's.
        cpu_before = started.cgroup.usage().get("cpu_ms", 0) if since is None else 0
        try:
            self.feed(started.proc, stdin)
            self.pump(started.proc, started.result_r, limits, sink, outcome, began, answer_early)
        except BaseException:
            self.finish(started, outcome)
            raise
        if outcome.stopped_at_result:
            outcome.exit_code = 0   # what the wrapper does once its result is written
            outcome.oom = started.cgroup.oom_killed()
            outcome.usage = started.cgroup.usage()
            if "cpu_ms" not in outcome.usage and isinstance(started.proc, ZygoteCall):
                cpu_seconds = started.proc.wait_exit(1.0)[1]   # rlimit mode: only the zygote counts it
                if cpu_seconds is not None:
                    outcome.usage["cpu_ms"] = int(cpu_seconds * 1000)
            outcome.cleanup = lambda: self.finish(started, Outcome())
        else:
            self.finish(started, outcome)
            if not outcome.joined:   # the server's fault, and its stderr names host paths
                raise SandboxError("a sandbox could not join its cgroups or be set up: "
                                   + outcome.stderr.decode("utf-8", "replace").strip()[-300:])
        if "cpu_ms" in outcome.usage:
            outcome.usage["cpu_ms"] = max(0, outcome.usage["cpu_ms"] - cpu_before)
        outcome.duration_ms = int((time.monotonic() - began) * 1000)
        return outcome

    def run(self, argv: list[str], stdin: bytes, limits: Limits, sink: LineSink | None = None,
            result_fd: bool = True) -> Outcome:
        """A cold run: start a sandbox and complete it at once."""
        began = time.monotonic()
        return self.complete(self.start(argv, limits, result_fd), stdin, limits, sink, since=began)

    def discard(self, started: "Started") -> Outcome:
        """End a sandbox that never got a request (pool recycling, failed start)."""
        outcome = Outcome()
        self.finish(started, outcome)
        return outcome

    def privilege_drop(self, cgroup: RunCgroup) -> list[str]:
        """As root, start bwrap as the unprivileged sandbox uid: root inside a user namespace
        is still host root for /proc/sys and RLIMIT_NPROC (research/sandbox.md)."""
        if not self.drop_privileges or not cgroup.drops_privileges:
            return []
        return [self.setpriv, f"--reuid={self.config.sandbox_uid}", f"--regid={self.config.sandbox_gid}",
                "--clear-groups", "--pdeathsig", "SIGKILL", "--"]

    @staticmethod
    def feed(proc: subprocess.Popen, data: bytes) -> None:
        """The wrapper reads its whole request before running any user code, so a blocking
        write cannot deadlock against output."""
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass   # the process died early; its exit status tells why

    def pump(self, proc: subprocess.Popen, result_r: int, limits: Limits, sink: LineSink | None,
             outcome: Outcome, started: float, stop_at_result: bool = False) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        deadline = started + limits.timeout
        splitters = {proc.stdout.fileno(): ("stdout", outcome.stdout, LineSplitter("stdout", sink)),
                     proc.stderr.fileno(): ("stderr", outcome.stderr, LineSplitter("stderr", sink))}
        result = bytearray()
        room = limits.output
        with selectors.DefaultSelector() as selector:
            for fd in splitters:
                selector.register(fd, selectors.EVENT_READ)
            if result_r >= 0:
                selector.register(result_r, selectors.EVENT_READ)
            while selector.get_map():
                remaining = 0 if outcome.stopped_at_result else deadline - time.monotonic()
                if remaining <= 0 and not outcome.stopped_at_result:
                    outcome.status = "timeout"
                    break
                ready = selector.select(remaining)
                if not ready and outcome.stopped_at_result:
                    break   # the result is in and so is everything printed before it
                for key, _ in ready:
                    fd = key.fd
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        selector.unregister(fd)
                        if fd == result_r and stop_at_result and first_json_document(bytes(result)):
                            outcome.stopped_at_result = True
                        continue
                    if fd == result_r:
                        if len(result) + len(chunk) > limits.output:
                            outcome.status = "output_limit"
                            break
                        result += chunk
                        continue
                    _, kept, splitter = splitters[fd]
                    if len(chunk) > room:
                        chunk = chunk[:room]
                        outcome.truncated = True
                    room -= len(chunk)
                    kept += chunk
                    splitter.feed(chunk)
                    if outcome.truncated:
                        outcome.status = "output_limit"
                        break
                if outcome.status != "ok":
                    break
        for _, _, splitter in splitters.values():
            splitter.close()   # a last line without a newline, also after a timeout
        outcome.result = first_json_document(bytes(result))

    def finish(self, started: "Started", outcome: Outcome) -> None:
        """End the run: kill whatever is left (the whole pid namespace dies with bwrap), reap,
        read the counters, remove the cgroup. Safe on a process that has already exited."""
        proc, cgroup = started.proc, started.cgroup
        if started.result_r >= 0:
            os.close(started.result_r)
            started.result_r = -1
        # After a normal end every pipe is closed, which bwrap does only as it exits.
        code, cpu_seconds = reap(proc, 1.0 if outcome.status == "ok" else 0)
        if code is None:
            cgroup.kill()
            proc.kill()
            code, cpu_seconds = reap(proc, 5.0)
            if code is None:
                LOG.error("sandbox pid %s did not die after SIGKILL", proc.pid)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass   # a request the dead process never read
        if code is not None and code < 0:
            outcome.signal = -code
        elif code is not None and code > 128:
            outcome.exit_code, outcome.signal = code, code - 128   # bwrap: child killed by signal n
        else:
            outcome.exit_code = code
        outcome.oom = cgroup.oom_killed()
        outcome.usage = cgroup.usage()
        if cpu_seconds is not None and "cpu_ms" not in outcome.usage:
            outcome.usage["cpu_ms"] = int(cpu_seconds * 1000)
        if code not in (None, 0) and outcome.result is None:
            # A zygote's call reports a failed set-up itself; killed while joining (a time
            # limit of microseconds) it has simply been killed. The gate's is inferred.
            outcome.joined = not proc.setup_error if isinstance(proc, ZygoteCall) else cgroup.joined()
        cgroup.remove()


def memory_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (a large number when unknown)."""
    for line in read_text(Path("/proc/meminfo")).splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


class Every:
    """A value recomputed at most once per `seconds`."""

    def __init__(self, seconds: float, compute: Callable[[], Any]) -> None:
        self.seconds = seconds
        self.compute = compute
        self.value: Any = None
        self.at = float("-inf")

    def __call__(self) -> Any:
        if time.monotonic() - self.at >= self.seconds:
            self.value, self.at = self.compute(), time.monotonic()
        return self.value


def pool_name(argv: tuple[str, ...]) -> str:
    """The POOLS name of an interpreter argv: its wrapper program's."""
    return Path(argv[-1]).stem


class Pool:
    """Sandboxes started ahead of calls, per interpreter argv: each already in its own cgroup
    with the default limits, its wrapper loaded and blocked on stdin. A call takes one (never
    waits for one), uses it once, and a background thread starts a replacement. Security is
    that of a cold sandbox: same flags, same limits, nothing shared between calls."""

    def __init__(self, sandbox: Sandbox, sizes: dict[tuple[str, ...], int], limits: Limits,
                 idle_seconds: float) -> None:
        self.sandbox = sandbox
        self.sizes = sizes
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.idle: dict[tuple[str, ...], list[Started]] = {argv: [] for argv in sizes}
        self.stats = {argv: {"hits": 0, "misses": 0, "started": 0, "spawn_ms_total": 0.0} for argv in sizes}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.memory_available = Every(1.0, memory_available)
        self.thread = threading.Thread(target=self.fill_loop, name="pool", daemon=True)
        if any(sizes.values()):
            self.thread.start()

    def take(self, argv: tuple[str, ...], limits: Limits) -> Started | None:
        """A started sandbox for this call, its memory limit lowered if the call asks; None
        when the pool has none (the caller starts one cold)."""
        if not self.sizes.get(argv):
            return None
        while True:
            with self.lock:
                started = self.idle[argv].pop(0) if self.idle[argv] else None
            if started is None or reap(started.proc, 0)[0] is None:
                break
            if not self.sandbox.discard(started).joined:   # died while idle: try the next one
                LOG.error("pool: a pre-started sandbox could not join its cgroups")
        if started is not None and limits.memory != started.limits.memory \
                and not started.cgroup.lower_memory(limits.memory):
            with self.lock:
                self.idle[argv].insert(0, started)   # fine for the next call; this one goes cold
            started = None
        with self.lock:
            self.stats[argv]["hits" if started else "misses"] += 1
        return started

    def refill(self) -> None:
        """Called once a call has its answer: a spawn started while a call runs slows that
        call down (a cgroup v1 move stalls every fork and exit on the machine)."""
        self.wake.set()

    def fill_loop(self) -> None:
        while not self.closing.is_set():
            self.recycle_stale()
            argv = self.next_to_fill()
            if argv is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                started = self.sandbox.start(list(argv), self.limits)
            except Exception:   # a failed spawn must not kill the pool; calls fall back to cold
                LOG.exception("pool: could not start a sandbox")
                self.closing.wait(1.0)
                continue
            with self.lock:
                self.idle[argv].append(started)
                self.stats[argv]["started"] += 1
                self.stats[argv]["spawn_ms_total"] += started.spawn_ms

    def next_to_fill(self) -> tuple[str, ...] | None:
        """The emptiest pool below its size, unless memory is short: then shrink instead."""
        if self.memory_available() < 2 * self.limits.memory + (256 << 20):
            self.shrink()
            return None
        with self.lock:
            short = [(len(idle), argv) for argv, idle in self.idle.items() if len(idle) < self.sizes[argv]]
            return min(short)[1] if short else None

    def shrink(self) -> None:
        with self.lock:
            victims = [idle.pop() for idle in self.idle.values() if idle]
        for started in victims:
            self.sandbox.discard(started)

    def recycle_stale(self) -> None:
        """Idle sandboxes older than idle_seconds are replaced by fresh ones."""
        cutoff = time.monotonic() - self.idle_seconds
        with self.lock:
            stale = [s for idle in self.idle.values() for s in idle if s.born < cutoff]
            for idle in self.idle.values():
                idle[:] = [s for s in idle if s.born >= cutoff]
        for started in stale:
            self.sandbox.discard(started)

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {pool_name(argv): {
                "size": self.sizes[argv], "idle": len(self.idle[argv]), "hits": stats["hits"],
                "misses": stats["misses"], "started": stats["started"],
                "spawn_ms_avg": round(stats["spawn_ms_total"] / stats["started"], 2) if stats["started"] else None}
                for argv, stats in self.stats.items()}

    def close(self) -> None:
        self.closing.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        with self.lock:
            everything = [s for idle in self.idle.values() for s in idle]
            for idle in self.idle.values():
                idle.clear()
        for started in everything:
            self.sandbox.discard(started)


# ==========================================================================================
# 5b. Zygote
# ==========================================================================================
# Python calls are forked from one long-lived, pre-imported interpreter instead of a
# bwrap + interpreter start each (research/forkserver.md, design (a)): ~7 ms of CPU per
# call instead of ~25. The zygote runs in a bwrap sandbox of its own whose uid 0 is host
# uid 65534 and whose capabilities exist in its own user namespace only; every call is a
# child in fresh namespaces that gives all of them up before the request is read
# (wrappers/zygote.py). This section sits below Sandbox.start: the run's cgroup, the pool,
# complete/pump/finish and outcomes are the same on both paths. While no zygote is up,
# and for calls it cannot serve (networked calls, systemd-run scopes, directories outside
# what it exposes), Sandbox.start takes the bwrap path.

ZYGOTE_IN_SANDBOX = f"{WRAPPERS_IN_SANDBOX}/zygote.py"
EXPOSED_IN_ZYGOTE = "/faas/expose"   # host directories calls may get, read-only, one per index
ZYGOTE_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_ADMIN")   # in its user ns only
ZYGOTE_ALLOWED = ("mount", "umount2", "unshare")   # what the zygote needs of the deny-list
ZYGOTE_READY_SECONDS = 15.0
ZYGOTE_RESTART_DELAY = 1.0   # after a zygote died: not a tight loop if something kills each one


class ZygoteCall:
    """What Sandbox needs of a Popen, for a call the zygote forked: the server's ends of the
    call's pipes, the exit the zygote reports, and a kill sent through the zygote."""

    def __init__(self, owner: "ZygoteProcess", token: str, stdin_w: int, stdout_r: int, stderr_r: int) -> None:
        self.owner = owner
        self.token = token
        self.pid = f"zygote-call-{token}"   # for log lines only: the host pid is not known here
        self.stdin = os.fdopen(stdin_w, "wb")
        self.stdout = os.fdopen(stdout_r, "rb", 0)
        self.stderr = os.fdopen(stderr_r, "rb", 0)
        self.returncode: int | None = None
        self.cpu_seconds: float | None = None
        self.setup_error: str | None = None   # the zygote could not set its sandbox up
        self.exited = threading.Event()

    def exit(self, code: int, cpu_seconds: float | None) -> None:
        self.returncode, self.cpu_seconds = code, cpu_seconds
        self.exited.set()

    def wait_exit(self, wait: float) -> tuple[int | None, float | None]:
        if self.exited.wait(wait):
            return self.returncode, self.cpu_seconds
        return None, None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.owner.kill(self.token)


class ZygoteProcess:
    """One running zygote: its bwrap process, control socket, cgroup and calls."""

    def __init__(self, sandbox: Sandbox, argv: list[str], cgroup: RunCgroup, generation: int,
                 on_exit: Callable[["ZygoteProcess"], None]) -> None:
        self.sandbox, self.cgroup, self.generation, self.on_exit = sandbox, cgroup, generation, on_exit
        self.calls: dict[str, ZygoteCall] = {}
        self.lock = threading.Lock()
        self.served = 0
        self.born = time.monotonic()
        self.retired = False
        self.dead = False
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        machine = platform.machine()
        fds = [seccomp_fd(seccomp_program(machine, ZYGOTE_ALLOWED, refuse_new_userns=True)),
               seccomp_fd(seccomp_program(machine, refuse_new_userns=True)), theirs.fileno()]
        command = [*argv, "--seccomp", str(fds[0]), "--", "/usr/bin/python3", "-I", ZYGOTE_IN_SANDBOX,
                   str(fds[2]), str(fds[1])]
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         pass_fds=fds, env=SANDBOX_HOST_ENV, cwd="/")
        except BaseException:
            self.socket.close()
            raise
        finally:
            for fd in fds[:2]:
                os.close(fd)
            theirs.close()
        self.socket.settimeout(ZYGOTE_READY_SECONDS)
        try:
            ready = self.socket.recv(64)
        except OSError:
            ready = b""
        if ready != b"ready":
            self.stop()
            raise SandboxError("the zygote did not start")
        self.socket.settimeout(None)
        self.thread = threading.Thread(target=self.dispatch, name=f"zygote-{generation}", daemon=True)
        self.thread.start()

    def spawn(self, args: list[str], limits: Limits, cgroup: RunCgroup, binds: list[list[str]],
              env: dict[str, str], backend_name: str) -> tuple[ZygoteCall, int] | None:
        """Ask the zygote for a call's sandbox: (the call, the result pipe's read end), or
        None when this zygote cannot take it (dead or retired)."""
        token = uuid.uuid4().hex[:16]
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(4)]   # stdin, stdout, stderr, result
        ours = [pipes[0][1], *(read_end for read_end, _ in pipes[1:])]
        theirs = [pipes[0][0], *(write_end for _, write_end in pipes[1:])]
        call = ZygoteCall(self, token, *ours[:3])
        taken = False
        try:
            if env:   # a memfd only the call reads: a secret never passes through the zygote
                theirs.append(os.memfd_create("faas-env", os.MFD_CLOEXEC))
                os.write(theirs[-1], json.dumps(env).encode())
                os.lseek(theirs[-1], 0, os.SEEK_SET)
            joins = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup.join_files()]
            theirs += joins
            request = {"id": token, "args": args, "limits": rlimit_values(limits, backend_name),
                       "env": bool(env), "binds": binds, "cgroups": len(joins)}
            message = b"run " + json.dumps(request).encode()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(theirs)}i", *theirs))]
            with self.lock:
                if not (self.dead or self.retired):
                    self.calls[token] = call
                    try:
                        self.socket.sendmsg([message], rights)
                        self.served += 1
                        taken = True
                    except OSError:
                        del self.calls[token]
        finally:
            for fd in theirs:
                os.close(fd)
            if not taken:
                for stream in (call.stdin, call.stdout, call.stderr):
                    stream.close()
                os.close(ours[3])
        return (call, ours[3]) if taken else None

    def kill(self, token: str) -> None:
        with self.lock:
            if token in self.calls and not self.dead:
                try:
                    self.socket.send(b"kill " + token.encode())
                except OSError:
                    pass   # the zygote is gone, and with it the call

    def dispatch(self) -> None:
        """Read the zygote's reports until it ends; then every call it had has ended too."""
        while True:
            try:
                message = self.socket.recv(256)
            except OSError:
                message = b""
            if not message:
                break
            kind, _, rest = message.decode("ascii", "replace").partition(" ")
            if kind == "exit":
                self.exited(rest)
            elif kind == "fail":
                self.failed(rest)
            elif kind == "bad":
                self.refused(rest)
            else:
                LOG.error("zygote %d: %s", self.generation, message[:200].decode("ascii", "replace"))
        with self.lock:
            self.dead = True
            lost, self.calls = list(self.calls.values()), {}
        for call in lost:   # their namespaces were nested in the zygote's, which is gone
            call.exit(-signal.SIGKILL, None)
        if not self.retired:
            LOG.error("zygote %d ended with %d calls running; calls take the bwrap path until it is back",
                      self.generation, len(lost))
        self.stop()
        self.on_exit(self)

    def exited(self, report: str) -> None:
        try:
            token, code, cpu_us = report.split()
            exit_code, cpu_seconds = int(code), int(cpu_us) / 1e6
        except ValueError:
            LOG.error("zygote %d: a malformed report: %r", self.generation, report[:100])
            return
        with self.lock:
            call = self.calls.pop(token, None)
            finished = self.retired and not self.calls
        if call is not None:
            call.exit(exit_code, cpu_seconds)
        if finished:
            self.close_socket()

    def failed(self, report: str) -> None:
        """A call's sandbox could not be set up: the server's failure, not the function's."""
        token, _, reason = report.partition(" ")
        with self.lock:
            call = self.calls.get(token)
        if call is not None:
            call.setup_error = reason or "unknown"
        LOG.error("zygote %d: a call's sandbox could not be set up: %s", self.generation, reason[:300])

    def refused(self, report: str) -> None:
        """The zygote refused a message; if it was a call's, that call is over."""
        token, _, reason = report.partition(" ")
        with self.lock:
            call = self.calls.pop(token, None)
            finished = self.retired and not self.calls
        LOG.error("zygote %d: bad message (call %s): %s", self.generation, token, reason[:300])
        if call is not None:
            call.setup_error = reason or "refused"
            call.exit(125, None)
        if finished:
            self.close_socket()

    def retire(self) -> None:
        """No new calls; the zygote ends once the ones it has (pooled ones too) are done."""
        with self.lock:
            self.retired = True
            idle = not self.calls
        if idle:
            self.close_socket()

    def close_socket(self) -> None:
        """EOF on the control socket: the zygote exits, ending any call it still has."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def stop(self) -> None:
        """Reap the zygote's bwrap (killing it if need be) and remove its cgroup."""
        self.close_socket()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.cgroup.kill()
            self.proc.kill()
            self.proc.wait()
        self.cgroup.kill()
        self.cgroup.remove()
        self.socket.close()


class Zygote:
    """Keeps one zygote up for the server: started, replaced after `zygote_calls` calls or
    `zygote_seconds` (calls share its hash secret and address layout until then) and
    restarted when it dies, all from one long-lived thread (a parent-death signal fires
    when the thread that started a process ends). Decides which calls it serves."""

    def __init__(self, sandbox: Sandbox, backend: LimitBackend, config: Config,
                 exposed: tuple[str, ...] = (), mount_points: tuple[str, ...] = ()) -> None:
        self.sandbox, self.backend, self.config = sandbox, backend, config
        self.exposed = exposed            # host directories whose subdirectories calls may get
        self.mount_points = mount_points  # empty directories made in the zygote for them
        self.argv = self.build_argv()
        self.python = RUNTIMES["python"].argv
        self.current: ZygoteProcess | None = None
        self.lock = threading.Lock()
        self.stats = {"started": 0, "died": 0, "recycled": 0, "calls": 0, "fallbacks": 0, "start_failures": 0}
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.first_try = threading.Event()
        self.retiring: set[ZygoteProcess] = set()
        self.restart_after = 0.0
        self.thread = threading.Thread(target=self.supervise, name="zygote", daemon=True)
        self.thread.start()
        self.first_try.wait(ZYGOTE_READY_SECONDS + 5)

    def build_argv(self) -> list[str]:
        """faas's bwrap flags, except: uid/gid 0 in the sandbox's user namespace (host
        65534), user namespaces allowed (each call makes its own; the seccomp rule refuses
        them to calls), the ZYGOTE_CAPABILITIES there instead of none (SETFCAP maps the
        zygote's uid 0 in a call's user namespace, NET_ADMIN brings up a call's lo), and
        the exposed directories. A nested user namespace or --disable-userns would lock the mounts
        and calls could not mount a fresh /proc."""
        argv = list(self.sandbox.base_argv)
        argv.remove("--disable-userns")
        argv[argv.index("--uid") + 1] = "0"
        argv[argv.index("--gid") + 1] = "0"
        at = argv.index("--cap-drop")
        argv[at:at + 2] = [flag for cap in ZYGOTE_CAPABILITIES for flag in ("--cap-add", cap)]
        at = len(argv) - argv[::-1].index("--remount-ro") - 1
        argv[at:at] = [*(flag for i, host in enumerate(self.exposed)
                         for flag in ("--ro-bind", host, f"{EXPOSED_IN_ZYGOTE}/{i}")),
                       *(flag for point in self.mount_points for flag in ("--dir", point))]
        return argv

    def serves(self, argv: list[str], cgroup: RunCgroup, extras: SpawnExtras) -> bool:
        """Python calls, placed by cgroup files (not a systemd-run scope), without network,
        whose extra directories lie below an exposed one and go to a prepared mount point."""
        return (tuple(argv[:len(self.python)]) == self.python and not cgroup.command_prefix()
                and not extras.network and self.zygote_binds(extras) is not None)

    def zygote_binds(self, extras: SpawnExtras) -> list[list[str]] | None:
        binds = []
        for source, target in extras.ro_binds:
            for i, host in enumerate(self.exposed):
                relative = os.path.relpath(source, host)
                if not relative.startswith("..") and target in self.mount_points:
                    binds.append([os.path.normpath(f"{EXPOSED_IN_ZYGOTE}/{i}/{relative}"), target])
                    break
            else:
                return None
        return binds

    def spawn(self, argv: list[str], limits: Limits, cgroup: RunCgroup,
              extras: SpawnExtras) -> tuple[ZygoteCall, int] | None:
        """A call's sandbox forked by the zygote, or None (the caller takes the bwrap path)."""
        with self.lock:
            current = self.current
        forked = None
        if current is not None:
            forked = current.spawn(argv[len(self.python):], limits, cgroup, self.zygote_binds(extras) or [],
                                   dict(extras.env), self.backend.name)
        with self.lock:
            self.stats["calls" if forked else "fallbacks"] += 1
        if current is not None and (current.served >= self.config.zygote_calls
                                    or time.monotonic() - current.born >= self.config.zygote_seconds):
            self.wake.set()
        return forked

    def supervise(self) -> None:
        failures = 0
        while not self.closing.is_set():
            with self.lock:
                current = self.current
            due = current is None or current.served >= self.config.zygote_calls \
                or time.monotonic() - current.born >= self.config.zygote_seconds
            waited = self.restart_after - time.monotonic()
            if due and waited <= 0:
                failures = 0 if self.replace(current) else failures + 1
                self.first_try.set()
            pause = min(30.0, 0.5 * 2 ** failures) if failures else min(5.0, self.config.zygote_seconds)
            if waited > 0:
                pause = min(pause, waited)
            self.wake.wait(pause)
            self.wake.clear()

    def replace(self, old: ZygoteProcess | None) -> bool:
        """Start a new zygote; the old one (if any) is retired once the new one is ready."""
        with self.lock:
            generation = self.stats["started"] + self.stats["start_failures"] + 1
        cgroup = self.backend.create(f"zygote-{uuid.uuid4().hex[:8]}",
                                     Limits(256 << 20, float(os.cpu_count() or 1), 1024, 1, 1, 1))
        gate = ["/bin/sh", "-c", " && ".join([*(f"echo 0 > {shlex.quote(p)}" for p in cgroup.join_files()),
                                              "ulimit -c 0", "ulimit -n 1024", 'exec "$@"']),
                "faas-zygote-gate", *self.sandbox.privilege_drop(cgroup)]
        try:
            new = ZygoteProcess(self.sandbox, [*gate, *self.argv], cgroup, generation, self.ended)
        except (OSError, SandboxError) as error:
            cgroup.remove()
            with self.lock:
                self.stats["start_failures"] += 1
            LOG.error("zygote: could not start (%s); Python calls take the bwrap path", error)
            return False
        with self.lock:
            self.current = new
            self.stats["started"] += 1
            if old is not None and not old.dead:
                self.stats["recycled"] += 1
                self.retiring.add(old)
        if old is not None:
            old.retire()
        return True

    def ended(self, process: ZygoteProcess) -> None:
        """A zygote's dispatcher saw it end: if it was the current one, start another."""
        with self.lock:
            self.retiring.discard(process)
            if self.current is process:
                self.current = None
                self.stats["died"] += 1
                self.restart_after = time.monotonic() + ZYGOTE_RESTART_DELAY
        self.wake.set()

    def describe(self) -> dict[str, Any]:
        with self.lock:
            current = self.current
            return {"state": "up" if current else "down", "generation": current.generation if current else None,
                    "served": current.served if current else 0, **self.stats}

    def close(self) -> None:
        self.closing.set()
        self.wake.set()
        self.thread.join(timeout=10)
        with self.lock:
            everything = [p for p in [self.current, *self.retiring] if p is not None]
            self.current = None
        for process in everything:
            process.retired = True
            process.close_socket()
        for process in everything:   # its dispatcher reaps it and removes its cgroup
            process.thread.join(timeout=15)


def zygote_off_reason(config: Config, backend: LimitBackend) -> str | None:
    """Why Python calls do not use a zygote here, or None when they do."""
    if not config.zygote:
        return "FAAS_ZYGOTE=off"
    if backend.name == "systemd-run":
        return "FAAS_LIMITS=systemd-run: systemd-run places each sandbox itself"
    return None


def start_zygote(config: Config, sandbox: Sandbox, backend: LimitBackend) -> Zygote | None:
    if zygote_off_reason(config, backend) is not None or not os.access(RUNTIMES["python"].interpreter, os.X_OK):
        return None
    sandbox.zygote = Zygote(sandbox, backend, config)
    return sandbox.zygote


# ==========================================================================================
# 6. Invocation
# ==========================================================================================

def classify(value: Any) -> str:
    """The seed's answer types: string, number, or json for any other JSON value."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return "json"


def parse_printed(text: str) -> tuple[Any, str]:
    """A printed line or text as the seed answers it: parsed JSON, else text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text, "text"
    return value, classify(value)


def answer_from_print(stdout: str) -> tuple[Any, str]:
    """The seed's rule for a function that returns nothing: the last printed line if it is
    JSON, else everything printed, trimmed, as text."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if lines:
        value, kind = parse_printed(lines[-1].strip())
        if kind != "text":
            return value, kind
    return stdout.strip(), "text"


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def finite_float(text: str) -> float:
    """A JSON number as a double; one beyond a double's range (1e400) would become
    Infinity, which is not JSON and which no wrapper could be handed."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a 64-bit float")
    return value


def strict_json(text: str | bytes) -> Any:
    """json.loads without the NaN/Infinity extensions, which other JSON parsers reject."""
    return json.loads(text, parse_constant=reject_constant, parse_float=finite_float)


def parse_input(body: dict[str, Any]) -> Any:
    """`input` is JSON text as in the seed, or any JSON value; missing or empty means {}."""
    raw = body.get("input")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            return strict_json(raw)
        except ValueError as error:
            raise ApiError(400, f"input is not valid JSON text: {error}") from None
    return raw


STATUS_CODES = {"ok": 200, "error": 500, "timeout": 504, "output_limit": 500, "oom": 500,
                "killed": 500, "internal": 500}


def describe_failure(outcome: Outcome, limits: Limits) -> str:
    if outcome.status == "error" and outcome.result:
        error = outcome.result.get("error") or {}
        return f"{error.get('type', 'Error')}: {error.get('message', '')}".rstrip(": ")
    return {
        "timeout": f"time limit of {limits.timeout:g} s exceeded",
        "output_limit": f"output limit of {limits.output} bytes exceeded; the run was stopped",
        "oom": f"memory limit of {limits.memory} bytes exceeded; the run was killed",
        "killed": f"the function was killed by signal {outcome.signal}",
        "internal": "the sandbox failed to answer: " + outcome.stderr.decode("utf-8", "replace").strip()[-500:],
    }.get(outcome.status, outcome.status)


def settle_status(outcome: Outcome) -> None:
    """Turn how the process ended into the one status the caller sees. The pump already set
    timeout or output_limit; OOM comes from the cgroup's counter, not from exit code 137."""
    if outcome.status != "ok":
        return
    result = outcome.result
    if result is not None and result.get("ok") is True:
        return
    if outcome.oom:
        outcome.status = "oom"
    elif result is not None:
        outcome.status = "error"
    elif outcome.signal == signal.SIGXCPU:
        outcome.status = "timeout"
    elif outcome.signal is not None:
        outcome.status = "killed"
    elif outcome.exit_code not in (None, 0):
        outcome.status = "error"
        outcome.result = {"ok": False, "error": {
            "type": "Exit", "message": f"the function exited with code {outcome.exit_code}"}}
    else:
        outcome.status = "internal"


def build_answer(outcome: Outcome, limits: Limits) -> tuple[int, dict[str, Any]]:
    """The JSON answer (and its HTTP status) for a finished run; SSE sends the same fields."""
    settle_status(outcome)
    stdout = outcome.stdout.decode("utf-8", "replace")
    common: dict[str, Any] = {
        "status": outcome.status, "duration_ms": outcome.duration_ms, "truncated": outcome.truncated,
        "stdout": stdout, "stderr": outcome.stderr.decode("utf-8", "replace"),
        "exit_code": outcome.exit_code, "signal": outcome.signal, **outcome.usage}
    if outcome.status == "ok":
        result = outcome.result or {}
        data, kind = (result["value"], classify(result["value"])) if "value" in result else answer_from_print(stdout)
        return 200, {"data": data, "type": kind, **common}
    answer = {"error": "failed to run: " + describe_failure(outcome, limits), **common}
    if outcome.status == "error" and outcome.result:
        error = outcome.result.get("error") or {}
        answer.update(error_type=error.get("type"), message=error.get("message"),
                      stack=error.get("stack"), line=error.get("line"))
    return STATUS_CODES[outcome.status], answer


class RunSlots:
    """At most max_runs sandboxes at once. Up to max_waiting callers wait (at most `wait`
    seconds) for a slot; everyone else gets a 429 at once."""

    def __init__(self, max_runs: int, max_waiting: int, wait: float) -> None:
        self.semaphore = threading.BoundedSemaphore(max_runs)
        self.wait = wait
        self.max_runs = max_runs
        self.max_waiting = max_waiting
        self.lock = threading.Lock()
        self.active = 0
        self.waiting = 0
        self.rejected = 0

    def __enter__(self) -> None:
        acquired = self.semaphore.acquire(blocking=False)
        if not acquired:
            with self.lock:
                may_wait = self.waiting < self.max_waiting
                self.waiting += may_wait
            acquired = may_wait and self.semaphore.acquire(timeout=self.wait)
            with self.lock:
                self.waiting -= may_wait
        with self.lock:
            self.active += acquired
            self.rejected += not acquired
        if not acquired:
            raise ApiError(429, f"all {self.max_runs} run slots are busy; retry shortly",
                           headers={"Retry-After": "1"})

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.active -= 1
        self.semaphore.release()


class SizedCache:
    """Least-recently-used entries up to a total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            self.entries.move_to_end(key)
            return entry[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and self.entries:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped


class Invoker:
    """The one path every call takes: code -> slot -> sandbox -> events."""

    def __init__(self, config: Config, store: Store, sandbox: Sandbox, pool: Pool, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox
        self.pool = pool
        self.metrics = metrics
        self.versions = SizedCache(32 << 20)
        self.limits = Limits.from_config(config)
        self.slots = RunSlots(config.max_runs, config.max_queue, config.queue_timeout)
        self.paths: collections.Counter[tuple[str, str]] = collections.Counter()   # (language, spawn path)
        self.paths_lock = threading.Lock()

    # -- upload-time preparation ------------------------------------------------------------
    def prepare(self, runtime: Runtime, code: str) -> str | None:
        """Check syntax with the interpreter that will run the code; transpile TypeScript.
        Returns what to store as `compiled` (TypeScript's JavaScript), else None."""
        if runtime.transpile:
            compiled = self.transpile(code)
            self.syntax_check(runtime, compiled)
            return compiled
        self.syntax_check(runtime, code)
        return None

    def transpile(self, code: str) -> str:
        if not self.sandbox.has_esbuild:
            raise ApiError(503, "TypeScript is not available: esbuild is missing "
                                "(run `python3 faas.py check` for the fix)")
        limits = dataclasses.replace(self.limits, timeout=min(self.limits.timeout, 10),
                                     output=max(self.limits.output, 8 * self.config.body_max))
        with self.slots:
            outcome = self.sandbox.run([ESBUILD_IN_SANDBOX, *ESBUILD_ARGS],
                                       (TS_HEADER + code + "\n}\n").encode(), limits, result_fd=False)
        if outcome.status == "ok" and outcome.exit_code == 0:
            return outcome.stdout.decode()
        message = outcome.stderr.decode("utf-8", "replace").strip() or describe_failure(outcome, limits)
        raise ApiError(400, f"TypeScript does not compile: {message}", line=first_line_number(message))

    def syntax_check(self, runtime: Runtime, code: str) -> None:
        limits = dataclasses.replace(self.limits, timeout=min(self.limits.timeout, 10))
        request = json.dumps({"code": code, "event": None, "language": runtime.language}).encode()
        argv = [*runtime.argv, "--check"]
        with self.slots:
            outcome = self.sandbox.run(argv, request, limits)
        result = outcome.result or {}
        if result.get("ok") is True:
            return
        error = result.get("error") or {}
        if error:
            raise ApiError(400, f"{runtime.language} syntax error: {error.get('message', '')}",
                           line=error.get("line"))
        raise ApiError(500, "the syntax check failed: " + describe_failure(outcome, limits))

    # -- calls ------------------------------------------------------------------------------
    def resolve(self, path: str, version: int | None) -> Version:
        """The version to run. Which version is latest, and whether a version still exists,
        is always asked of the store (servers sharing a Redis agree); its content, which
        never changes, comes from memory once read."""
        number = self.store.find(path, version)
        found = self.versions.get((path, number)) if number is not None else None
        if found is None and number is not None:
            found = self.store.get(path, number)
            if found is not None:
                self.versions.put((path, number), found, len(found.code) + len(found.compiled or ""))
        if found is None:
            if version is None:
                raise ApiError(404, f"no function at path '{path}'")
            raise ApiError(404, f"function '{path}' has no version {version}")
        return found

    def invoke(self, function: str, runtime: Runtime, code: str, event: Any, limits: Limits,
               sink: LineSink | None, on_start: Callable[[], None] | None = None
               ) -> tuple[int, dict[str, Any], Callable[[], None]]:
        """Run one call: (HTTP status, answer, what to do once the answer is sent). `on_start`
        runs once a slot is taken, so a stream only begins when the call will really run
        (an overloaded server answers 429 as JSON)."""
        request = json.dumps({"code": code, "event": event, "language": runtime.language}).encode()
        with self.slots:
            if on_start is not None:
                on_start()
            outcome = self.run_sandboxed(runtime.argv, request, limits, sink)
        try:
            status, answer = build_answer(outcome, limits)
        except BaseException:
            outcome.cleanup()
            raise
        self.metrics.inc("faas_calls_total", function=function, language=runtime.language, status=outcome.status)
        self.metrics.observe("faas_call_duration_seconds", outcome.duration_ms / 1000, language=runtime.language)
        self.metrics.observe("faas_sandbox_spawn_seconds", outcome.spawn_ms / 1000)
        self.metrics.inc("faas_calls_by_spawn_path_total", language=runtime.language, path=outcome.spawn_path)
        with self.paths_lock:
            self.paths[(runtime.language, outcome.spawn_path)] += 1

        def after_answer() -> None:
            """End the sandbox, then start its replacement: neither slows the answer."""
            outcome.cleanup()
            self.pool.refill()
        return status, answer, after_answer

    def spawn_paths(self) -> dict[str, dict[str, int]]:
        """Calls per language and the path their sandbox took (zygote or bwrap)."""
        with self.paths_lock:
            counts = dict(self.paths)
        paths: dict[str, dict[str, int]] = {}
        for (language, path), count in sorted(counts.items()):
            paths.setdefault(language, {})[path] = count
        return paths

    def run_sandboxed(self, argv: tuple[str, ...], request: bytes, limits: Limits,
                      sink: LineSink | None) -> Outcome:
        """A pre-started sandbox when the pool has one, else a cold one: never a wait."""
        started = self.pool.take(argv, limits)
        if started is None:
            started = self.sandbox.start([*argv, "--cold"], limits)
            return self.sandbox.complete(started, request, limits, sink, since=started.born, answer_early=True)
        return self.sandbox.complete(started, request, limits, sink, answer_early=True)


def first_line_number(message: str) -> int | None:
    """esbuild reports `function.ts:LINE:COL`; our header shares the user's first line."""
    match = re.search(r"function\.ts:(\d+):", message)
    return int(match.group(1)) if match else None


# ==========================================================================================
# 7. HTTP
# ==========================================================================================

def json_bytes(document: Any) -> bytes:
    """UTF-8 JSON. A lone surrogate (user code can return one) cannot be UTF-8: it goes out
    as its \\uXXXX escape, which is what JSON has for it."""
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "backslashreplace")


def request_id(given: str | None) -> str:
    """The caller's X-Request-Id when it is a sane token, else a new one."""
    if given and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", given):
        return given
    return uuid.uuid4().hex[:16]


def is_store_error(error: Exception) -> bool:
    return isinstance(error, sqlite3.Error) or type(error).__module__.startswith("redis")


class Metrics:
    """Counters and histograms for GET /metrics, in Prometheus' text format."""
    HELP = {
        "faas_calls_total": ("counter", "Function calls by function, language and outcome status."),
        "faas_call_duration_seconds": ("histogram", "Wall time of function calls, sandbox start to end."),
        "faas_sandbox_spawn_seconds": ("histogram", "Time to create a run's cgroup and start its sandbox."),
        "faas_calls_by_spawn_path_total": ("counter", "Function calls by language and how their sandbox was "
                                                      "spawned: forked by the zygote, or bwrap."),
        "faas_uploads_total": ("counter", "Stored uploads by language."),
        "faas_store_errors_total": ("counter", "Requests that failed because the store did."),
        "faas_http_requests_total": ("counter", "HTTP requests by route and status code."),
    }
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {("faas_store_errors_total", ()): 0}
        self.histograms: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + amount

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Per-bucket counts plus sum and count: [bucket..., +Inf, sum]."""
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            series = self.histograms.setdefault(key, [0.0] * (len(self.BUCKETS) + 2))
            for index, bound in enumerate(self.BUCKETS):
                series[index] += seconds <= bound
            series[-2] += 1
            series[-1] += seconds

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        with self.lock:
            counters = sorted(self.counters.items())
            histograms = sorted((key, list(series)) for key, series in self.histograms.items())
        lines: list[str] = []
        announced: set[str] = set()

        def announce(name: str, kind: str, text: str) -> None:
            if name not in announced:
                announced.add(name)
                lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        for name, (text, value) in gauges.items():
            base = name.split("{")[0]
            announce(base, "counter" if base.endswith("_total") else "gauge", text)
            lines.append(f"{name} {value:g}")
        for (name, labels), value in counters:
            announce(name, *self.HELP[name])
            lines.append(f"{name}{format_labels(labels)} {value:g}")
        for (name, labels), series in histograms:
            announce(name, *self.HELP[name])
            for bound, count in zip((*self.BUCKETS, "+Inf"), series):
                lines.append(f"{name}_bucket{format_labels((*labels, ('le', str(bound))))} {count:g}")
            lines.append(f"{name}_count{format_labels(labels)} {series[-2]:g}")
            lines.append(f"{name}_sum{format_labels(labels)} {series[-1]:.6f}")
        return "\n".join(lines) + "\n"


def format_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    escaped = (f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), chr(92) + "n")}"'
               for key, value in labels)
    return "{" + ",".join(escaped) + "}"


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to small handler methods; every error leaves as JSON."""
    protocol_version = "HTTP/1.1"
    server_version = "faas"
    timeout = 10           # seconds a socket may stay silent (half-sent requests, idle keep-alive)
    wbufsize = 1 << 16     # headers and body leave in one write (flushed after each request)
    disable_nagle_algorithm = True   # SSE events and small answers go out at once
    app: "App"             # set on a subclass by App.serve

    # method, path pattern, handler method, who may call it (public, invoke or admin)
    ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [
        ("GET", re.compile(r"/healthz"), "get_health", "public"),
        ("GET", re.compile(r"/openapi\.json"), "get_openapi", "public"),
        ("GET", re.compile(r"/metrics"), "get_metrics", "admin"),
        ("POST", re.compile(r"/upload"), "post_upload", "admin"),
        ("POST", re.compile(r"/run-now"), "post_run_now", "admin"),
        ("POST", re.compile(r"/run/(?P<path>.+)"), "post_run", "invoke"),
        ("GET", re.compile(r"/functions"), "get_functions", "admin"),
        ("GET", re.compile(r"/functions/(?P<path>.+)"), "get_function", "admin"),
        ("PATCH", re.compile(r"/functions/(?P<path>.+)"), "patch_function", "admin"),
        ("DELETE", re.compile(r"/functions/(?P<path>.+)"), "delete_function", "admin"),
    ]

    # -- dispatch ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """http.server calls do_<METHOD>: every method goes through the route table, so an
        unrouted one (TRACE, QUERY...) is a 405 with Allow on a known path, else a 404."""
        if name.startswith("do_") and name[3:].isupper():
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, unknown method, headers too
        large) as JSON like every other error, on a connection that then closes."""
        self.close_connection = True
        self.request_id = getattr(self, "request_id", None) or request_id(None)
        self.send_json(code, {"error": message or http.HTTPStatus(code).phrase})

    def dispatch(self, method: str) -> None:
        self.server.request_started(True)
        try:
            self.handle_request(method)
        finally:
            self.server.request_started(False)
        if self.app.stopping.is_set():
            self.close_connection = True

    def handle_request(self, method: str) -> None:
        self.body_read = False
        self.request_id = request_id(self.headers.get("X-Request-Id"))
        self.started = time.monotonic()
        self.status_sent = 0
        self.route_name = route = "unknown"
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        try:
            handler, params, route, permission = self.route(method, urllib.parse.unquote(url.path))
            self.route_name = route
            self.authorize(permission)
            handler(**params)
        except ApiError as error:
            self.send_error_json(error)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as error:
            self.close_connection = True
            if is_store_error(error):
                LOG.error("request_id=%s store error: %s", self.request_id, error)
                self.app.metrics.inc("faas_store_errors_total")
                if not self.status_sent:
                    self.send_error_json(ApiError(503, "the function store is unavailable; retry shortly",
                                                  headers={"Retry-After": "1"}))
            else:
                LOG.exception("request_id=%s internal error", self.request_id)
                if not self.status_sent:
                    self.send_error_json(ApiError(500, "internal server error; see the server log",
                                                  request_id=self.request_id))
        LOG.info("request request_id=%s method=%s path=%s route=%s status=%s duration_ms=%d",
                 self.request_id, method, url.path, route, self.status_sent,
                 (time.monotonic() - self.started) * 1000)

    def route(self, method: str, path: str) -> tuple[Callable[..., None], dict[str, str], str, str]:
        allowed = []
        for route_method, pattern, name, permission in self.ROUTES:
            match = pattern.fullmatch(path)
            if match:
                if route_method == method or (method == "HEAD" and route_method == "GET"):
                    return getattr(self, name), match.groupdict(), name, permission
                allowed.append(route_method)
        if allowed:
            raise ApiError(405, f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                           headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, f"no route {path}")

    def authorize(self, permission: str) -> None:
        """Bearer tokens compared in constant time: the admin token may do everything, the
        invoke token only call stored functions. No token configured: open (loopback only)."""
        admin, invoke = self.app.config.token, self.app.config.invoke_token
        if permission == "public" or admin is None:
            return
        given = self.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, f"Bearer {admin}".encode()):
            return
        if invoke is not None and hmac.compare_digest(given, f"Bearer {invoke}".encode()):
            if permission == "invoke":
                return
            raise ApiError(403, "this token may only call functions (POST /run/<path>)")
        raise ApiError(401, "a valid 'Authorization: Bearer <token>' header is required",
                       headers={"WWW-Authenticate": 'Bearer realm="faas"'})

    # -- reading ----------------------------------------------------------------------------
    def read_json(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length is not a number") from None
        if length < 0:
            self.close_connection = True
            raise ApiError(400, "Content-Length is negative")
        if length > self.app.config.body_max:
            self.close_connection = True   # the unread body must not be taken as the next request
            raise ApiError(413, f"request body of {length} bytes is over the limit of "
                                f"{self.app.config.body_max} bytes (CODE_MAX_SIZE)")
        raw = self.rfile.read(length) if length else b""
        self.body_read = True
        if len(raw) < length:
            self.close_connection = True
            raise ApiError(400, "request body ended before Content-Length bytes arrived")
        if not raw.strip():
            return {}
        try:
            body = strict_json(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def body_unread(self) -> bool:
        if getattr(self, "body_read", False) or not hasattr(self, "headers"):
            return False
        return self.headers.get("Content-Length", "0").strip() not in ("", "0") \
            or "Transfer-Encoding" in self.headers

    def wants_stream(self, body: dict[str, Any]) -> bool:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false")
        return stream or "text/event-stream" in self.headers.get("Accept", "")

    def query_version(self) -> int | None:
        values = self.query.get("version")
        if not values or values[-1] == "":
            return None
        try:
            version = int(values[-1])
        except ValueError:
            raise ApiError(400, f"version must be an integer, not {values[-1]!r}") from None
        if not 0 < version < 2**63:
            raise ApiError(400, "version must be a positive 64-bit integer")
        return version

    # -- writing ----------------------------------------------------------------------------
    def send_error_json(self, error: ApiError) -> None:
        extra = {k: v for k, v in error.extra.items() if k != "headers"}
        self.send_json(error.status, {"error": error.message, **extra}, error.extra.get("headers"))

    def send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json_bytes(body), "application/json", headers)

    def send_body(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        if self.body_unread():
            self.close_connection = True   # else the unread body would be read as the next request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", self.request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.answered(status)

    def answered(self, status: int) -> None:
        """Counted as the answer leaves, not after the clean-up that may follow it."""
        self.status_sent = status
        route = getattr(self, "route_name", "unknown")   # http.server's own errors come before routing
        self.app.metrics.inc("faas_http_requests_total", route=route, code=str(status))

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("X-Request-Id", self.request_id)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self.answered(200)

    def send_event(self, event: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json_bytes(event) + b"\n\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own lines go to debug; dispatch logs one line per request."""
        LOG.debug("%s " + format, self.address_string(), *args)

    # -- routes -----------------------------------------------------------------------------
    def get_health(self) -> None:
        health = self.app.health()
        self.send_json(200 if health["status"] == "ok" else 503, health)

    def get_openapi(self) -> None:
        if self.app.openapi is None:
            raise ApiError(404, "openapi.json is not installed beside faas.py")
        self.send_body(200, self.app.openapi, "application/json")

    def get_metrics(self) -> None:
        self.send_body(200, self.app.render_metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def get_functions(self) -> None:
        self.send_json(200, {"functions": self.app.store.list_functions()})

    def get_function(self, path: str) -> None:
        check_path(path)
        version_number = self.query_version()
        function = self.app.store.describe(path)
        if function is None:
            raise ApiError(404, f"no function at path '{path}'")
        answer = {**function, "versions": self.app.store.list_versions(path)}
        if version_number is not None:
            version = self.app.invoker.resolve(path, version_number)
            answer.update(version=version.version, code=version.code)
        self.send_json(200, answer)

    def patch_function(self, path: str) -> None:
        check_path(path)
        body = self.read_json()
        latest = body.get("latest")
        if isinstance(latest, bool) or not isinstance(latest, int) or not 0 < latest < 2**63:
            raise ApiError(400, "send {\"latest\": N} with N an existing version number")
        self.app.invoker.resolve(path, latest)
        if not self.app.store.set_latest(path, latest):
            raise ApiError(404, f"function '{path}' has no version {latest}")
        LOG.info("latest request_id=%s path=%s latest=%d", self.request_id, path, latest)
        self.send_json(200, {"path": path, "latest": latest})

    def delete_function(self, path: str) -> None:
        check_path(path)
        version_number = self.query_version()
        deleted = self.app.store.delete(path, version_number)
        if not deleted:
            self.app.invoker.resolve(path, version_number)   # says which of the two is unknown
            raise ApiError(404, f"no function at path '{path}'")
        remaining = self.app.store.describe(path)
        LOG.info("deleted request_id=%s path=%s version=%s count=%d", self.request_id, path,
                 version_number or "all", deleted)
        self.send_json(200, {"path": path, "deleted": deleted, "latest": remaining and remaining["latest"]})

    def post_upload(self) -> None:
        body = self.read_json()
        path = check_path(body.get("path"))
        runtime = check_language(body.get("language"))
        code = check_code(body.get("code"))
        limits = requested_limits(body)
        self.app.invoker.limits.lowered(limits)   # validates; stored as asked, capped at run time
        compiled = self.app.invoker.prepare(runtime, code)
        version = self.app.store.put(path, runtime.language, code, compiled, limits)
        self.app.metrics.inc("faas_uploads_total", language=runtime.language)
        LOG.info("request_id=%s uploaded path=%s version=%d language=%s", self.request_id, path,
                 version.version, runtime.language)
        self.send_json(200, {"path": path, "language": runtime.language, "version": version.version})

    def post_run(self, path: str) -> None:
        version_number = self.query_version()
        body = self.read_json()
        check_path(path)
        stream = self.wants_stream(body)
        event = parse_input(body)
        version = self.app.invoker.resolve(path, version_number)
        limits = self.app.invoker.limits.capped(version.limits).lowered(requested_limits(body))
        self.run(path, RUNTIMES[version.language], version.runnable, event, limits, stream,
                 {"version": version.version})

    def post_run_now(self) -> None:
        body = self.read_json()
        runtime = check_language(body.get("language"))
        code = check_code(body.get("code"))
        stream = self.wants_stream(body)
        event = parse_input(body)
        limits = self.app.invoker.limits.lowered(requested_limits(body))
        if runtime.transpile:
            code = self.app.invoker.transpile(code)
        self.run("run-now", runtime, code, event, limits, stream, {})

    def run(self, function: str, runtime: Runtime, code: str, event: Any, limits: Limits, stream: bool,
            extra: dict[str, Any]) -> None:
        if not stream:
            status, answer, after_answer = self.app.invoker.invoke(function, runtime, code, event, limits, None)
            try:
                self.send_json(status, {**answer, **extra})
                self.wfile.flush()
            finally:
                after_answer()
            return

        def log_line(stream_name: str, line: str) -> None:
            data, kind = parse_printed(line)
            self.send_event({"event": "log", "data": data, "type": kind, "stream": stream_name})

        status, answer, after_answer = self.app.invoker.invoke(function, runtime, code, event, limits,
                                                               log_line, on_start=self.start_sse)
        try:
            answer = {**answer, **extra}
            for field in ("stdout", "stderr"):   # already streamed line by line
                answer.pop(field, None)
            if status == 200:
                self.send_event({"event": "result", **answer})
            else:
                message = answer.pop("error")
                self.send_event({"event": "error", "data": message, "type": "text", **answer})
        finally:
            after_answer()


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most max_connections of them: past that a client gets
    a 503 at once, so idle or half-open connections cannot use up the server."""
    daemon_threads = True
    request_queue_size = 128
    BUSY_BODY = b'{"error": "too many open connections; retry shortly"}'
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s")

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.connections = 0
        self.busy = 0          # requests being handled now (idle keep-alive connections are not)
        self.rejected = 0
        self.connections_lock = threading.Lock()

    def request_started(self, started: bool) -> None:
        with self.connections_lock:
            self.busy += 1 if started else -1

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.connections_lock:
            full = self.connections >= self.max_connections
            self.connections += not full
            self.rejected += full
        if not full:
            super().process_request(request, client_address)
            return
        try:
            request.setblocking(False)
            request.sendall(self.BUSY % (request_id(None).encode(), len(self.BUSY_BODY), self.BUSY_BODY))
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished is routine; anything else is logged, never printed raw."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            LOG.debug("connection from %s ended: %s", client_address, error)
        else:
            LOG.exception("connection from %s failed", client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections -= 1


def notify_systemd(message: str) -> None:
    """sd_notify(3) by hand: one datagram to $NOTIFY_SOCKET (abstract when it starts with @)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as error:
        LOG.warning("systemd notify failed: %s", error)


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", str(os.getpid()))
    if not usec.isdigit() or pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


class App:
    """Everything one server process holds: config, store, sandbox, invoker, metrics."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = open_store(config)
        runtime_base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="faas-runtime-", dir=runtime_base))
        self.limit_backend = choose_limit_backend(config)
        self.sandbox = Sandbox(config, self.limit_backend, self.runtime_dir)
        self.zygote = start_zygote(config, self.sandbox, self.limit_backend)
        pool_sizes = {runtime.argv: config.pool_sizes[pool_name(runtime.argv)] for runtime in RUNTIMES.values()
                      if os.access(runtime.interpreter, os.X_OK)}
        self.pool = Pool(self.sandbox, pool_sizes, Limits.from_config(config), config.pool_idle)
        self.invoker = Invoker(config, self.store, self.sandbox, self.pool, self.metrics)
        openapi = HERE / "openapi.json"
        self.openapi = openapi.read_bytes() if openapi.is_file() else None
        self.started = time.time()
        self.stopping = threading.Event()
        self.server: Server | None = None

    def health(self) -> dict[str, Any]:
        try:
            self.store.ping()
            store_ok = True
        except Exception as error:   # the store's own exception types differ
            LOG.warning("store ping failed: %s", error)
            store_ok = False
        return {
            "status": "ok" if store_ok else "degraded",
            "store": self.store.kind, "store_ok": store_ok,
            "sandbox": "bwrap", "seccomp": True, "limits": self.limit_backend.name,
            "runtimes": {name: {"interpreter": rt.interpreter,
                                "available": os.access(rt.interpreter, os.X_OK)
                                and (not rt.transpile or self.sandbox.has_esbuild)}
                         for name, rt in RUNTIMES.items()},
            "runs_active": self.invoker.slots.active, "runs_waiting": self.invoker.slots.waiting,
            "max_runs": self.config.max_runs, "pool": self.pool.describe(),
            "zygote": self.zygote.describe() if self.zygote else {"state": "off", "why": zygote_off_reason(self.config,
                                                                                                    self.limit_backend)},
            "spawn_paths": self.invoker.spawn_paths(),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def render_metrics(self) -> str:
        slots = self.invoker.slots
        rejected_connections = self.server.rejected if self.server else 0
        return self.metrics.render({
            "faas_runs_in_flight": ("Sandboxes running now.", slots.active),
            "faas_runs_waiting": ("Calls waiting for a run slot.", slots.waiting),
            "faas_max_runs": ("Configured FAAS_MAX_RUNS.", slots.max_runs),
            'faas_rejected_total{reason="queue"}': ("Calls refused: 429 queue full, 503 too many connections.",
                                                    slots.rejected),
            'faas_rejected_total{reason="connections"}': ("", rejected_connections),
            "faas_uptime_seconds": ("Seconds since the server started.", round(time.time() - self.started, 3)),
            "faas_zygote_up": ("1 while a zygote forks Python sandboxes; 0 while they take the bwrap path.",
                               int(self.zygote is not None and self.zygote.describe()["state"] == "up")),
        })

    def serve(self) -> None:
        handler = type("BoundHandler", (Handler,), {"app": self})
        try:
            self.server = server = Server((self.config.host, self.config.port), handler, self.config.max_connections)
        except OSError as error:
            self.close()
            raise ConfigError(f"cannot listen on {self.config.host}:{self.config.port} "
                              f"(FAAS_HOST/HTTP_PORT): {error.strerror}") from None
        signal.signal(signal.SIGTERM, self.on_stop_signal)
        signal.signal(signal.SIGINT, self.on_stop_signal)
        LOG.info("listening on http://%s:%d store=%s limits=%s", self.config.host,
                 server.server_address[1], self.store.kind, self.limit_backend.name)
        if self.config.insecure and not is_loopback(self.config.host) and not self.config.token:
            LOG.warning("FAAS_INSECURE=1: anyone who reaches %s can run code", self.config.host)
        notify_systemd(f"READY=1\nSTATUS=serving on port {server.server_address[1]}")
        interval = watchdog_interval()
        if interval:
            threading.Thread(target=self.watchdog, args=(interval,), daemon=True).start()
        try:
            server.serve_forever(poll_interval=0.5)
            server.server_close()   # refuse new connections at once, then let calls finish
            self.drain()
        finally:
            server.server_close()
            self.close()

    def on_stop_signal(self, signum: int, frame: Any) -> None:
        """Stop accepting at once; running calls finish in drain()."""
        if self.stopping.is_set():
            return
        LOG.info("signal %s: stopping; running calls may finish", signal.Signals(signum).name)
        notify_systemd("STOPPING=1\nSTATUS=draining running calls")
        self.stopping.set()
        assert self.server is not None
        threading.Thread(target=self.server.shutdown, daemon=True).start()

    def drain(self) -> None:
        """Wait for requests in progress, at most one time limit (plus a margin)."""
        assert self.server is not None
        deadline = time.monotonic() + self.config.timeout + 5
        while self.server.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.server.busy:
            LOG.warning("stopping with %d requests still running", self.server.busy)

    def watchdog(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            notify_systemd("WATCHDOG=1")

    def close(self) -> None:
        self.pool.close()
        if self.zygote is not None:
            self.zygote.close()
        self.store.close()
        self.limit_backend.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


# ==========================================================================================
# 8. CLI
# ==========================================================================================

@dataclasses.dataclass(frozen=True)
class Dependency:
    name: str
    present: bool
    detail: str
    fix: str                   # the exact command that installs it
    apt_package: str | None    # what `check --install` installs with apt-get
    required: bool = True      # the server refuses to start without it


def version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def find_dependencies(config: Config) -> list[Dependency]:
    bwrap = shutil.which("bwrap")
    deps = [Dependency("bwrap", bool(bwrap), f"{bwrap} ({version_of(['bwrap', '--version'])})" if bwrap else
                       "runs every call in a sandbox", "apt-get install -y bubblewrap", "bubblewrap")]
    for runtime in (RUNTIMES["python"], RUNTIMES["javascript"]):
        present = os.access(runtime.interpreter, os.X_OK)
        package = "python3" if runtime.language == "python" else "nodejs"
        deps.append(Dependency(
            runtime.interpreter, present,
            version_of([runtime.interpreter, "--version"]) if present else f"runs {runtime.language} functions",
            f"apt-get install -y {package}", package, required=runtime.language == "python"))
    esbuild = config.esbuild
    deps.append(Dependency(
        "esbuild", bool(esbuild and esbuild.is_file()),
        f"{esbuild} ({version_of([str(esbuild), '--version'])})" if esbuild and esbuild.is_file()
        else "transpiles TypeScript at upload",
        f"cd {HERE} && npm ci --ignore-scripts   (needs npm: apt-get install -y npm)", None, required=False))
    if config.redis_url:
        deps.append(redis_dependency(config))
    return deps


def redis_dependency(config: Config) -> Dependency:
    fix = "python3 -m pip install redis   (or: apt-get install -y python3-redis)"
    try:
        import redis  # noqa: F401  (only checked here)
    except ImportError:
        return Dependency("redis-py", False, "the Redis store's client library", fix, "python3-redis")
    try:
        RedisStore(config.redis_url, config.redis_prefix, config.redis_timeout).close()
    except Exception as error:   # any connection or auth failure
        return Dependency("redis server", False, f"{redacted(config.redis_url)}: {error}",
                          "start redis-server or fix REDIS_URL / REDIS_HOST", None)
    return Dependency("redis server", True, redacted(config.redis_url), "", None)


def redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def run_check(config: Config, install: bool) -> int:
    deps = find_dependencies(config)
    missing = [dep for dep in deps if not dep.present]
    if install and missing:
        install_missing(missing)
        deps = find_dependencies(config)
        missing = [dep for dep in deps if not dep.present]
    for dep in deps:
        state = "ok" if dep.present else ("MISSING" if dep.required else "missing (optional)")
        print(f"{state:<20} {dep.name:<16} {dep.detail}")
        if not dep.present:
            print(f"{'':<20} {'fix:':<16} {dep.fix}")
    print(f"{'info':<20} {'limits':<16} {describe_limits(config)}")
    return 1 if any(dep.required for dep in missing) else 0


def install_missing(missing: list[Dependency]) -> None:
    """Install what a fresh Debian/Ubuntu lacks: apt packages as root, then esbuild with npm."""
    packages = sorted({dep.apt_package for dep in missing if dep.apt_package})
    if any(dep.name == "esbuild" for dep in missing) and not shutil.which("npm"):
        packages.append("npm")
    if packages:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            print(f"cannot install {' '.join(packages)}: needs root and apt-get; run the fix commands below")
        else:
            print(f"installing with apt-get: {' '.join(packages)}", flush=True)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=False)
    if any(dep.name == "esbuild" for dep in missing) and shutil.which("npm"):
        print("installing esbuild with npm ci", flush=True)
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=HERE, check=False)


INSTALL_FILES = ("faas.py", "openapi.json", "package.json", "package-lock.json", "README.md")
UNIT_FILES = ("faas.service", "faas.slice")
SYSTEMD_DIR = Path("/etc/systemd/system")
ENV_FILE = Path("/etc/faas/faas.env")
ENV_TEMPLATE = """# Settings for faas.service, one NAME=value per line (see README.md, Configuration).
# After a change: systemctl restart faas
# MAX_MEMORY=128M
# TIMEOUT_SCRIPT=30
# FAAS_TOKEN=
"""


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def install(prefix: Path) -> int:
    """Copy the server, its wrappers and esbuild to prefix and the units to systemd: the
    same as copying them by hand. Prints every action."""
    if os.geteuid() != 0:
        print("faas install: needs root (it writes to /etc/systemd/system)", file=sys.stderr)
        return 1
    prefix.mkdir(parents=True, exist_ok=True)
    for name in INSTALL_FILES:
        if (HERE / name).is_file():
            shutil.copy2(HERE / name, prefix / name)
            print(f"copied {HERE / name} -> {prefix / name}")
    shutil.copytree(HERE / "wrappers", prefix / "wrappers", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    print(f"copied {HERE / 'wrappers'} -> {prefix / 'wrappers'}")
    esbuild = HERE / "node_modules/@esbuild"
    if esbuild.is_dir():
        shutil.copytree(esbuild, prefix / "node_modules/@esbuild", dirs_exist_ok=True, symlinks=True)
        print(f"copied {esbuild} -> {prefix / 'node_modules/@esbuild'}")
    elif shutil.which("npm"):
        print(f"installing esbuild: npm ci --ignore-scripts in {prefix}", flush=True)
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=prefix, check=False)
    else:
        print("TypeScript needs esbuild: apt-get install -y npm, then run this again")
    for name in UNIT_FILES:
        text = (HERE / name).read_text().replace("/opt/faas", str(prefix))
        (SYSTEMD_DIR / name).write_text(text)
        print(f"wrote {SYSTEMD_DIR / name}")
    if not ENV_FILE.exists():
        ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
        ENV_FILE.write_text(ENV_TEMPLATE)
        ENV_FILE.chmod(0o600)
        print(f"wrote {ENV_FILE} (settings; mode 600 because it may hold tokens)")
    if systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print("ran systemctl daemon-reload")
    print("next: systemctl enable --now faas   (then: curl -s localhost:8080/healthz)")
    return 0


def uninstall(prefix: Path, purge: bool) -> int:
    if os.geteuid() != 0:
        print("faas uninstall: needs root", file=sys.stderr)
        return 1
    if systemd_running():
        subprocess.run(["systemctl", "disable", "--now", "faas.service"], check=False)
        print("ran systemctl disable --now faas.service")
    for name in UNIT_FILES:
        (SYSTEMD_DIR / name).unlink(missing_ok=True)
        print(f"removed {SYSTEMD_DIR / name}")
    if systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    shutil.rmtree(prefix, ignore_errors=True)
    print(f"removed {prefix}")
    if purge:
        for path in (Path("/var/lib/faas"), ENV_FILE.parent):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}")
    else:
        print("kept the stored functions in /var/lib/faas and settings in /etc/faas (--purge removes them)")
    return 0


def load_config(overrides: dict[str, str]) -> Config:
    """The environment, over a .env file in the working directory (as go-faas reads it),
    under the command line's flags."""
    env = {**read_dotenv(Path.cwd() / ".env"), **os.environ, **overrides}
    return Config.from_env(env)


def parse_args(argv: list[str]) -> Any:
    import argparse
    parser = argparse.ArgumentParser(prog="faas.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the server (the default)")
    serve.add_argument("--host", help="bind address (FAAS_HOST)")
    serve.add_argument("--port", help="port (HTTP_PORT)")
    serve.add_argument("--data-dir", help="SQLite store directory (FAAS_DATA_DIR)")
    check = commands.add_parser("check", help="list dependencies, with the command that fixes each")
    check.add_argument("--install", action="store_true", help="install missing packages (root, apt-get, npm)")
    for name, text in (("install", "copy to PREFIX and install faas.service/faas.slice"),
                       ("uninstall", "remove what install put in place")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--prefix", type=Path, default=Path("/opt/faas"))
        if name == "uninstall":
            command.add_argument("--purge", action="store_true", help="also delete stored functions and settings")
    args = parser.parse_args(argv)
    args.command = args.command or "serve"
    return args


def main(argv: list[str]) -> int:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("FAAS_LOG_LEVEL", "INFO").upper(),
                        format="%(levelname)s %(message)s" if under_journald else
                        "%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.command == "install":
        return install(args.prefix.resolve())
    if args.command == "uninstall":
        return uninstall(args.prefix.resolve(), args.purge)
    flags = {"FAAS_HOST": getattr(args, "host", None), "HTTP_PORT": getattr(args, "port", None),
             "FAAS_DATA_DIR": getattr(args, "data_dir", None)}
    try:
        config = load_config({name: value for name, value in flags.items() if value is not None})
    except ConfigError as error:
        print(f"faas: configuration error: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        return run_check(config, args.install)
    if not shutil.which("bwrap"):
        print("faas: bwrap (bubblewrap) is not installed; every call runs in a bwrap sandbox, so "
              "the server cannot start. Fix: apt-get install -y bubblewrap "
              "(or run `python3 faas.py check --install`)", file=sys.stderr)
        return 1
    try:
        app = App(config)
    except Exception as error:   # store unreachable, cgroups unusable, port taken...
        print(f"faas: cannot start: {error}", file=sys.stderr)
        return 1
    try:
        app.serve()
    except ConfigError as error:
        print(f"faas: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
