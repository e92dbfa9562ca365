#!/usr/bin/env python3
"""faas — a Function-as-a-Service server for one Linux box.

Users POST Python, JavaScript or TypeScript function bodies; each upload becomes a new,
immutable version of an HTTP endpoint. Every call runs in a fresh Bubblewrap sandbox and
answers as JSON or as a live Server-Sent-Events stream. Compatible with go-faas's HTTP API
and environment variables.

The module reads top to bottom in the order a request flows through it:
Config -> Store -> Runtimes -> Limits -> Sandbox -> Invocation -> Calls -> HTTP -> CLI.
Standard library only; redis-py is imported only when a Redis store is configured.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import http
import http.client
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
    calls: "CallConfig"

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
            calls=CallConfig.from_env(get, parse_number("HTTP_PORT", get("HTTP_PORT", "8080"), int, 0, 65535),
                                      bool(redis_url)),
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
    data = limits.memory if backend_name == "rlimit" else 2 * limits.memory
    cpu_seconds = int(limits.timeout * max(limits.cpus, 1)) + 1
    return (f"ulimit -c 0 && ulimit -d {data // 1024} && ulimit -f {limits.tmp_size // 512} && "
            f"ulimit -n 1024 && ulimit -S -t {cpu_seconds} && ulimit -H -t {cpu_seconds + 1}")


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


def seccomp_program(machine: str) -> bytes:
    """The filter as struct sock_filter records {u16 code; u8 jt; u8 jf; u32 k}."""
    load_word, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06   # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    kill, allow, eperm = 0x80000000, 0x7FFF0000, 0x00050000 | errno.EPERM
    column = 0 if machine == "x86_64" else 1

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    program = [op(load_word, 4), op(jump_eq, AUDIT_ARCH[machine], 1, 0), op(ret, kill), op(load_word, 0)]
    if machine == "x86_64":
        program += [op(jump_ge, 0x40000000, 0, 1), op(ret, kill)]   # x32 ABI
    for numbers in DENIED_SYSCALLS.values():
        if numbers[column] is not None:
            program += [op(jump_eq, numbers[column], 0, 1), op(ret, eperm)]
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


def reap(proc: subprocess.Popen, wait: float) -> tuple[int | None, float | None]:
    """Popen.wait that keeps the resource usage: the exit code and the CPU seconds of the
    process and of everything it waited for (bwrap waits for the whole sandbox). Gives
    (None, None) if the process is still running after `wait` seconds."""
    deadline = time.monotonic() + wait
    pause = 0.0002
    while proc.returncode is None:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break   # reaped elsewhere
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
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
    proc: subprocess.Popen
    cgroup: "RunCgroup"
    result_r: int
    limits: Limits
    born: float
    spawn_ms: float


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

    def start(self, argv: list[str], limits: Limits, result_fd: bool = True) -> "Started":
        """A fresh sandbox, placed in its own cgroup, its wrapper loading and then waiting for
        the request on stdin. Nothing of the caller's runs until `complete` sends it."""
        began = time.monotonic()
        cgroup = self.limits.create(uuid.uuid4().hex[:12], limits)
        result_r = -1
        try:
            child_fds = [seccomp_fd(self.seccomp)]
            tail = []
            if result_fd:
                result_r, result_w = os.pipe()
                child_fds.append(result_w)
                tail = [str(result_w)]
            command = [*self.gate(limits, cgroup), *cgroup.command_prefix(), *self.base_argv,
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

    def complete(self, started: "Started", stdin: bytes, limits: Limits, sink: LineSink | None,
                 since: float | None = None, answer_early: bool = False) -> Outcome:
        """Send the request to a started sandbox, pump its output, end it and clean up.
        `since` is when a cold call began, its sandbox's start-up included; None for a
        pre-started sandbox, whose start-up (time and CPU) is not the call's.

        With answer_early, the outcome is ready as soon as the wrapper's result has arrived
        (with the output printed before it): the sandbox is then still exiting, and
        `outcome.cleanup` must be called once the answer is sent. That saves the caller the
        interpreter's and the namespaces' teardown (1-3 ms)."""
        outcome = Outcome(spawn_ms=started.spawn_ms)
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
            outcome.cleanup = lambda: self.finish(started, Outcome())
        else:
            self.finish(started, outcome)
            if not outcome.joined:   # the server's fault, and its stderr names host paths
                raise SandboxError("a sandbox could not join its cgroups: "
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
                "--clear-groups", "--"]

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
            outcome.joined = cgroup.joined()
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
        self.freed = threading.Condition(self.lock)
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
            self.freed.notify_all()
        self.semaphore.release()

    def try_acquire(self, timeout: float) -> bool:
        """A slot for a queued call, without waiting in line or counting a 429; release()s it."""
        if not self.semaphore.acquire(timeout=timeout):
            return False
        with self.lock:
            self.active += 1
        return True

    release = __exit__

    def wait_free(self, timeout: float) -> bool:
        """Whether a slot is free, waiting up to `timeout` seconds for one (without taking it)."""
        with self.lock:
            return self.freed.wait_for(lambda: self.active < self.max_runs, timeout)


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
               sink: LineSink | None, on_start: Callable[[], None] | None = None, reserved: bool = False,
               on_sandbox: Callable[[Started], None] | None = None
               ) -> tuple[int, dict[str, Any], Callable[[], None]]:
        """Run one call: (HTTP status, answer, what to do once the answer is sent). `on_start`
        runs once a slot is taken, so a stream only begins when the call will really run
        (an overloaded server answers 429 as JSON). `reserved`: the caller holds a slot
        (a queued call); `on_sandbox` gets the sandbox (to kill it when the call is cancelled)."""
        request = json.dumps({"code": code, "event": event, "language": runtime.language}).encode()
        with contextlib.nullcontext() if reserved else self.slots:
            if on_start is not None:
                on_start()
            outcome = self.run_sandboxed(runtime.argv, request, limits, sink, on_sandbox)
        try:
            status, answer = build_answer(outcome, limits)
        except BaseException:
            outcome.cleanup()
            raise
        self.metrics.inc("faas_calls_total", function=function, language=runtime.language, status=outcome.status)
        self.metrics.observe("faas_call_duration_seconds", outcome.duration_ms / 1000, language=runtime.language)
        self.metrics.observe("faas_sandbox_spawn_seconds", outcome.spawn_ms / 1000)

        def after_answer() -> None:
            """End the sandbox, then start its replacement: neither slows the answer."""
            outcome.cleanup()
            self.pool.refill()
        return status, answer, after_answer

    def run_sandboxed(self, argv: tuple[str, ...], request: bytes, limits: Limits,
                      sink: LineSink | None, on_sandbox: Callable[[Started], None] | None = None) -> Outcome:
        """A pre-started sandbox when the pool has one, else a cold one: never a wait."""
        started = self.pool.take(argv, limits)
        if started is None:
            started = self.sandbox.start([*argv, "--cold"], limits)
            if on_sandbox is not None:
                on_sandbox(started)
            return self.sandbox.complete(started, request, limits, sink, since=started.born, answer_early=True)
        if on_sandbox is not None:
            on_sandbox(started)
        return self.sandbox.complete(started, request, limits, sink, answer_early=True)


def first_line_number(message: str) -> int | None:
    """esbuild reports `function.ts:LINE:COL`; our header shares the user's first line."""
    match = re.search(r"function\.ts:(\d+):", message)
    return int(match.group(1)) if match else None


# ==========================================================================================
# 6b. Calls (asynchronous calls with a queryable record)
# ==========================================================================================
# Asynchronous calls with a queryable record (research/async.md). The record is the truth:
# a queue entry only says "someone should look at this call". Every state change of a
# record is one atomic step (an SQLite statement, a Redis Lua script) that checks the state
# it expects, so each call ends with exactly one final record, whatever crashes: a late
# result from a node that lost its call (fenced by owner and attempt) is refused.

CALL_FINAL = ("ok", "error", "timeout", "oom", "output_limit", "killed", "internal",
              "cancelled", "expired", "lost")
CALL_STATUSES = ("queued", "running", *CALL_FINAL)
CALL_CODES = {**STATUS_CODES, "cancelled": 409, "expired": 504, "lost": 502}
CALL_ID_RE = re.compile(r"[0-9a-f]{32}")
CALL_EVENTS_MAX = 10000   # printed lines kept per call (the record's stdout keeps the rest)
IDEMPOTENCY_KEY_MAX = 255


@dataclasses.dataclass(frozen=True)
class CallConfig:
    """The FAAS_* settings of asynchronous calls and of servers sharing one Redis."""
    node_id: str
    lease: float
    ttl: float
    max_wait: float
    retries: int
    max_queue: int
    max_age: float
    spill: bool
    callback_allow: tuple[str, ...]
    callback_secret: bytes | None

    @classmethod
    def from_env(cls, get: Callable[..., str], port: int, redis: bool) -> "CallConfig":
        ttl = parse_number("FAAS_CALL_TTL", get("FAAS_CALL_TTL", "3600"), float, 1)
        allow = tuple(p.strip() for p in get("FAAS_CALLBACK_ALLOW").split(",") if p.strip())
        for prefix in allow:
            parts = urllib.parse.urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"FAAS_CALLBACK_ALLOW: {prefix!r} is not an http(s) URL prefix")
        secret = get("FAAS_CALLBACK_SECRET")
        if allow and not secret:
            raise ConfigError("FAAS_CALLBACK_ALLOW is set but FAAS_CALLBACK_SECRET is not: callbacks are signed")
        node_id = get("FAAS_NODE_ID") or f"{socket.gethostname()}:{port}"
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", node_id):
            raise ConfigError(f"FAAS_NODE_ID={node_id!r} must be 1-100 of letters, digits, '.', '_', ':' or '-'")
        return cls(
            node_id=node_id,
            lease=parse_number("FAAS_NODE_LEASE", get("FAAS_NODE_LEASE", "15"), float, 1, 3600),
            ttl=ttl,
            max_wait=parse_number("FAAS_MAX_WAIT", get("FAAS_MAX_WAIT", "60"), float, 0, 3600),
            retries=parse_number("FAAS_ASYNC_RETRIES", get("FAAS_ASYNC_RETRIES", "1"), int, 0, 10),
            max_queue=parse_number("FAAS_ASYNC_MAX_QUEUE", get("FAAS_ASYNC_MAX_QUEUE", "10000"), int, 1),
            max_age=min(ttl, parse_number("FAAS_ASYNC_MAX_AGE", get("FAAS_ASYNC_MAX_AGE", str(ttl)), float, 0.1)),
            spill=redis and get("FAAS_SPILL", "1") not in ("0", "false", "no"),
            callback_allow=allow,
            callback_secret=callback_key(secret) if secret else None,
        )


def callback_key(secret: str) -> bytes:
    """Standard Webhooks secrets are `whsec_<base64>`; any other text is used as it is."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            raise ConfigError("FAAS_CALLBACK_SECRET starts with whsec_ but is not base64") from None
    return secret.encode()


def new_call_id() -> str:
    return uuid.uuid4().hex


def retries_for(version: Version, configured: int) -> int:
    """A re-run after a node loss repeats the function's effects: a function with network
    access (whose effects may be outside) is never re-run."""
    network = getattr(version, "network", None) or (version.limits or {}).get("network")
    return 0 if network not in (None, "", "none", False) else configured


def event_key(event_id: str) -> tuple[int, int]:
    """Event ids are `<attempt>-<sequence>`, increasing across the attempts of a call."""
    attempt, _, seq = event_id.partition("-")
    try:
        return int(attempt), int(seq or 0)
    except ValueError:
        return 0, 0


def final_answer(status: str, message: str) -> dict[str, Any]:
    """The answer of a call that ended without a run of its own (cancelled, expired, lost)."""
    return {"http": CALL_CODES[status], "error": message, "status": status}


def final_event(record: dict[str, Any]) -> dict[str, Any]:
    """The last SSE event of a call: the same `result`/`error` event a sync stream ends with."""
    answer = dict(record.get("answer") or {})
    code = answer.pop("http", 500)
    for field in ("stdout", "stderr"):
        answer.pop(field, None)
    answer.update(id=record["id"], node=record.get("node"), attempt=record.get("attempt"))
    if code == 200:
        return {"event": "result", **answer}
    message = answer.pop("error", record["status"])
    return {"event": "error", "data": message, "type": "text", **answer}


def call_view(record: dict[str, Any]) -> dict[str, Any]:
    """A record as GET /calls/<id> shows it: the sync answer's fields once it has ended."""
    view = {key: record.get(key) for key in ("id", "kind", "path", "version", "status", "attempt", "node",
                                             "created", "started", "finished")}
    view["queue_ms"] = int((record["started"] - record["created"]) * 1000) if record.get("started") else None
    view["status_url"] = f"/calls/{record['id']}"
    view["events_url"] = f"/calls/{record['id']}/events"
    if record.get("callback_url"):
        view["callback"] = {"url": record["callback_url"], **(record.get("callback") or {})}
    answer = dict(record.get("answer") or {})
    answer.pop("http", None)
    answer.pop("status", None)
    view.update(answer)
    return view


class RunningCall:
    """A call this server is running now: its printed lines (for followers and for the
    record) and the sandbox to kill when it is cancelled."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.id = record["id"]
        self.attempt = int(record["attempt"])
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.unflushed: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.flush_lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.sandbox: Started | None = None
        self.cancelled = False
        self.done = False

    def sink(self, stream: str, line: str) -> None:
        data, kind = parse_printed(line)
        with self.lock:
            if len(self.events) >= CALL_EVENTS_MAX:
                return
            entry = (f"{self.attempt}-{len(self.events) + 1}",
                     {"event": "log", "data": data, "type": kind, "stream": stream})
            self.events.append(entry)
            self.unflushed.append(entry)
            self.changed.notify_all()

    def take_unflushed(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            taken, self.unflushed = self.unflushed, []
            return taken

    def after(self, cursor: str | None, wait: float) -> list[tuple[str, dict[str, Any]]]:
        """Events after `cursor`, waiting up to `wait` seconds for one."""
        mark = event_key(cursor) if cursor else (0, 0)
        with self.lock:
            found = [e for e in self.events if event_key(e[0]) > mark]
            if not found and not self.done and wait > 0:
                self.changed.wait(wait)
                found = [e for e in self.events if event_key(e[0]) > mark]
            return found

    def on_sandbox(self, started: Started) -> None:
        with self.lock:
            self.sandbox = started
            cancelled = self.cancelled
        if cancelled:
            self.kill()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
        self.kill()

    def kill(self) -> None:
        with self.lock:
            started = self.sandbox
        if started is not None:
            started.cgroup.kill()
            with contextlib.suppress(OSError):
                started.proc.kill()

    def finish(self) -> None:
        with self.lock:
            self.done = True
            self.changed.notify_all()


class Waiters:
    """In-process wake-ups for callers waiting on a call's record (GET ?wait, Prefer: wait,
    a spilled sync call, an event follower). Who changes a record (this process, or a
    completion read from Redis) calls notify(id); the waiter then re-reads the record."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: dict[str, list[threading.Event]] = {}

    def register(self, call_id: str) -> threading.Event:
        event = threading.Event()
        with self.lock:
            self.events.setdefault(call_id, []).append(event)
        return event

    def unregister(self, call_id: str, event: threading.Event) -> None:
        with self.lock:
            events = self.events.get(call_id, [])
            if event in events:
                events.remove(event)
            if not events:
                self.events.pop(call_id, None)

    def notify(self, call_id: str) -> None:
        with self.lock:
            for event in self.events.get(call_id, ()):
                event.set()


def is_final(record: dict[str, Any]) -> bool:
    return record["status"] in CALL_FINAL


class Calls:
    """Submits, runs, waits for, follows and cancels calls on either store. Each server
    consumes queued calls with its free run slots through the same Invoker as a sync call."""

    def __init__(self, config: Config, store: Store, invoker: Invoker, metrics: Metrics) -> None:
        self.config = config.calls
        self.invoker = invoker
        self.metrics = metrics
        self.waiters = Waiters()
        self.owner = f"{self.config.node_id}/{uuid.uuid4().hex[:12]}"   # node and incarnation
        self.running: dict[str, RunningCall] = {}
        self.cancel_requested: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.spilling = 0
        self.callbacks = Callbacks(self.config, self)
        # Both backends answer submit, get, stored_events, finish, cancel, list,
        # set_callback and queue_state alike; queue consumption differs.
        self.backend: SQLiteCalls | RedisCalls
        if isinstance(store, RedisStore):
            self.backend = RedisCalls(store, config, self)
        else:
            self.backend = SQLiteCalls(store, self.config, self.waiters)  # type: ignore[arg-type]

    @property
    def node(self) -> str:
        return self.config.node_id

    def start(self) -> None:
        """Recover what a previous run of this server left, then consume the queue."""
        if isinstance(self.backend, SQLiteCalls):
            requeued, lost = self.backend.recover()
            if requeued or lost:
                LOG.warning("calls running when the server stopped: %d re-queued, %d lost", requeued, len(lost))
                self.metrics.inc("faas_calls_redelivered_total", requeued)
                self.metrics.inc("faas_calls_lost_total", len(lost))
            for call_id in lost:
                self.ended(call_id)
            self.backend.queued.set()
            self.spawn(self.consume_sqlite, "calls-consumer")
        else:
            self.backend.start()

    def spawn(self, target: Callable[[], None], name: str) -> None:
        """A background loop, restarted (after a pause) if it fails unexpectedly."""
        def guarded() -> None:
            while True:
                try:
                    return target()
                except Exception as error:
                    LOG.error("%s failed, restarting it in 1 s: %r", name, error)
                    time.sleep(1)
        threading.Thread(target=guarded, name=name, daemon=True).start()

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, kind: str, version: Version, event: Any, limits: Limits, retries: int,
               idempotency: tuple[str, str] | None = None, callback_url: str | None = None,
               max_age: float | None = None) -> tuple[dict[str, Any], bool]:
        """Queue a call; (record, replayed). `idempotency` is (scoped key, body hash)."""
        record = {"id": new_call_id(), "kind": kind, "path": version.path, "version": version.version,
                  "status": "queued", "request": {"input": event, "limits": dataclasses.asdict(limits)},
                  "attempt": 0, "max_attempts": 1 + retries, "callback_url": callback_url,
                  "idem": idempotency[0] if idempotency else None,
                  "body_hash": idempotency[1] if idempotency else None,
                  "max_age": self.config.max_age if max_age is None else max_age}
        record, replayed = self.backend.submit(record, self.config.max_queue)
        if replayed:
            if idempotency and record.get("body_hash") != idempotency[1]:
                raise ApiError(422, "this Idempotency-Key was used with a different request body",
                               id=record["id"])
        else:
            self.metrics.inc("faas_async_submitted_total", kind=kind)
        return record, replayed

    # -- running ------------------------------------------------------------------------------
    def consume_sqlite(self) -> None:
        """Take queued calls while a run slot is free; woken by submit, never polling. The
        wait's timeout only paces the expiry and retention sweeps."""
        backend: SQLiteCalls = self.backend
        slots = self.invoker.slots
        last_expiry = last_sweep = 0.0
        while not self.stopping.is_set():
            woken = backend.queued.wait(1.0)
            if time.monotonic() - last_expiry >= 1:
                last_expiry = time.monotonic()
                for call_id in backend.expire_queued():
                    self.ended(call_id)
                if last_expiry - last_sweep > 60:
                    last_sweep = last_expiry
                    backend.sweep()
            if not woken:
                continue
            if not slots.try_acquire(0.5):
                continue
            if self.stopping.is_set():
                slots.release()
                break
            backend.queued.clear()
            try:
                record = backend.claim(self.node, self.owner)
            except Exception:
                slots.release()
                LOG.exception("claiming a queued call failed")
                time.sleep(1)
                continue
            if record is None:
                slots.release()
                continue
            backend.queued.set()   # there may be more
            self.start_run(record)

    def start_run(self, record: dict[str, Any]) -> None:
        """Run a claimed call in its own thread; the caller has taken a run slot for it."""
        running = RunningCall(record)
        with self.lock:
            self.running[running.id] = running
            cancelled = running.id in self.cancel_requested
        if cancelled:
            running.cancel()
        threading.Thread(target=self.execute, args=(running,), name=f"call-{running.id[:8]}", daemon=True).start()

    def execute(self, running: RunningCall) -> None:
        record = running.record
        self.metrics.observe("faas_call_queue_wait_seconds", max(0.0, record["started"] - record["created"]))
        after_answer: Callable[[], None] = lambda: None
        try:
            version = self.invoker.resolve(record["path"], record["version"])
            limits = Limits(**record["request"]["limits"])
            code, answer, after_answer = self.invoker.invoke(
                record["path"], RUNTIMES[version.language], version.runnable, record["request"]["input"],
                limits, running.sink, reserved=True, on_sandbox=running.on_sandbox)
            answer = {"http": code, **answer, "version": version.version}
        except ApiError as error:   # the version was deleted after the call was queued
            answer = {"http": error.status, "error": error.message, "status": "error"}
        except Exception:
            LOG.exception("call %s failed to run", running.id)
            answer = final_answer("internal", "the server failed to run the call; see its log")
        finally:
            self.invoker.slots.release()
        if running.cancelled:
            answer = {key: value for key, value in answer.items() if key not in ("data", "type")}
            answer.update(final_answer("cancelled", "the call was cancelled while it ran"))
        try:
            self.finish(running, answer)
        finally:
            running.finish()
            with self.lock:
                self.running.pop(running.id, None)
                self.cancel_requested.discard(running.id)
            after_answer()

    def finish(self, running: RunningCall, answer: dict[str, Any]) -> None:
        """The fenced final write, retried while the store is unreachable."""
        status = answer["status"]
        deadline = time.monotonic() + max(60.0, self.config.lease * 4)
        while True:
            try:
                written = self.backend.finish(running, status, answer)
                break
            except Exception as error:
                if not is_store_error(error) or time.monotonic() > deadline:
                    LOG.error("call %s: its result could not be stored: %s", running.id, error)
                    return
                time.sleep(0.5)
        if not written:
            LOG.warning("call %s attempt %d: late result refused (the call was taken over or ended)",
                        running.id, running.attempt)
            self.metrics.inc("faas_calls_refused_total")
            return
        self.metrics.inc("faas_calls_final_total", status=status)
        if running.record.get("callback_url"):
            self.callbacks.schedule(running.id)

    def ended(self, call_id: str) -> None:
        """A call ended without a run of this server's (cancelled, expired, lost): its
        callback, when it asked for one."""
        if self.config.callback_allow:
            self.callbacks.schedule(call_id)

    # -- waiting, following, cancelling -------------------------------------------------------
    def get(self, call_id: str) -> dict[str, Any]:
        record = self.backend.get(call_id) if CALL_ID_RE.fullmatch(call_id) else None
        if record is None:
            raise ApiError(404, f"no call {call_id} (unknown, or past its retention of {self.config.ttl:g} s)")
        return record

    def wait(self, call_id: str, until: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The record once `until(record)` holds, or as it is after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.waiters.register(call_id)
            try:
                record = self.backend.get(call_id)
                remaining = deadline - time.monotonic()
                if record is None or until(record) or remaining <= 0:
                    return record
                event.wait(min(remaining, 1.0))   # a re-read each second covers a lost wake-up
            finally:
                self.waiters.unregister(call_id, event)

    def follow(self, call_id: str, cursor: str | None, status_events: bool = True
               ) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """(event id, event) of a call: its status, the lines it printed after `cursor`
        (replayed, then as they come), and finally the same result/error event a sync stream
        ends with."""
        record = self.get(call_id)
        if status_events:
            yield None, self.status_event(record)
        seen = record["status"]
        while True:
            final = is_final(record)
            running = self.running.get(call_id)
            if running is not None:
                events = running.after(cursor, 0.5)
            else:
                events = self.backend.stored_events(call_id, cursor, 0 if final else 0.5)
                if not events and not final and isinstance(self.backend, SQLiteCalls):
                    self.wait(call_id, lambda r: r["status"] != seen, 0.5)
            for event_id, event in events:
                cursor = event_id
                yield event_id, event
            if final and running is None:
                yield None, final_event(record)
                return
            fresh = self.backend.get(call_id)
            if fresh is None:
                return
            record = fresh
            if status_events and record["status"] != seen and not is_final(record):
                yield None, self.status_event(record)
            seen = record["status"]

    @staticmethod
    def status_event(record: dict[str, Any]) -> dict[str, Any]:
        return {"event": "status", "id": record["id"], "status": record["status"], "node": record.get("node"),
                "attempt": record.get("attempt")}

    def cancel(self, call_id: str) -> dict[str, Any]:
        self.get(call_id)
        outcome, record = self.backend.cancel(call_id)
        if outcome == "none" or record is None:
            raise ApiError(404, f"no call {call_id}")
        if outcome == "final":
            raise ApiError(409, f"the call has already ended: {record['status']}", call_status=record["status"])
        if outcome == "cancelled":
            self.ended(call_id)
        if outcome == "cancelling":
            self.cancel_local(call_id)
            record = self.wait(call_id, is_final, 10) or record
        return record

    def cancel_local(self, call_id: str) -> None:
        with self.lock:
            self.cancel_requested.add(call_id)
            running = self.running.get(call_id)
        if running is not None:
            running.cancel()

    # -- sync overflow ------------------------------------------------------------------------
    def should_spill(self) -> bool:
        slots = self.invoker.slots
        return self.config.spill and not self.stopping.is_set() and slots.active >= slots.max_runs

    def spill(self, version: Version, event: Any, limits: Limits) -> dict[str, Any]:
        """A sync call this full server cannot start: queued for any server with a free
        slot. Its record once started, or 429 if none started it within FAAS_QUEUE_TIMEOUT."""
        with self.lock:
            if self.spilling >= self.invoker.config.max_queue:
                raise ApiError(429, f"all {self.invoker.slots.max_runs} run slots are busy; retry shortly",
                               headers={"Retry-After": "1"})
            self.spilling += 1
        try:
            wait = self.invoker.config.queue_timeout
            record, _ = self.submit("sync", version, event, limits, 0, max_age=wait)
            started = self.wait(record["id"], lambda r: r["status"] != "queued", wait + 0.2)
            if started is None or started["status"] == "queued":
                _, started = self.backend.cancel(record["id"])   # never starts later
            if started is None or started["status"] in ("cancelled", "expired"):
                self.metrics.inc("faas_spilled_total", outcome="rejected")
                raise ApiError(429, "all run slots of every server are busy; retry shortly",
                               headers={"Retry-After": "1"})
            self.metrics.inc("faas_spilled_total", outcome="started")
            return started
        finally:
            with self.lock:
                self.spilling -= 1

    # -- state --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        state: dict[str, Any] = {"node": self.node, "store": self.backend.kind, "running": len(self.running),
                                 "draining": self.stopping.is_set()}
        try:
            state["queue"] = self.backend.queue_state()
            if isinstance(self.backend, RedisCalls):
                state.update(self.backend.health())
        except Exception as error:   # the store is down: /healthz says so elsewhere
            state["queue"] = {"error": str(error)}
        return state

    def nodes(self) -> list[dict[str, Any]]:
        if isinstance(self.backend, RedisCalls):
            return self.backend.nodes()
        return [self.node_state()]

    def node_state(self) -> dict[str, Any]:
        slots = self.invoker.slots
        return {"id": self.node, "incarnation": self.owner.split("/")[1], "max_runs": slots.max_runs,
                "active": slots.active, "waiting": slots.waiting, "running_calls": len(self.running),
                "draining": self.stopping.is_set(), "pid": os.getpid()}

    def stop_taking(self) -> None:
        self.stopping.set()

    def drain(self, deadline: float) -> None:
        """After stop_taking: wait for the calls running here (close() then leaves the cluster)."""
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running:
            LOG.warning("stopping with %d calls still running", len(self.running))
        self.callbacks.stop()

    def close(self) -> None:
        """Stop the background loops and, on Redis, give up this server's lease at once."""
        self.stopping.set()
        if isinstance(self.backend, RedisCalls):
            self.backend.leave()


# ==========================================================================================
# 6c. Calls on SQLite (one server)
# ==========================================================================================

class SQLiteCalls:
    """Calls in the function store's SQLite file: a `calls` table is record and queue at
    once. A call is claimed by one UPDATE ... RETURNING; the consumer is woken by an
    in-process event when a call is queued, never by polling. One server per file."""
    kind = "sqlite"
    durable = True
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS calls (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL, version INTEGER,
            status TEXT NOT NULL, request TEXT NOT NULL, answer TEXT, events TEXT,
            node TEXT, owner TEXT, attempt INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
            idem TEXT UNIQUE, body_hash TEXT, callback_url TEXT, callback TEXT,
            created REAL NOT NULL, started REAL, finished REAL, deadline REAL NOT NULL,
            expires REAL NOT NULL);
        CREATE INDEX IF NOT EXISTS calls_queue ON calls (created) WHERE status = 'queued';
        CREATE INDEX IF NOT EXISTS calls_expires ON calls (expires);
        CREATE INDEX IF NOT EXISTS calls_created ON calls (created);
    """
    COLUMNS = ("id", "kind", "path", "version", "status", "request", "answer", "events", "node", "owner",
               "attempt", "max_attempts", "idem", "body_hash", "callback_url", "callback", "created",
               "started", "finished", "deadline", "expires")
    JSON_COLUMNS = ("request", "answer", "events", "callback")

    def __init__(self, store: SQLiteStore, config: CallConfig, waiters: Waiters) -> None:
        self.store = store
        self.config = config
        self.waiters = waiters
        self.queued = threading.Event()
        self.write_lock = threading.Lock()
        with store.connection() as db:
            db.executescript(self.SCHEMA)

    @contextlib.contextmanager
    def writing(self, transaction: bool = False) -> Iterator[sqlite3.Connection]:
        """The calls' writes one at a time in this process: they wait on a lock, not in
        SQLite's busy handler, which sleeps milliseconds between its tries."""
        with self.write_lock, (self.store.transaction() if transaction else self.store.connection()) as db:
            yield db

    def row_to_record(self, row: tuple) -> dict[str, Any]:
        record = dict(zip(self.COLUMNS, row))
        for column in self.JSON_COLUMNS:
            record[column] = json.loads(record[column]) if record[column] else None
        return record

    def submit(self, record: dict[str, Any], max_queue: int) -> tuple[dict[str, Any], bool]:
        now = time.time()
        record = {**record, "created": now, "deadline": now + record.pop("max_age"),
                  "expires": now + self.config.ttl}
        with self.writing(transaction=True) as db:
            if record.get("idem"):
                row = db.execute(f"SELECT {', '.join(self.COLUMNS)} FROM calls WHERE idem=?",
                                 (record["idem"],)).fetchone()
                if row:
                    return self.row_to_record(row), True
            depth = db.execute("SELECT count(*) FROM calls WHERE status='queued'").fetchone()[0]
            if depth >= max_queue:
                raise ApiError(429, f"{depth} calls are queued (FAAS_ASYNC_MAX_QUEUE); retry later",
                               headers={"Retry-After": "5"})
            values = [json.dumps(record[c]) if c in self.JSON_COLUMNS and record.get(c) is not None
                      else record.get(c) for c in self.COLUMNS]
            db.execute(f"INSERT INTO calls ({', '.join(self.COLUMNS)}) VALUES ({', '.join('?' * len(self.COLUMNS))})",
                       values)
        self.queued.set()
        return record, False

    def get(self, call_id: str) -> dict[str, Any] | None:
        rows = self.store.rows(f"SELECT {', '.join(self.COLUMNS)} FROM calls WHERE id=? AND expires>?",
                               (call_id, time.time()))
        return self.row_to_record(rows[0]) if rows else None

    def claim(self, node: str, owner: str) -> dict[str, Any] | None:
        """The oldest queued call that may still start, now running here (expire_queued
        marks the others)."""
        now = time.time()
        with self.writing() as db:
            rows = db.execute(
                f"UPDATE calls SET status='running', node=?, owner=?, started=?, expires=?, attempt=attempt+1 "
                f"WHERE id = (SELECT id FROM calls WHERE status='queued' AND deadline>=? ORDER BY created LIMIT 1) "
                f"RETURNING {', '.join(self.COLUMNS)}", (node, owner, now, now + self.config.ttl, now)).fetchall()
        return self.row_to_record(rows[0]) if rows else None

    def expire_queued(self) -> list[str]:
        now = time.time()
        answer = json.dumps(final_answer("expired", "the call was not started within FAAS_ASYNC_MAX_AGE"))
        with self.writing() as db:
            ids = [row[0] for row in db.execute(
                "UPDATE calls SET status='expired', finished=?, answer=?, expires=? "
                "WHERE status='queued' AND deadline<? RETURNING id",
                (now, answer, now + self.config.ttl, now)).fetchall()]
        for call_id in ids:
            self.waiters.notify(call_id)
        return ids

    def stored_events(self, call_id: str, cursor: str | None, wait: float) -> list[tuple[str, dict[str, Any]]]:
        rows = self.store.rows("SELECT events FROM calls WHERE id=?", (call_id,))
        events = json.loads(rows[0][0]) if rows and rows[0][0] else []
        mark = event_key(cursor) if cursor else (0, 0)
        return [(eid, event) for eid, event in events if event_key(eid) > mark]

    def finish(self, running: RunningCall, status: str, answer: dict[str, Any]) -> bool:
        now = time.time()
        with self.writing() as db:
            done = db.execute(
                "UPDATE calls SET status=?, answer=?, events=?, finished=?, expires=? "
                "WHERE id=? AND status='running' AND owner=? AND attempt=?",
                (status, json.dumps(answer), json.dumps(running.events), now, now + self.config.ttl,
                 running.id, running.record["owner"], running.attempt)).rowcount
        self.waiters.notify(running.id)
        return bool(done)

    def cancel(self, call_id: str) -> tuple[str, dict[str, Any] | None]:
        now = time.time()
        answer = json.dumps(final_answer("cancelled", "the call was cancelled before it started"))
        with self.writing() as db:
            cancelled = db.execute(
                "UPDATE calls SET status='cancelled', finished=?, answer=?, expires=? "
                "WHERE id=? AND status='queued'", (now, answer, now + self.config.ttl, call_id)).rowcount
        record = self.get(call_id)
        if cancelled:
            self.waiters.notify(call_id)
            return "cancelled", record
        if record is None:
            return "none", None
        return ("cancelling" if record["status"] == "running" else "final"), record

    def list(self, path: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
        where, params = ["expires>?"], [time.time()]
        if path:
            where.append("path=?")
            params.append(path)
        if status:
            where.append("status=?")
            params.append(status)
        rows = self.store.rows(f"SELECT {', '.join(self.COLUMNS)} FROM calls WHERE {' AND '.join(where)} "
                               f"ORDER BY created DESC LIMIT ?", (*params, limit))
        return [self.row_to_record(row) for row in rows]

    def set_callback(self, call_id: str, state: dict[str, Any]) -> None:
        with self.writing() as db:
            db.execute("UPDATE calls SET callback=? WHERE id=?", (json.dumps(state), call_id))

    def queue_state(self) -> dict[str, Any]:
        depth, oldest = self.store.rows("SELECT count(*), min(created) FROM calls WHERE status='queued'")[0]
        return {"depth": depth, "oldest_queued_s": round(time.time() - oldest, 3) if oldest else 0.0}

    def recover(self) -> tuple[int, list[str]]:
        """At start: calls the previous process was running are re-queued (attempts left)
        or lost. Returns (how many were re-queued, the ids of the lost)."""
        rows = self.store.rows(f"SELECT {', '.join(self.COLUMNS)} FROM calls WHERE status='running'")
        requeued, lost = 0, []
        now = time.time()
        for record in map(self.row_to_record, rows):
            with self.writing() as db:
                if record["attempt"] < record["max_attempts"]:
                    requeued += db.execute("UPDATE calls SET status='queued', node=NULL, owner=NULL, started=NULL "
                                           "WHERE id=? AND status='running'", (record["id"],)).rowcount
                else:
                    answer = final_answer("lost", f"the server ({record['node']}) stopped while running the call")
                    if db.execute("UPDATE calls SET status='lost', finished=?, answer=?, expires=? "
                                  "WHERE id=? AND status='running'",
                                  (now, json.dumps(answer), now + self.config.ttl, record["id"])).rowcount:
                        lost.append(record["id"])
        if requeued:
            self.queued.set()
        return requeued, lost

    def sweep(self) -> None:
        """Retention: records past FAAS_CALL_TTL go, in small batches."""
        with self.writing() as db:
            db.execute("DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE expires<? AND status NOT IN "
                       "('queued', 'running') LIMIT 500)", (time.time(),))


# ==========================================================================================
# 6d. Calls on Redis (many servers, one queue)
# ==========================================================================================

LUA_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local function done(id, status)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'id', id, 'status', status)
    redis.call('EXPIRE', KEYS[3], ARGV[3])
end
"""


class RedisCalls:
    """Calls on Redis, shared by every server of the cluster (research/async.md §4.3):
    `calls:sync` and `calls:async` are Streams read by the consumer group `nodes` (spilled
    sync calls first), `call:<id>` is the record (hash), `call:<id>:events` the printed lines
    (stream, only when the call prints), `calls:done` wakes waiters on every server,
    `node:<id>` is a server's lease. Every transition is a Lua script that checks the state
    it expects; times come from Redis' clock; every key of a call carries a TTL."""
    kind = "redis"
    GROUP = "nodes"
    # Every script gets KEYS[1] record, KEYS[2] queue stream, KEYS[3] done stream and
    # ARGV[1] call id, ARGV[2] group, ARGV[3] ttl.
    ENQUEUE = LUA_NOW + """
        if ARGV[5] == '1' then
            local previous = redis.call('GET', KEYS[5])
            if previous then return {'replay', previous} end
        end
        local depth = 0
        if redis.call('EXISTS', KEYS[2]) == 1 then
            depth = redis.call('XLEN', KEYS[2])
            local ok, pending = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[2])
            if ok then depth = depth - pending[1] end
        end
        if depth >= tonumber(ARGV[4]) then return {'full', tostring(depth)} end
        local fields = {}
        for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
        redis.call('HSET', KEYS[1], unpack(fields))
        local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
        redis.call('HSET', KEYS[1], 'created', fmt(now), 'deadline', fmt(now + tonumber(ARGV[6])),
                   'entry', entry, 'stream', KEYS[2])
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        redis.call('ZADD', KEYS[4], now, ARGV[1])
        redis.call('EXPIRE', KEYS[4], ARGV[3])
        if ARGV[5] == '1' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[3]) end
        return {'ok', fmt(now)}
    """
    CLAIM = LUA_NOW + """
        local function drop() redis.call('XACK', KEYS[2], ARGV[2], ARGV[4]); redis.call('XDEL', KEYS[2], ARGV[4]) end
        if redis.call('HGET', KEYS[1], 'status') ~= 'queued' or redis.call('HGET', KEYS[1], 'entry') ~= ARGV[4] then
            drop()
            return {'skip'}
        end
        if now > tonumber(redis.call('HGET', KEYS[1], 'deadline')) then
            drop()
            redis.call('HSET', KEYS[1], 'status', 'expired', 'finished', fmt(now), 'answer', ARGV[7])
            redis.call('EXPIRE', KEYS[1], ARGV[3])
            done(ARGV[1], 'expired')
            return {'expired'}
        end
        redis.call('HINCRBY', KEYS[1], 'attempt', 1)
        redis.call('HSET', KEYS[1], 'status', 'running', 'node', ARGV[5], 'owner', ARGV[6], 'started', fmt(now))
        redis.call('HDEL', KEYS[1], 'cancel')
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        if redis.call('HGET', KEYS[1], 'kind') == 'sync' then done(ARGV[1], 'running') end
        return {'run', redis.call('HGETALL', KEYS[1])}
    """
    FINISH = LUA_NOW + """
        if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4]
                or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[5] then
            return 0
        end
        local entry = redis.call('HGET', KEYS[1], 'entry')
        redis.call('HSET', KEYS[1], 'status', ARGV[6], 'answer', ARGV[7], 'finished', fmt(now))
        redis.call('HDEL', KEYS[1], 'cancel')
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        redis.call('XACK', KEYS[2], ARGV[2], entry)
        redis.call('XDEL', KEYS[2], entry)
        if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ARGV[3]) end
        done(ARGV[1], ARGV[6])
        return 1
    """
    CANCEL = LUA_NOW + """
        local status = redis.call('HGET', KEYS[1], 'status')
        if not status then return 'none' end
        if status == 'queued' then
            redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', fmt(now), 'answer', ARGV[4])
            redis.call('EXPIRE', KEYS[1], ARGV[3])
            done(ARGV[1], 'cancelled')
            return 'cancelled'
        end
        if status == 'running' then
            redis.call('HSET', KEYS[1], 'cancel', '1')
            done(ARGV[1], 'cancelling')
            return 'cancelling'
        end
        return 'final'
    """
    # A queue entry that stayed unacknowledged for a lease, now held by the caller: the call
    # was delivered to a node that did not start it (re-queued as it was), or its node
    # stopped while running it (re-run while attempts are left, else `lost`). A node whose
    # lease (same incarnation) is still there keeps its call. ARGV[5]: 'release' when a
    # node hands back an entry it read but cannot start.
    RECOVER = LUA_NOW + """
        local function drop() redis.call('XACK', KEYS[2], ARGV[2], ARGV[4]); redis.call('XDEL', KEYS[2], ARGV[4]) end
        local status = redis.call('HGET', KEYS[1], 'status')
        if not status or redis.call('HGET', KEYS[1], 'entry') ~= ARGV[4] then drop(); return {'gone'} end
        if status ~= 'queued' and status ~= 'running' then drop(); return {'final'} end
        local outcome = 'requeued'
        if status == 'running' then
            local owner = redis.call('HGET', KEYS[1], 'owner')
            local node, incarnation = string.match(owner, '^(.*)/([^/]*)$')
            local lease = redis.call('GET', ARGV[6] .. 'node:' .. node)
            if lease and cjson.decode(lease)['incarnation'] == incarnation then return {'alive'} end
            if tonumber(redis.call('HGET', KEYS[1], 'attempt')) >= tonumber(redis.call('HGET', KEYS[1], 'max_attempts')) then
                drop()
                redis.call('HSET', KEYS[1], 'status', 'lost', 'finished', fmt(now), 'answer', cjson.encode(
                    {http = 502, status = 'lost', error = 'its server (' .. node .. ') stopped while running the call'}))
                redis.call('EXPIRE', KEYS[1], ARGV[3])
                done(ARGV[1], 'lost')
                return {'lost', node}
            end
            outcome = 'retry'
            redis.call('HSET', KEYS[1], 'status', 'queued', 'deadline',
                       fmt(now + tonumber(redis.call('HGET', KEYS[1], 'max_age'))))
        elseif ARGV[5] ~= 'release' and redis.call('HINCRBY', KEYS[1], 'deliveries', 1) > 5 then
            drop()
            redis.call('HSET', KEYS[1], 'status', 'lost', 'finished', fmt(now), 'answer', cjson.encode(
                {http = 502, status = 'lost', error = 'delivered to 5 servers that all stopped before starting it'}))
            redis.call('EXPIRE', KEYS[1], ARGV[3])
            done(ARGV[1], 'lost')
            return {'lost', ''}
        end
        drop()
        redis.call('HSET', KEYS[1], 'entry', redis.call('XADD', KEYS[2], '*', 'id', ARGV[1]))
        return {outcome}
    """
    # A queue entry nobody has read yet (ARGV[4]): its call expired while waiting, or was
    # cancelled. Expired calls end `expired` even when no server reads the queue.
    SWEEP = LUA_NOW + """
        if #redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[4], ARGV[4], 1) > 0 then return 0 end
        local status = redis.call('HGET', KEYS[1], 'status')
        if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[4] or (status ~= 'queued' and status ~= 'running') then
            redis.call('XDEL', KEYS[2], ARGV[4])
            return 0
        end
        if status ~= 'queued' or now <= tonumber(redis.call('HGET', KEYS[1], 'deadline')) then return 0 end
        redis.call('XDEL', KEYS[2], ARGV[4])
        redis.call('HSET', KEYS[1], 'status', 'expired', 'finished', fmt(now), 'answer', ARGV[5])
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        done(ARGV[1], 'expired')
        return 1
    """
    INT_FIELDS = ("version", "attempt", "max_attempts", "deliveries")
    FLOAT_FIELDS = ("created", "started", "finished", "deadline", "max_age")
    JSON_FIELDS = ("request", "answer", "callback")
    BLOCK_MS = 1000   # below the socket timeout, or a blocked read stalls (research §3.5)

    def __init__(self, store: RedisStore, config: Config, calls: Calls) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self.calls = calls
        self.config = config.calls
        self.prefix = config.redis_prefix
        timeout = config.redis_timeout
        # Request paths: one quick retry, so an outage is a 503 at once, not after 4 s.
        self.redis = redis.Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=timeout,
                                          socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1),
                                          health_check_interval=30)
        self.blocking = redis.Redis.from_url(config.redis_url, decode_responses=True,
                                             socket_timeout=max(timeout, self.BLOCK_MS / 1000 + 2),
                                             socket_connect_timeout=timeout, health_check_interval=30)
        self.streams = {"sync": self.key("calls:sync"), "async": self.key("calls:async")}
        self.done_key = self.key("calls:done")
        self.scripts = {name: self.redis.register_script(getattr(self, name))
                        for name in ("ENQUEUE", "CLAIM", "FINISH", "CANCEL", "RECOVER", "SWEEP")}
        self.node_key = self.key(f"node:{self.config.node_id}")
        self.stop = threading.Event()
        self.create_groups()
        self.join()

    def key(self, name: str) -> str:
        return self.prefix + name

    def record_key(self, call_id: str) -> str:
        return self.key(f"call:{call_id}")

    def events_key(self, call_id: str) -> str:
        return self.key(f"call:{call_id}:events")

    def create_groups(self) -> None:
        import redis
        for stream in self.streams.values():
            try:
                self.redis.xgroup_create(stream, self.GROUP, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    # -- records ------------------------------------------------------------------------------
    def encode(self, record: dict[str, Any]) -> list[str]:
        fields: list[str] = []
        for name, value in record.items():
            if value is None or name in ("created", "deadline", "entry", "stream"):
                continue
            fields += [name, json.dumps(value) if name in self.JSON_FIELDS else str(value)]
        return fields

    def decode(self, fields: dict[str, str]) -> dict[str, Any]:
        record: dict[str, Any] = dict(fields)
        for name in self.INT_FIELDS:
            if name in record:
                record[name] = int(record[name])
        for name in self.FLOAT_FIELDS:
            if name in record:
                record[name] = float(record[name])
        for name in self.JSON_FIELDS:
            if record.get(name):
                record[name] = json.loads(record[name])
        return record

    def run_script(self, name: str, call_id: str, stream: str, extra_keys: list[str], args: list[Any]) -> Any:
        return self.scripts[name](keys=[self.record_key(call_id), stream, self.done_key, *extra_keys],
                                  args=[call_id, self.GROUP, int(self.config.ttl), *args])

    def submit(self, record: dict[str, Any], max_queue: int) -> tuple[dict[str, Any], bool]:
        stream = self.streams[record["kind"]]
        idem = self.key(f"idem:{record['idem']}") if record.get("idem") else self.key("idem:-")
        reply = self.run_script("ENQUEUE", record["id"], stream, [self.key("calls:index"), idem],
                                [max_queue, int(bool(record.get("idem"))), record["max_age"], *self.encode(record)])
        if reply[0] == "replay":
            found = self.get(reply[1])
            if found is None:
                raise ApiError(409, "this Idempotency-Key belongs to a call that is no longer kept; use a new key")
            return found, True
        if reply[0] == "full":
            raise ApiError(429, f"{reply[1]} calls are queued (FAAS_ASYNC_MAX_QUEUE); retry later",
                           headers={"Retry-After": "5"})
        created = float(reply[1])
        return {**record, "created": created, "deadline": created + record["max_age"], "stream": stream}, False

    def get(self, call_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(self.record_key(call_id))
        return self.decode(fields) if fields else None

    def finish(self, running: RunningCall, status: str, answer: dict[str, Any]) -> bool:
        self.flush(running)
        record = running.record
        return bool(self.run_script("FINISH", running.id, record["stream"], [self.events_key(running.id)],
                                    [record["owner"], running.attempt, status, json.dumps(answer)]))

    def cancel(self, call_id: str) -> tuple[str, dict[str, Any] | None]:
        answer = json.dumps(final_answer("cancelled", "the call was cancelled before it started"))
        outcome = self.run_script("CANCEL", call_id, self.streams["async"], [], [answer])
        return outcome, self.get(call_id)

    def list(self, path: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        index = self.key("calls:index")
        offset = 0
        while len(found) < limit:
            ids = self.redis.zrevrange(index, offset, offset + 199)
            if not ids:
                break
            offset += len(ids)
            with self.redis.pipeline(transaction=False) as pipe:
                for call_id in ids:
                    pipe.hgetall(self.record_key(call_id))
                records = [self.decode(fields) for fields in pipe.execute() if fields]
            found += [r for r in records if (not path or r.get("path") == path)
                      and (not status or r.get("status") == status)]
        return found[:limit]

    def set_callback(self, call_id: str, state: dict[str, Any]) -> None:
        key = self.record_key(call_id)
        if self.redis.exists(key):   # never re-creates a record that expired
            self.redis.hset(key, "callback", json.dumps(state))

    # -- events -------------------------------------------------------------------------------
    def stored_events(self, call_id: str, cursor: str | None, wait: float) -> list[tuple[str, dict[str, Any]]]:
        key = self.events_key(call_id)
        if wait > 0:
            reply = self.blocking.xread({key: cursor or "0-0"}, count=500, block=int(wait * 1000))
            entries = reply[0][1] if reply else []
        else:
            entries = self.redis.xrange(key, f"({cursor}" if cursor else "-", "+", count=CALL_EVENTS_MAX)
        return [(entry_id, json.loads(fields["e"])) for entry_id, fields in entries]

    def flush(self, running: RunningCall) -> None:
        """Printed lines of a running call to its event stream, in one round trip. The ids
        carry the attempt, so a late writer of an earlier attempt is refused by Redis."""
        with running.flush_lock:
            events = running.take_unflushed()
            if not events:
                return
            key = self.events_key(running.id)
            with self.redis.pipeline(transaction=False) as pipe:
                for event_id, event in events:
                    pipe.xadd(key, {"e": json_bytes(event)}, id=event_id)
                pipe.expire(key, int(self.config.ttl))
                for result in pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception):
                        LOG.debug("call %s: event refused: %s", running.id, result)

    # -- the node -----------------------------------------------------------------------------
    def lease_value(self) -> str:
        return json.dumps({**self.calls.node_state(), "incarnation": self.calls.owner.split("/")[1],
                           "version": 1, "last_seen": time.time()})

    def join(self) -> None:
        """Take this node's lease. A lease left by a crashed predecessor of the same
        FAAS_NODE_ID expires within one lease; a live one means a duplicate id."""
        lease_ms = int(self.config.lease * 1000)
        deadline = time.monotonic() + self.config.lease + 1
        while not self.redis.set(self.node_key, self.lease_value(), nx=True, px=lease_ms):
            if time.monotonic() > deadline:
                raise ConfigError(f"another server holds the lease of node {self.config.node_id!r} "
                                  "(FAAS_NODE_ID must be unique per server)")
            time.sleep(0.2)
        self.redis.sadd(self.key("nodes"), self.config.node_id)

    def start(self) -> None:
        self.recover_own()
        for target, name in ((self.consume, "calls-consumer"), (self.read_done, "calls-done"),
                             (self.heartbeat, "calls-heartbeat"), (self.reap, "calls-reaper"),
                             (self.flush_loop, "calls-events")):
            self.calls.spawn(target, name)

    def recover_own(self) -> None:
        """Entries a previous process of this node left pending: recovered at once."""
        for stream in self.streams.values():
            pending = self.redis.xpending_range(stream, self.GROUP, "-", "+", 1000, consumername=self.config.node_id)
            for entry in pending:
                self.recover(stream, entry["message_id"], "reap")

    def recover(self, stream: str, entry_id: str, mode: str) -> None:
        fields = self.redis.xrange(stream, entry_id, entry_id)
        if not fields:
            self.redis.xack(stream, self.GROUP, entry_id)
            return
        call_id = fields[0][1].get("id", "")
        outcome = self.run_script("RECOVER", call_id, stream, [], [entry_id, mode, self.prefix])
        if outcome[0] in ("requeued", "retry"):
            self.calls.metrics.inc("faas_calls_redelivered_total")
            if mode != "release":
                LOG.warning("call %s %s (its server stopped)", call_id,
                            "re-queued before it started" if outcome[0] == "requeued" else "re-queued to run again")
        elif outcome[0] == "lost":
            self.calls.metrics.inc("faas_calls_lost_total")
            self.calls.ended(call_id)
            LOG.warning("call %s lost: its server %s stopped while running it", call_id, outcome[1])

    def consume(self) -> None:
        """Read a queued call whenever a run slot is free (spilled sync calls first)."""
        import redis
        slots = self.calls.invoker.slots
        failing = False
        while not self.calls.stopping.is_set():
            if not slots.wait_free(1.0):
                continue
            try:
                reply = self.blocking.xreadgroup(self.GROUP, self.config.node_id,
                                                 {self.streams["sync"]: ">", self.streams["async"]: ">"},
                                                 count=1, block=self.BLOCK_MS)
                for stream, entries in reply or []:
                    for entry_id, fields in entries:
                        self.take(stream, entry_id, fields.get("id", ""))
                failing = False
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                LOG.warning("the call queue is gone (Redis restarted without persistence?); recreating it")
                self.create_groups()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if not failing:
                    LOG.error("call queue unreachable: %s", error)
                failing = True
                self.calls.stopping.wait(1)

    def take(self, stream: str, entry_id: str, call_id: str) -> None:
        slots = self.calls.invoker.slots
        if self.calls.stopping.is_set() or not slots.try_acquire(0.05):
            self.recover(stream, entry_id, "release")   # another server may start it now
            return
        try:
            reply = self.run_script("CLAIM", call_id, stream, [], [
                entry_id, self.config.node_id, self.calls.owner,
                json.dumps(final_answer("expired", "the call was not started within its maximum queued age"))])
        except BaseException:
            slots.release()
            raise
        if reply[0] != "run":
            slots.release()
            if reply[0] == "expired":
                self.calls.ended(call_id)
            return
        raw = reply[1]
        self.calls.start_run(self.decode(dict(zip(raw[::2], raw[1::2]))))

    def read_done(self) -> None:
        """Completions from every server wake this server's waiters; a cancel reaches the
        server running the call."""
        import redis
        last = "$"
        while not self.stop.is_set():
            try:
                reply = self.blocking.xread({self.done_key: last}, count=200, block=self.BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError):
                self.stop.wait(0.5)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    call_id = fields.get("id", "")
                    if fields.get("status") == "cancelling" and call_id in self.calls.running:
                        self.calls.cancel_local(call_id)
                    self.calls.waiters.notify(call_id)

    def heartbeat(self) -> None:
        """Every lease/3: renew the lease, touch the queue entries of running calls (so no
        reaper takes them: liveness, not run time, decides), pick up missed cancels."""
        import redis
        while not self.stop.wait(self.config.lease / 3):
            try:
                self.beat()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                LOG.warning("heartbeat failed: %s", error)

    def beat(self) -> None:
        running = list(self.calls.running.values())
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.node_key, self.lease_value(), px=int(self.config.lease * 1000))
            pipe.sadd(self.key("nodes"), self.config.node_id)
            pipe.expire(self.key("nodes"), int(self.config.lease * 4) + 1)
            for call in running:
                pipe.xclaim(call.record["stream"], self.GROUP, self.config.node_id, 0,
                            [call.record["entry"]], justid=True)
                pipe.hget(self.record_key(call.id), "cancel")
            results = pipe.execute()
        for call, cancel in zip(running, results[4::2]):   # after set, sadd, expire: (xclaim, hget) pairs
            if cancel == "1" and not call.cancelled:
                self.calls.cancel_local(call.id)

    def reap(self) -> None:
        """Every lease/2: entries nobody touched for a lease belong to a stopped server."""
        import redis
        while not self.stop.wait(self.config.lease / 2):
            try:
                for stream in self.streams.values():
                    entries = self.redis.xautoclaim(stream, self.GROUP, self.config.node_id,
                                                    int(self.config.lease * 1000), "0-0", count=100, justid=True)
                    for entry_id in entries:
                        self.recover(stream, entry_id, "reap")
                    self.sweep(stream)
                self.redis.zremrangebyscore(self.key("calls:index"), "-inf", time.time() - self.config.ttl)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                LOG.warning("reaper: %s", error)
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                self.create_groups()

    def sweep(self, stream: str) -> None:
        """Unread entries: expire the calls that waited too long, drop cancelled ones."""
        groups = {g["name"]: g for g in self.redis.xinfo_groups(stream)}
        if self.GROUP not in groups:
            return
        answer = json.dumps(final_answer("expired", "the call was not started within its maximum queued age"))
        for entry_id, fields in self.redis.xrange(stream, f"({groups[self.GROUP]['last-delivered-id']}", "+",
                                                  count=100):
            if self.run_script("SWEEP", fields.get("id", ""), stream, [], [entry_id, answer]):
                self.calls.metrics.inc("faas_calls_final_total", status="expired")
                self.calls.ended(fields["id"])

    def flush_loop(self) -> None:
        while not self.stop.wait(0.05):
            for running in list(self.calls.running.values()):
                try:
                    self.flush(running)
                except Exception as error:
                    LOG.warning("call %s: printed lines not stored yet: %s", running.id, error)

    def leave(self) -> None:
        """At close (after drain): nothing to hand back (calls are claimed as they are read); drop the lease."""
        self.stop.set()
        try:
            lease = self.redis.get(self.node_key)
            if lease and json.loads(lease).get("incarnation") == self.calls.owner.split("/")[1]:
                self.redis.delete(self.node_key)
            self.redis.srem(self.key("nodes"), self.config.node_id)
            for stream in self.streams.values():
                if not self.redis.xpending_range(stream, self.GROUP, "-", "+", 1, consumername=self.config.node_id):
                    self.redis.xgroup_delconsumer(stream, self.GROUP, self.config.node_id)
        except Exception as error:
            LOG.warning("leaving the cluster: %s", error)

    # -- state --------------------------------------------------------------------------------
    def queue_state(self) -> dict[str, Any]:
        now = self.redis.time()
        now_ms = now[0] * 1000 + now[1] // 1000
        depth, oldest = 0, 0.0
        for stream in self.streams.values():
            groups = {g["name"]: g for g in self.redis.xinfo_groups(stream)}
            group = groups.get(self.GROUP)
            if group is None:
                continue
            depth += self.redis.xlen(stream) - group["pending"]
            head = self.redis.xrange(stream, f"({group['last-delivered-id']}", "+", count=1)
            if head:
                oldest = max(oldest, (now_ms - int(head[0][0].split("-")[0])) / 1000)
        return {"depth": max(depth, 0), "oldest_queued_s": round(oldest, 3)}

    def nodes(self) -> list[dict[str, Any]]:
        ids = sorted(self.redis.smembers(self.key("nodes")))
        leases = self.redis.mget([self.key(f"node:{node}") for node in ids]) if ids else []
        found = []
        for node, lease in zip(ids, leases):
            if lease is None:
                self.redis.srem(self.key("nodes"), node)
                continue
            state = json.loads(lease)
            state["last_seen_ms"] = int((time.time() - state.pop("last_seen", time.time())) * 1000)
            found.append(state)
        return found

    def health(self) -> dict[str, Any]:
        persistence = self.redis.info("persistence")
        memory = self.redis.info("memory")
        policy = memory.get("maxmemory_policy", "")
        warnings = []
        if not persistence.get("aof_enabled"):
            warnings.append("Redis runs without appendonly: a restart loses queued and running calls "
                            "(set appendonly yes)")
        if str(policy).startswith("allkeys-"):
            warnings.append(f"Redis maxmemory-policy is {policy}: it may evict queued calls and functions "
                            "(use noeviction or volatile-lru)")
        return {"queue_durable": bool(persistence.get("aof_enabled")), "redis_aof": bool(persistence.get("aof_enabled")),
                "redis_maxmemory_policy": policy, "nodes_alive": len(self.nodes()), "warnings": warnings}


# ==========================================================================================
# 6e. Callbacks and the HTTP side of calls
# ==========================================================================================

class PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to now."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, address: str, timeout: float) -> None:
        import ssl
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class Callbacks:
    """POSTs a finished call's record to the URL given at submit: off unless the operator
    listed URL prefixes (FAAS_CALLBACK_ALLOW). The address is resolved and checked on every
    attempt (loopback, private and shared ranges only when a listed prefix names that very
    address; link-local never), redirects are not followed, every delivery is signed as
    Standard Webhooks specify, and tried 3 times with backoff."""
    ATTEMPTS = 3
    TIMEOUT = 5.0

    def __init__(self, config: CallConfig, calls: Calls) -> None:
        self.config = config
        self.calls = calls
        self.backoff = float(os.environ.get("FAAS_CALLBACK_BACKOFF", "1") or 1)
        self.slots = threading.BoundedSemaphore(16)
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def check(self, url: Any) -> str:
        """The callback URL of a submit, or a 400 saying why not."""
        if not self.config.callback_allow:
            raise ApiError(400, "callbacks are off on this server (the operator has not set FAAS_CALLBACK_ALLOW)")
        if not isinstance(url, str) or len(url) > 2000:
            raise ApiError(400, "callback_url must be a URL string of at most 2000 characters")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ApiError(400, "callback_url must be an http(s) URL without user information")
        if not self.allowed_prefixes(url):
            raise ApiError(400, "callback_url is not under a prefix the operator allowed (FAAS_CALLBACK_ALLOW)")
        return url

    def allowed_prefixes(self, url: str) -> list[str]:
        return [prefix for prefix in self.config.callback_allow
                if url.startswith(prefix) and (len(url) == len(prefix) or prefix.endswith("/")
                                               or url[len(prefix)] in "/?#")]

    def address_allowed(self, url: str, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return False
        if ip.is_global:
            return True
        listed = {urllib.parse.urlsplit(prefix).hostname for prefix in self.allowed_prefixes(url)}
        return address in listed   # a private or loopback target only when named by address

    def schedule(self, call_id: str) -> None:
        threading.Thread(target=self.deliver, args=(call_id,), name=f"callback-{call_id[:8]}", daemon=True).start()

    def deliver(self, call_id: str) -> None:
        with self.slots:
            state: dict[str, Any] = {"status": "pending", "attempts": 0}
            for attempt in range(1, self.ATTEMPTS + 1):
                record = self.calls.backend.get(call_id)
                if record is None or not record.get("callback_url"):
                    return
                state["attempts"] = attempt
                try:
                    code = self.post(record)
                    state.update(status="delivered" if 200 <= code < 300 else "failed", response_status=code)
                    state.pop("error", None)
                    if 300 <= code < 400:
                        state["error"] = "the receiver answered with a redirect, which is not followed"
                except (OSError, ValueError, http.client.HTTPException) as error:
                    state.update(status="failed", error=str(error)[:300])
                state["status"] = state["status"] if state["status"] == "delivered" else \
                    ("failed" if attempt == self.ATTEMPTS else "retrying")
                self.calls.metrics.inc("faas_callbacks_total", result=state["status"])
                try:
                    self.calls.backend.set_callback(call_id, state)
                except Exception as error:
                    LOG.warning("call %s: callback state not stored: %s", call_id, error)
                if state["status"] == "delivered" or self.stopping.wait(self.backoff * 5 ** (attempt - 1)):
                    return
            LOG.warning("call %s: callback to %s failed after %d attempts: %s", call_id,
                        record.get("callback_url"), self.ATTEMPTS, state.get("error") or state.get("response_status"))

    def post(self, record: dict[str, Any]) -> int:
        url = record["callback_url"]
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = [info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)]
        usable = [address for address in addresses if self.address_allowed(url, address)]
        if not usable:
            raise ValueError(f"{parts.hostname} resolves to {', '.join(addresses) or 'nothing'}: "
                             "not an address callbacks may reach")
        connection_type = PinnedHTTPSConnection if parts.scheme == "https" else PinnedHTTPConnection
        connection = connection_type(parts.hostname, parts.port, usable[0], self.TIMEOUT)
        body = json_bytes(call_view(record))
        timestamp = str(int(time.time()))
        signature = base64.b64encode(hmac.new(self.config.callback_secret or b"",
                                              f"{record['id']}.{timestamp}.".encode() + body,
                                              hashlib.sha256).digest()).decode()
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            connection.request("POST", target, body=body, headers={
                "Content-Type": "application/json", "User-Agent": "faas", "X-Faas-Call-Id": record["id"],
                "webhook-id": record["id"], "webhook-timestamp": timestamp, "webhook-signature": f"v1,{signature}"})
            response = connection.getresponse()
            response.read(65536)
            return response.status
        finally:
            connection.close()


def parse_prefer(header: str) -> dict[str, str]:
    """RFC 7240 preferences: `respond-async, wait=10` -> {"respond-async": "", "wait": "10"}."""
    found: dict[str, str] = {}
    for part in header.split(","):
        name, _, value = part.split(";")[0].strip().partition("=")
        if name:
            found[name.strip().lower()] = value.strip().strip('"')
    return found


class CallRoutes:
    """The HTTP side of calls, mixed into Handler: submit, read, wait, follow, cancel, list."""
    app: "App"
    headers: Any
    path: str
    query: dict[str, list[str]]

    def async_request(self) -> tuple[bool, float | None]:
        """(asynchronous?, seconds to wait for the result) from ?async=1 or Prefer."""
        key = self.headers.get("Idempotency-Key")
        if key is not None and (not 0 < len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable()):
            raise ApiError(400, f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters")
        prefer = parse_prefer(self.headers.get("Prefer", ""))
        flag = (self.query.get("async") or [""])[-1].lower()
        if flag not in ("", "0", "1", "true", "false"):
            raise ApiError(400, "async must be 1 or 0")
        wanted = "respond-async" in prefer or flag in ("1", "true")
        wait = None
        if wanted and "wait" in prefer:
            try:
                wait = min(max(float(prefer["wait"]), 0.0), self.app.calls.config.max_wait)
            except ValueError:
                raise ApiError(400, "Prefer: wait= must be a number of seconds") from None
            if not math.isfinite(wait):
                raise ApiError(400, "Prefer: wait= must be a number of seconds")
        return wanted, wait

    def submit_call(self, version: Version, body: dict[str, Any], event: Any, limits: Limits,
                    wait: float | None) -> None:
        calls = self.app.calls
        if body.get("stream") is True or "text/event-stream" in self.headers.get("Accept", ""):
            raise ApiError(400, "an asynchronous call does not stream; follow it with GET /calls/<id>/events")
        callback = body.get("callback_url") or self.headers.get("X-Callback-Url")
        callback_url = calls.callbacks.check(callback) if callback else None
        idempotency = None
        key = self.headers.get("Idempotency-Key")   # checked by async_request
        if key is not None:
            scope = hashlib.sha256(f"{version.path}\0{key}".encode()).hexdigest()
            digest = hashlib.sha256(json_bytes([body, self.query.get("version")])).hexdigest()
            idempotency = (scope, digest)
        record, replayed = calls.submit("async", version, event, limits,
                                        retries_for(version, calls.config.retries), idempotency, callback_url)
        headers = {"Location": f"/calls/{record['id']}", "Preference-Applied": "respond-async"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if wait:
            record = calls.wait(record["id"], is_final, wait) or record
            headers["Preference-Applied"] = f"respond-async, wait={wait:g}"
        if is_final(record) and wait:
            self.send_json(record["answer"].get("http", 200), call_view(record), headers)
        else:
            self.send_json(202, call_view(record), headers)

    def call_id_wait(self) -> float:
        raw = (self.query.get("wait") or ["0"])[-1] or "0"
        try:
            wait = float(raw)
        except ValueError:
            raise ApiError(400, f"wait must be a number of seconds, not {raw!r}") from None
        if not math.isfinite(wait) or wait < 0:
            raise ApiError(400, "wait must be a number of seconds, 0 or more")
        return min(wait, self.app.calls.config.max_wait)

    def get_call(self, call_id: str) -> None:
        calls = self.app.calls
        wait = self.call_id_wait()
        record = calls.get(call_id)
        if wait and not is_final(record):
            record = calls.wait(call_id, is_final, wait) or record
        self.send_json(200, call_view(record))

    def delete_call(self, call_id: str) -> None:
        record = self.app.calls.cancel(call_id)
        self.send_json(200, call_view(record))

    def get_calls(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query, keep_blank_values=True)
        path = query["path"][-1] if "path" in query else None
        status = query["status"][-1] if "status" in query else None
        if path is not None:
            check_path(path)
        if status is not None and status not in CALL_STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(CALL_STATUSES)}")
        raw = (query.get("limit") or ["50"])[-1]
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise ApiError(400, "limit must be an integer from 1 to 1000")
        records = self.app.calls.backend.list(path, status, int(raw))
        self.send_json(200, {"calls": [call_view(record) for record in records]})

    def get_call_events(self, call_id: str) -> None:
        last = self.headers.get("Last-Event-ID")
        if last is not None and not re.fullmatch(r"\d{1,9}-\d{1,9}", last):
            raise ApiError(400, "Last-Event-ID must be an event id this server sent (<attempt>-<n>)")
        events = self.app.calls.follow(call_id, last)
        first = next(events)   # 404 before the stream starts
        self.start_sse()
        self.send_call_event(*first)
        for event_id, event in events:
            self.send_call_event(event_id, event)

    def send_call_event(self, event_id: str | None, event: dict[str, Any]) -> None:
        head = f"id: {event_id}\n".encode() if event_id else b""
        self.wfile.write(head + b"data: " + json_bytes(event) + b"\n\n")
        self.wfile.flush()

    def get_nodes(self) -> None:
        calls = self.app.calls
        self.send_json(200, {"nodes": calls.nodes(), "queue": calls.backend.queue_state()})

    def run_spilled(self, version: Version, event: Any, limits: Limits, stream: bool) -> None:
        """A sync call this full server handed to the shared queue: the caller gets the same
        answer (JSON or SSE) as from a local run, from whichever server ran it."""
        calls = self.app.calls
        record = calls.spill(version, event, limits)
        headers = {"X-Call-Id": record["id"]}
        if not stream:
            record = calls.wait(record["id"], is_final, limits.timeout + 30) or record
            if not is_final(record):
                raise ApiError(504, "the server running this call did not answer in time", id=record["id"])
            answer = dict(record["answer"])
            code = answer.pop("http", 500)
            self.send_json(code, {**answer, "node": record.get("node")}, {**headers, "X-Faas-Node": record.get("node") or ""})
            return
        self.start_sse()
        for _, event_data in calls.follow(record["id"], None, status_events=False):
            self.send_event(event_data)


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
        "faas_uploads_total": ("counter", "Stored uploads by language."),
        "faas_store_errors_total": ("counter", "Requests that failed because the store did."),
        "faas_http_requests_total": ("counter", "HTTP requests by route and status code."),
        "faas_async_submitted_total": ("counter", "Calls queued, by kind (async, or sync spilled from a full server)."),
        "faas_calls_final_total": ("counter", "Queued calls ended on this server, by final status."),
        "faas_calls_redelivered_total": ("counter", "Queued calls handed to another run after their server stopped."),
        "faas_calls_lost_total": ("counter", "Calls that ended lost: their server stopped and no re-run was left."),
        "faas_calls_refused_total": ("counter", "Late results refused: the call had been taken over or ended."),
        "faas_call_queue_wait_seconds": ("histogram", "Time from submit to start of queued calls."),
        "faas_spilled_total": ("counter", "Sync calls a full server queued for any server, by outcome."),
        "faas_callbacks_total": ("counter", "Callback delivery attempts by result."),
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


class Handler(CallRoutes, http.server.BaseHTTPRequestHandler):
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
        ("GET", re.compile(r"/calls"), "get_calls", "admin"),
        ("GET", re.compile(r"/calls/(?P<call_id>[^/]+)"), "get_call", "invoke"),
        ("DELETE", re.compile(r"/calls/(?P<call_id>[^/]+)"), "delete_call", "invoke"),
        ("GET", re.compile(r"/calls/(?P<call_id>[^/]+)/events"), "get_call_events", "invoke"),
        ("GET", re.compile(r"/nodes"), "get_nodes", "admin"),
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
        is_async, wait = self.async_request()
        if is_async:
            return self.submit_call(version, body, event, limits, wait)
        if self.app.calls.should_spill():
            return self.run_spilled(version, event, limits, stream)
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
                self.send_json(status, {**answer, **extra}, {"X-Faas-Node": self.app.calls.node})
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


def sweep_runtime_dirs(base: Path) -> None:
    """Remove the runtime directories (`faas-runtime-<pid>-*`) of servers that died without
    cleaning up (kill -9), as their cgroups are swept."""
    for stale in base.glob("faas-runtime-*-*"):
        pid = stale.name.removeprefix("faas-runtime-").split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and stale.is_dir() \
                and stale.stat().st_uid == os.geteuid():
            shutil.rmtree(stale, ignore_errors=True)


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
        sweep_runtime_dirs(Path(runtime_base or tempfile.gettempdir()))
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"faas-runtime-{os.getpid()}-", dir=runtime_base))
        self.limit_backend = choose_limit_backend(config)
        self.sandbox = Sandbox(config, self.limit_backend, self.runtime_dir)
        pool_sizes = {runtime.argv: config.pool_sizes[pool_name(runtime.argv)] for runtime in RUNTIMES.values()
                      if os.access(runtime.interpreter, os.X_OK)}
        self.pool = Pool(self.sandbox, pool_sizes, Limits.from_config(config), config.pool_idle)
        self.invoker = Invoker(config, self.store, self.sandbox, self.pool, self.metrics)
        self.calls = Calls(config, self.store, self.invoker, self.metrics)
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
            "uptime_s": round(time.time() - self.started, 1),
            "calls": self.calls.describe(),
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
            **self.calls_gauges(),
        })

    def calls_gauges(self) -> dict[str, tuple[str, float]]:
        try:
            queue_state = self.calls.backend.queue_state()
        except Exception as error:   # the store is down: the other metrics still count
            LOG.warning("queue state unavailable: %s", error)
            return {}
        return {"faas_async_queue_depth": ("Calls queued and not started (all servers).", queue_state["depth"]),
                "faas_async_oldest_queued_seconds": ("Age of the oldest call not started.",
                                                     queue_state["oldest_queued_s"]),
                "faas_calls_running": ("Queued calls running on this server.", len(self.calls.running))}

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
        self.calls.start()
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
        self.calls.stop_taking()
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
        self.calls.drain(deadline)

    def watchdog(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            notify_systemd("WATCHDOG=1")

    def close(self) -> None:
        self.calls.close()
        self.pool.close()
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
