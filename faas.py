#!/usr/bin/env python3
"""faas — a Function-as-a-Service server for one Linux box.

Users POST Python, JavaScript or TypeScript function bodies; each upload becomes a new,
immutable version of an HTTP endpoint. Every call runs in a fresh Bubblewrap sandbox and
answers as JSON or as a live Server-Sent-Events stream. Compatible with go-faas's HTTP API
and environment variables.

The module reads top to bottom in the order a request flows through it:
Config -> Store -> Runtimes -> Layers -> Limits -> Sandbox -> Invocation -> Calls -> HTTP -> CLI.
Standard library only; redis-py is imported only when a Redis store is configured.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import errno
import fcntl
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
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, TypeVar

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
NOBODY = 65534   # the shared 'nobody' uid: never a sandbox's (research/network.md §7)
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
    lowered = text.lower()
    if lowered in ("on", "1", "true", "yes"):
        return True
    if lowered in ("off", "0", "false", "no"):
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
    sandbox_user: str
    sandbox_uid: int | None      # None: the uid of sandbox_user, resolved at start-up
    sandbox_gid: int | None
    limits: str
    esbuild: Path | None
    deps: "DepsConfig"
    calls: "CallConfig"
    console: bool = True
    secret_key: str | None = None     # FAAS_SECRET_KEY; else <data dir>/secret.key
    network: str = "off"              # FAAS_NETWORK: off, or allow functions that ask for the internet
    network_deny: tuple[str, ...] = ()
    network_max_connections: int = 64
    network_rate: int | None = None   # bytes/second each way, per networked call
    network_pool_size: int = 1        # pre-started networked sandboxes per interpreter
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
        uid = parse_number("FAAS_SANDBOX_UID", get("FAAS_SANDBOX_UID"), int, 1) if get("FAAS_SANDBOX_UID") else None
        if uid == NOBODY:
            raise ConfigError("FAAS_SANDBOX_UID=65534 is 'nobody', shared with other host processes: "
                              "leave it unset (faas creates its own user, FAAS_SANDBOX_USER) or pick a free uid")
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
            sandbox_user=get("FAAS_SANDBOX_USER", "faas-sandbox"),
            sandbox_uid=uid,
            sandbox_gid=parse_number("FAAS_SANDBOX_GID", get("FAAS_SANDBOX_GID"), int, 1)
            if get("FAAS_SANDBOX_GID") else uid,
            limits=limits,
            esbuild=Path(esbuild),
            console=parse_switch("FAAS_CONSOLE", get("FAAS_CONSOLE", "on")),
            deps=DepsConfig.from_env(get),
            calls=CallConfig.from_env(get, parse_number("HTTP_PORT", get("HTTP_PORT", "8080"), int, 0, 65535),
                                      bool(redis_url)),
            secret_key=check_secret_key(get("FAAS_SECRET_KEY")),
            network=check_network_switch(get("FAAS_NETWORK", "off")),
            network_deny=parse_networks("FAAS_NETWORK_DENY", get("FAAS_NETWORK_DENY")),
            network_max_connections=parse_number("FAAS_NETWORK_MAX_CONNECTIONS",
                                                 get("FAAS_NETWORK_MAX_CONNECTIONS", "64"), int, 1, 65535),
            network_rate=parse_size("FAAS_NETWORK_RATE", get("FAAS_NETWORK_RATE")) if get("FAAS_NETWORK_RATE") else None,
            network_pool_size=parse_number("FAAS_POOL_SIZE_NETWORK",
                                           get("FAAS_POOL_SIZE_NETWORK", str(min(pool_size, 1))), int, 0, 64),
            zygote=parse_switch("FAAS_ZYGOTE", get("FAAS_ZYGOTE", "on")),
            zygote_calls=parse_number("FAAS_ZYGOTE_CALLS", get("FAAS_ZYGOTE_CALLS", "1000"), int, 1),
            zygote_seconds=parse_number("FAAS_ZYGOTE_SECONDS", get("FAAS_ZYGOTE_SECONDS", "600"), float, 1),
        )


def check_network_switch(value: str) -> str:
    if value not in ("off", "allow"):
        raise ConfigError(f"FAAS_NETWORK={value!r} must be 'off' (the default) or 'allow'")
    return value


def check_secret_key(key: str) -> str | None:
    if key and len(key) < 32:
        raise ConfigError("FAAS_SECRET_KEY must be at least 32 characters (for example: openssl rand -hex 32)")
    return key or None


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
    deps: dict[str, Any] | None = None     # its libraries' lock (see Layers), else None
    network: str = "none"                   # "internet": opted in to the filtered internet

    @property
    def runnable(self) -> str:
        return self.compiled if self.compiled is not None else self.code

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "language": self.language, "size": len(self.code.encode()),
                "sha256": hashlib.sha256(self.code.encode()).hexdigest(), "created": self.created,
                "limits": self.limits, "network": self.network,
                **({"dependencies": deps_summary(self.deps)} if self.deps else {})}


def next_version(previous: int) -> int:
    """Versions are Unix seconds, but always above the previous one: no two uploads collide."""
    return max(int(time.time()), previous + 1)


class Store(Protocol):
    kind: str

    def put(self, path: str, language: str, code: str, compiled: str | None,
            limits: dict[str, Any] | None, deps: dict[str, Any] | None = None,
            network: str = "none") -> Version: ...
    def get(self, path: str, version: int | None = None) -> Version | None: ...
    def find(self, path: str, version: int | None = None) -> int | None: ...
    def describe(self, path: str) -> dict[str, Any] | None: ...
    def list_functions(self) -> list[dict[str, Any]]: ...
    def list_versions(self, path: str) -> list[dict[str, Any]]: ...
    def set_latest(self, path: str, version: int) -> bool: ...
    def delete(self, path: str, version: int | None = None) -> int: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...
    def layer_keys(self) -> dict[str, int]: ...


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
    ADDED_COLUMNS = {"deps": "ALTER TABLE versions ADD COLUMN deps TEXT",   # stores made before libraries
                     "network": "ALTER TABLE versions ADD COLUMN network TEXT"}   # and before network

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.file = data_dir / "faas.sqlite3"
        self.idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        with self.connection() as db:
            db.executescript(self.SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(versions)")}
            for column, statement in self.ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(statement)

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

    COLUMNS = "path, version, language, code, compiled, created, limits, deps, network"

    def put(self, path: str, language: str, code: str, compiled: str | None,
            limits: dict[str, Any] | None, deps: dict[str, Any] | None = None,
            network: str = "none") -> Version:
        with self.transaction() as db:
            row = db.execute("SELECT high_water FROM functions WHERE path=?", (path,)).fetchone()
            version = next_version(row[0] if row else 0)
            now = time.time()
            db.execute(f"INSERT INTO versions ({self.COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                       (path, version, language, code, compiled, now, json.dumps(limits) if limits else None,
                        json.dumps(deps) if deps else None, network))
            db.execute("INSERT INTO functions VALUES (?,?,?,?) ON CONFLICT(path) DO UPDATE SET "
                       "latest=excluded.latest, high_water=excluded.high_water, updated=excluded.updated",
                       (path, version, version, now))
        return Version(path, version, language, code, compiled, now, limits, deps, network)

    @staticmethod
    def version_from_row(row: tuple) -> Version:
        *fields, limits, deps, network = row
        return Version(*fields, json.loads(limits) if limits else None, json.loads(deps) if deps else None,
                       network or "none")

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

    def layer_keys(self) -> dict[str, int]:
        """Layer key -> how many stored versions use it (what layer GC must keep)."""
        rows = self.rows("SELECT json_extract(deps, '$.key'), count(*) FROM versions "
                         "WHERE deps IS NOT NULL GROUP BY 1")
        return {key: count for key, count in rows if key}

    def close(self) -> None:
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return


def redis_client(url: str, timeout: float, **options: Any) -> Any:
    """A client for request paths: one immediate retry (a dropped connection is re-opened),
    no backoff, so while Redis is down a request is a 503 at once, not after redis-py's
    default backoff of about 4 s (research/async.md)."""
    import redis  # only needed with Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 1), health_check_interval=30, **options)


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
                   'compiled', ARGV[4], 'has_compiled', ARGV[5], 'created', ARGV[6], 'limits', ARGV[8],
                   'deps', ARGV[9], 'network', ARGV[10])
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
        self.redis = redis_client(url, timeout)
        self.prefix = prefix
        self.put_script = self.redis.register_script(self.PUT_SCRIPT)
        self.delete_script = self.redis.register_script(self.DELETE_SCRIPT)
        self.set_latest_script = self.redis.register_script(self.SET_LATEST_SCRIPT)
        self.ping()

    def keys(self, path: str) -> list[str]:
        base = f"{self.prefix}function:{path}"
        return [f"{self.prefix}functions", base, f"{base}:v:", f"{base}:versions"]

    def put(self, path: str, language: str, code: str, compiled: str | None,
            limits: dict[str, Any] | None, deps: dict[str, Any] | None = None,
            network: str = "none") -> Version:
        now = time.time()
        version = int(self.put_script(keys=self.keys(path), args=[
            int(now), language, code, compiled or "", int(compiled is not None), repr(now), path,
            json.dumps(limits) if limits else "", json.dumps(deps) if deps else "", network]))
        return Version(path, version, language, code, compiled, now, limits, deps, network)

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
        deps = json.loads(fields[b"deps"]) if fields.get(b"deps") else None
        return Version(path, version, fields[b"language"].decode(), fields[b"code"].decode(),
                       compiled, float(fields[b"created"]), limits, deps,
                       (fields.get(b"network") or b"none").decode())

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

    def layer_keys(self) -> dict[str, int]:
        keys: dict[str, int] = collections.Counter()
        for raw in self.redis.smembers(f"{self.prefix}functions"):
            _, _, version_prefix, versions = self.keys(raw.decode())
            numbers = self.redis.zrange(versions, 0, -1)
            with self.redis.pipeline(transaction=False) as pipe:
                for number in numbers:
                    pipe.hget(f"{version_prefix}{int(number)}", "deps")
                for deps in pipe.execute():
                    if deps:
                        keys[json.loads(deps)["key"]] += 1
        return dict(keys)

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
# 3b. Layers: requests and locks (third-party libraries a version declares)
# ==========================================================================================
# research/deps.md: the lock stored with a version is the truth; a layer is a disposable,
# content-addressed cache built from it, read-only, bound into every sandbox at
# LAYERS_IN_SANDBOX. Only binary wheels and `npm --ignore-scripts`: no package code runs
# while building, and the install step has no network.

LAYERS_IN_SANDBOX = "/faas/layers"
BUILD_DIR_IN_SANDBOX = "/out"
FIND_LINKS_IN_SANDBOX = "/faas/find-links"
MAX_DEPENDENCY_ENTRIES = 50
PY_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
PY_REQUIREMENT_RE = re.compile(
    rf"\s*({PY_NAME})\s*(?:\[\s*({PY_NAME}(?:\s*,\s*{PY_NAME})*)\s*\])?\s*"
    r"((?:~=|==|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+(?:\s*,\s*(?:~=|==|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?\s*")
NPM_NAME_RE = re.compile(r"(@[a-z0-9~-][a-z0-9._~-]*/)?[a-z0-9~-][a-z0-9._~-]*")
NPM_RANGE_RE = re.compile(r"[0-9A-Za-z.^~<>=| *-]+")
DEPS_FIELDS = {"pip": "requirements", "npm": "dependencies"}


@dataclasses.dataclass(frozen=True)
class DepsConfig:
    """FAAS_DEPS_* settings. Index settings (which may hold credentials) reach only the
    build sandbox, through a config file in its staging directory: never argv, a run
    sandbox, a log line or an answer."""
    enabled: bool
    allow: re.Pattern[str] | None
    timeout: float
    max_size: int
    max_total: int
    max_packages: int
    memory: int
    max_builds: int
    grace: float
    index_url: str
    extra_index_url: str
    find_links: str
    no_index: bool
    npm_registry: str
    directory: Path | None   # FAAS_DEPS_DIR; None: <data dir>/deps (see layer_store_root)
    warm: int                # pre-started sandboxes per called layer, its modules imported
    warm_layers: int         # layers that may have them at once (least recently called go)

    @classmethod
    def from_env(cls, get: Callable[..., str]) -> "DepsConfig":
        switch = get("FAAS_DEPS", "on").lower()
        if switch not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"FAAS_DEPS={switch!r} must be on or off")
        allow = get("FAAS_DEPS_ALLOW")
        try:
            pattern = re.compile(allow, re.IGNORECASE) if allow else None
        except re.error as error:
            raise ConfigError(f"FAAS_DEPS_ALLOW={allow!r} is not a regular expression: {error}") from None
        find_links = get("FAAS_DEPS_FIND_LINKS")
        if find_links and "://" not in find_links and not Path(find_links).is_dir():
            raise ConfigError(f"FAAS_DEPS_FIND_LINKS={find_links!r} is neither a directory nor a URL")
        return cls(
            enabled=switch in ("on", "1", "true", "yes"), allow=pattern,
            timeout=parse_number("FAAS_DEPS_TIMEOUT", get("FAAS_DEPS_TIMEOUT", "300"), float, 1),
            max_size=parse_size("FAAS_DEPS_MAX_SIZE", get("FAAS_DEPS_MAX_SIZE", "1G")),
            max_total=parse_size("FAAS_DEPS_MAX_TOTAL", get("FAAS_DEPS_MAX_TOTAL", "10G")),
            max_packages=parse_number("FAAS_DEPS_MAX_PACKAGES", get("FAAS_DEPS_MAX_PACKAGES", "100"), int, 1),
            memory=parse_size("FAAS_DEPS_MEMORY", get("FAAS_DEPS_MEMORY", "1G")),
            max_builds=parse_number("FAAS_DEPS_MAX_BUILDS", get("FAAS_DEPS_MAX_BUILDS", "1"), int, 1),
            grace=parse_number("FAAS_DEPS_GRACE", get("FAAS_DEPS_GRACE", "3600"), float, 0),
            index_url=get("FAAS_DEPS_INDEX_URL"), extra_index_url=get("FAAS_DEPS_EXTRA_INDEX_URL"),
            find_links=str(Path(find_links).resolve()) if find_links and "://" not in find_links else find_links,
            no_index=get("FAAS_DEPS_NO_INDEX").lower() in ("1", "true", "yes"),
            npm_registry=get("FAAS_DEPS_NPM_REGISTRY"),
            directory=Path(get("FAAS_DEPS_DIR")).resolve() if get("FAAS_DEPS_DIR") else None,
            warm=parse_number("FAAS_DEPS_WARM", get("FAAS_DEPS_WARM", "1"), int, 0, 16),
            warm_layers=parse_number("FAAS_DEPS_WARM_LAYERS", get("FAAS_DEPS_WARM_LAYERS", "4"), int, 1, 64),
        )


def world_traversable(path: Path) -> bool:
    """Whether any uid can walk down to path (bwrap resolves a bind source as the sandbox
    user): every existing ancestor has the x bit for others."""
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents) if p.exists())


def layer_store_root(config: Config) -> Path:
    """Where layers live: FAAS_DEPS_DIR, else `<data dir>/deps`. A data dir the sandbox user
    cannot reach (a checkout under a 0700 home, run as root) gets its layers under
    /var/cache/faas instead: they are a disposable cache, the locks stay in the store."""
    if config.deps.directory is not None:
        return config.deps.directory
    default = config.data_dir.resolve() / "deps"
    if os.geteuid() != 0 or world_traversable(default):
        return default
    return Path("/var/cache/faas") / hashlib.sha256(str(default).encode()).hexdigest()[:16]


def canonical_name(name: str) -> str:
    """PEP 503: NumPy, numpy and num_py... are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normalize_requirement(entry: Any) -> tuple[str, str]:
    """(canonical name, normalized requirement) of one `requirements` entry, or a 400
    naming it. Names, extras and version specifiers only: no URL, path, VCS, marker or
    pip option can pass, so pip never fetches anything but index/find-links files."""
    match = PY_REQUIREMENT_RE.fullmatch(entry) if isinstance(entry, str) and len(entry) <= 200 else None
    if match is None:
        raise ApiError(400, f"requirement {entry!r} is not allowed: give a project name with optional "
                            "version specifiers, like 'numpy==2.4.6' or 'pandas>=3,<4' (no URLs, paths, "
                            "markers or pip options)", entry=entry if isinstance(entry, str) else None)
    name, extras, specifiers = match.groups()
    extras_text = f"[{','.join(sorted({canonical_name(e.strip()) for e in extras.split(',')}))}]" if extras else ""
    spec_text = ",".join(sorted(re.sub(r"\s+", "", s) for s in specifiers.split(","))) if specifiers else ""
    return canonical_name(name), canonical_name(name) + extras_text + spec_text


def check_npm_dependency(name: Any, spec: Any) -> None:
    if not isinstance(name, str) or len(name) > 214 or not NPM_NAME_RE.fullmatch(name):
        raise ApiError(400, f"dependency name {name!r} is not an npm package name", entry=str(name)[:214])
    if not isinstance(spec, str) or len(spec) > 100 or not NPM_RANGE_RE.fullmatch(spec):
        raise ApiError(400, f"dependency {name!r}: version {spec!r} is not allowed: give a version or "
                            "range like '4.17.21' or '^1.11' (no URLs, paths, git or npm: aliases)", entry=name)


@dataclasses.dataclass(frozen=True)
class Requested:
    """What an upload asked for, validated and normalized (the lock's input)."""
    kind: str                      # pip | npm
    entries: tuple[str, ...] | tuple[tuple[str, str], ...]

    @property
    def project_names(self) -> list[str]:
        if self.kind == "npm":
            return [name for name, _ in self.entries]   # type: ignore[misc]
        return [PY_REQUIREMENT_RE.fullmatch(e).group(1) for e in self.entries]   # type: ignore[union-attr,arg-type]

    def as_json(self) -> Any:
        return list(self.entries) if self.kind == "pip" else dict(self.entries)   # type: ignore[arg-type]


def check_dependencies(body: dict[str, Any], runtime: Runtime, deps: DepsConfig) -> Requested | None:
    """The request's `requirements` (Python) or `dependencies` (JavaScript/TypeScript);
    None when absent or empty: today's behaviour exactly."""
    kind = "pip" if runtime.language == "python" else "npm"
    field, other = DEPS_FIELDS[kind], DEPS_FIELDS["npm" if kind == "pip" else "pip"]
    if body.get(other) not in (None, [], {}):
        raise ApiError(400, f"{other} is not for {runtime.language}: "
                            f"{runtime.language} takes {field} ({'a list' if kind == 'pip' else 'an object'})")
    given = body.get(field)
    if given in (None, [], {}):
        return None
    if kind == "pip" and not isinstance(given, list):
        raise ApiError(400, "requirements must be a list of strings like [\"numpy==2.4.6\"]")
    if kind == "npm" and not isinstance(given, dict):
        raise ApiError(400, "dependencies must be an object like {\"lodash\": \"4.17.21\"}")
    if not deps.enabled:
        raise ApiError(400, "libraries are disabled on this server (FAAS_DEPS=off)")
    items = list(given) if kind == "pip" else list(given.items())
    if len(items) > MAX_DEPENDENCY_ENTRIES:
        extra = items[MAX_DEPENDENCY_ENTRIES]
        raise ApiError(400, f"too many {field}: {len(items)}, at most {MAX_DEPENDENCY_ENTRIES} "
                            f"(the first over the limit is {extra if kind == 'pip' else extra[0]!r})")
    if kind == "pip":
        normalized = dict(normalize_requirement(entry) for entry in items)
        if len(normalized) != len(items):
            raise ApiError(400, "requirements name the same project twice")
        entries: Any = tuple(sorted(normalized.values()))
    else:
        for name, spec in items:
            check_npm_dependency(name, spec)
        entries = tuple(sorted((name, spec.strip()) for name, spec in items))
    requested = Requested(kind, entries)
    for name in requested.project_names:
        if deps.allow is not None and not deps.allow.fullmatch(name):
            raise ApiError(400, f"{name!r} is not on this server's list of allowed libraries (FAAS_DEPS_ALLOW)",
                           entry=name)
    return requested


def layer_key(tag: str, lock: str) -> str:
    return hashlib.sha256(f"{tag}\n{lock}".encode()).hexdigest()


def interpreter_tag(kind: str) -> str:
    """The platform a lock is valid for: the sandbox's own interpreter, not the server's."""
    if kind == "pip":
        argv = [RUNTIMES["python"].interpreter, "-I", "-c",
                "import sys,sysconfig,platform;print('cp%d%d-%s-glibc%s'%(sys.version_info[0],"
                "sys.version_info[1],sysconfig.get_platform(),platform.libc_ver()[1]))"]
    else:
        argv = [RUNTIMES["javascript"].interpreter, "-p",
                "'node'+process.versions.node.split('.')[0]+'-'+process.platform+'-'+process.arch"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=SANDBOX_HOST_ENV)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


PIN_VERSION_RE = re.compile(r"[A-Za-z0-9.+!_-]{1,64}")


def pip_lock(report: dict[str, Any]) -> tuple[str, list[str]]:
    """pip's --report as a --require-hashes lock: sorted `name==version --hash=sha256:...`.
    Names, versions and hashes come from the index: each is checked strictly, so a
    crafted one cannot put a pip option into the lock file the build reads."""
    lines, pins = [], []
    try:
        for item in report.get("install", []):
            name, version = canonical_name(item["metadata"]["name"]), item["metadata"]["version"]
            info = item.get("download_info", {})
            digest = info.get("archive_info", {}).get("hash", "")
            if not re.fullmatch(PY_NAME, name) or not PIN_VERSION_RE.fullmatch(version):
                raise ApiError(400, f"the index answered an unusable project name or version: {name!r} {version!r}")
            if not re.fullmatch(r"sha256=[0-9a-f]{64}", digest) or not info.get("url", "").endswith(".whl"):
                raise ApiError(400, f"{name}=={version} has no binary wheel with a sha256 hash")
            lines.append(f"{name}=={version} --hash=sha256:{digest[7:]}")
            pins.append(f"{name}=={version}")
    except (KeyError, TypeError, AttributeError):
        raise ApiError(400, "pip's resolution report is not in the expected form") from None
    return "".join(f"{line}\n" for line in sorted(lines)), sorted(pins)


def npm_pins(lock: dict[str, Any], registry_ok: Callable[[str], bool]) -> list[str]:
    """name@version of every package in an npm lock; 400 unless each comes from the
    registry with an integrity hash (a git or file dependency of a dependency would
    otherwise fetch or run anything)."""
    pins = []
    packages = lock.get("packages") if isinstance(lock, dict) else None
    if not isinstance(packages, dict) or not all(isinstance(entry, dict) for entry in packages.values()):
        raise ApiError(400, "npm's lock is not in the expected form (lockfileVersion 2 or 3)")
    for where, entry in sorted(packages.items()):
        if not where:
            continue
        name = where.rsplit("node_modules/", 1)[-1]
        if entry.get("link") or not entry.get("integrity") or not registry_ok(entry.get("resolved", "")):
            raise ApiError(400, f"{name}: only registry packages with an integrity hash can be installed "
                                f"(it resolves to {redacted(str(entry.get('resolved', 'a link')))[:200]!r})")
        pins.append(f"{name}@{entry.get('version')}")
    return pins


def tree_size(path: Path) -> int:
    """Bytes of the regular files below path (apparent sizes, symlinks not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def tail(text: str, limit: int = 1500) -> str:
    """The end of a tool's output, credentials in URLs replaced by ***."""
    return redacted(text.strip())[-limit:]


# ==========================================================================================
# 3c. Layers: the store (build in a sandbox, mount read-only, warm sandboxes, GC)
# ==========================================================================================

class BuildFailed(ApiError):
    """A layer build ended without a layer; nothing of it is left on disk."""


@dataclasses.dataclass
class LayerInfo:
    key: str
    cached: bool
    build_ms: int
    size: int
    resolve_ms: int = 0


class Layers:
    """The layer store under `<data dir>/deps`: `layers/<key>/` (read-only trees, world
    traversable but not listable), `tmp/` (staging and trash), `used/<key>` (last use
    and a shared flock while a call uses the layer). Builds run one at a time (by
    default), single-flight per key, each phase in a sandbox with the run sandbox's
    flags and its own cgroup, time, memory and disk limits."""

    def __init__(self, config: Config, metrics: "Metrics | None" = None, serving: bool = False) -> None:
        self.config = config
        self.deps = config.deps
        self.root = layer_store_root(config)
        self.layers = self.root / "layers"
        self.tmp = self.root / "tmp"
        self.used = self.root / "used"
        self.metrics = metrics
        self.sandbox: Sandbox | None = None
        self.build_slots = threading.BoundedSemaphore(self.deps.max_builds)
        self.key_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self.key_locks_lock = threading.Lock()
        self.touched: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.pool: Pool | None = None   # set by App: warm sandboxes per called layer
        self.warm: collections.OrderedDict[tuple[str, ...], None] = collections.OrderedDict()
        self.warm_lock = threading.Lock()
        self.modules: dict[tuple[str, str], tuple[str, ...]] = {}
        self.root_fd = -1   # a serving process holds the store's shared lock (see close)
        self.available = self.deps.enabled and self.prepare_dirs(serving)

    def prepare_dirs(self, serving: bool) -> bool:
        """Create the store; the sandbox user must be able to traverse to it (bwrap binds
        it as that user), but not list it."""
        try:
            for path, mode in ((self.root, 0o711), (self.layers, 0o711), (self.tmp, 0o711), (self.used, 0o700)):
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, mode)
        except OSError as error:   # a read-only working directory must not stop the server
            LOG.error("libraries disabled: cannot create the layer store %s: %s (set FAAS_DEPS_DIR)",
                      self.root, error.strerror)
            return False
        if serving:
            self.hold_store()
        if os.geteuid() == 0 and not world_traversable(self.root):
            LOG.error("libraries disabled: the sandbox user cannot reach %s (a directory above it is "
                      "not world-traversable; chmod o+x it or set FAAS_DEPS_DIR elsewhere)", self.layers)
            return False
        if serving:
            LOG.info("library layers in %s", self.layers)
        return True

    def hold_store(self) -> None:
        """Hold the store's shared lock while serving. The first server on it (the
        exclusive lock is free) removes what a crash left in tmp/; a second one must not:
        those are the first one's builds."""
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            for leftover in self.tmp.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        fcntl.flock(self.root_fd, fcntl.LOCK_SH)

    def close(self) -> None:
        """At shutdown, a store nothing was ever built into is removed (empty directories
        only), unless another server process on it is still running (it holds the store's
        shared lock, and its sandboxes bind the directory)."""
        fd, self.root_fd = self.root_fd, -1
        if fd < 0:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for path in (self.used, self.tmp, self.layers, self.root):
                path.rmdir()
        except OSError:   # another server holds the store, or layers were built: keep it
            pass
        finally:
            os.close(fd)

    def tag(self, kind: str) -> str:
        if kind not in self.tags:
            self.tags[kind] = interpreter_tag(kind)
        return self.tags[kind]

    def key_lock(self, key: str) -> threading.Lock:
        with self.key_locks_lock:
            return self.key_locks[key]

    def path(self, key: str) -> Path:
        return self.layers / key

    def exists(self, key: str) -> bool:
        return (self.layers / key / "faas-layer.json").is_file()

    def check_available(self) -> None:
        if not self.deps.enabled:
            raise ApiError(400, "libraries are disabled on this server (FAAS_DEPS=off)")
        if not self.available or self.sandbox is None:
            raise ApiError(503, "libraries are unavailable on this server: its layer store cannot be "
                                "reached by the sandbox user (see the server log)")

    # -- upload: resolve, lock, build ------------------------------------------------------
    def lock_and_build(self, requested: Requested) -> tuple[dict[str, Any], LayerInfo]:
        """Resolve the request to a hashed lock (network), then make sure its layer exists.
        Returns the version record's `deps` and what the upload answer reports."""
        self.check_available()
        tag = self.tag(requested.kind)
        if not tag:
            raise ApiError(503, f"{'python3' if requested.kind == 'pip' else 'node'} is not usable for libraries")
        began = time.monotonic()
        deadline = began + self.deps.timeout
        with self.staging() as work:
            if requested.kind == "pip":
                lock, pins = self.resolve_pip(work, requested, deadline)
            else:
                lock, pins = self.resolve_npm(work, requested, deadline)
        if len(pins) > self.deps.max_packages:
            raise ApiError(400, f"the libraries resolve to {len(pins)} packages, more than this server's "
                                f"limit of {self.deps.max_packages} (FAAS_DEPS_MAX_PACKAGES)")
        record = {"kind": requested.kind, "requested": requested.as_json(), "lock": lock,
                  "packages": pins, "tag": tag, "key": layer_key(tag, lock)}
        resolve_ms = int((time.monotonic() - began) * 1000)
        return record, dataclasses.replace(self.ensure(record, deadline), resolve_ms=resolve_ms)

    def ensure(self, record: dict[str, Any], deadline: float | None = None) -> LayerInfo:
        """The record's layer, built from its lock when this node lacks it."""
        key = record["key"]
        if self.exists(key):
            return LayerInfo(key, True, 0, self.size_of(key))
        self.check_available()
        if record.get("tag") != self.tag(record["kind"]):
            raise ApiError(503, f"this version's libraries were locked for {record.get('tag')}, this server "
                                f"runs {self.tag(record['kind']) or 'nothing usable'}: upload it again here")
        deadline = deadline or time.monotonic() + self.deps.timeout
        began = time.monotonic()
        if not self.build_slots.acquire(timeout=max(0, deadline - time.monotonic())):
            raise ApiError(503, "another library build is still running; retry shortly",
                           headers={"Retry-After": "5"})
        try:
            with self.key_lock(key):
                if self.exists(key):
                    return LayerInfo(key, True, 0, self.size_of(key))
                LOG.info("building layer %s from lock (%s, %d packages)", key, record["kind"],
                         len(record.get("packages", [])))
                try:
                    size = self.build(record, deadline)
                except ApiError:
                    self.count_build("failed", time.monotonic() - began)
                    raise
        finally:
            self.build_slots.release()
        seconds = time.monotonic() - began
        self.count_build("ok", seconds)
        LOG.info("built layer %s in %d ms, %d bytes", key, seconds * 1000, size)
        if self.totals()[1] > self.deps.max_total:
            self.collect_soon()
        return LayerInfo(key, False, int(seconds * 1000), size)

    def count_build(self, result: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.inc("faas_deps_builds_total", result=result)
            self.metrics.observe("faas_deps_build_seconds", seconds)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh, unguessably named directory the build sandbox may write (any sandbox
        uid: 0777 below the unlistable tmp/), removed whatever happens."""
        work = Path(tempfile.mkdtemp(prefix="build-", dir=self.tmp))
        try:
            os.chmod(work, 0o777)
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def write_config(self, work: Path, kind: str) -> None:
        """Index settings as a config file the build reads: never on a command line."""
        if kind == "pip":
            lines = ["[global]", "disable-pip-version-check = true", "no-input = true"]
            if self.deps.index_url:
                lines.append(f"index-url = {self.deps.index_url}")
            if self.deps.extra_index_url:
                lines.append(f"extra-index-url = {self.deps.extra_index_url}")
            if self.deps.find_links:
                lines.append(f"find-links = {FIND_LINKS_IN_SANDBOX if '://' not in self.deps.find_links else self.deps.find_links}")
            if self.deps.no_index:
                lines.append("no-index = true")
            (work / "pip.conf").write_text("\n".join(lines) + "\n")
            os.chmod(work / "pip.conf", 0o644)
        else:
            lines = ["audit=false", "fund=false", "update-notifier=false", "progress=false",
                     f"cache={BUILD_DIR_IN_SANDBOX}/cache"]
            if self.deps.npm_registry:
                lines.append(f"registry={self.deps.npm_registry}")
            (work / ".npmrc").write_text("\n".join(lines) + "\n")
            os.chmod(work / ".npmrc", 0o644)

    def run_phase(self, work: Path, script: str, net: bool, deadline: float, what: str,
                  watch: tuple[Path, ...] = ()) -> Outcome:
        """One build step in a sandbox: the run sandbox's flags plus the staging dir at
        /out, network only when `net`. Killed at the deadline or when `watch` grows past
        FAAS_DEPS_MAX_SIZE."""
        assert self.sandbox is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailed(504, f"building the libraries took longer than FAAS_DEPS_TIMEOUT="
                                   f"{self.deps.timeout:g} s ({what})")
        limits = Limits(memory=self.deps.memory, cpus=1.0, pids=256, timeout=remaining,
                        output=1 << 20, tmp_size=self.deps.max_size)
        base = build_sandbox_argv(self.sandbox.base_argv, work, net, self.deps.find_links)
        started = self.sandbox.start(["/bin/sh", "-c", script], limits, result_fd=False, base=base)
        too_big = threading.Event()
        done = threading.Event()
        if watch:
            threading.Thread(target=self.watch_size, args=(watch, started, too_big, done), daemon=True).start()
        try:
            outcome = self.sandbox.complete(started, b"", limits, None, since=started.born)
        finally:
            done.set()
        output = bytes(outcome.stderr[-4096:] + outcome.stdout[-4096:])
        if too_big.is_set() or outcome.signal == signal.SIGXFSZ or b"[Errno 27]" in output or b"EFBIG" in output \
                or sum(map(tree_size, watch)) > self.deps.max_size:
            raise BuildFailed(400, f"the libraries are too large: over {self.deps.max_size} bytes "
                                   "installed (FAAS_DEPS_MAX_SIZE)")
        if outcome.status == "timeout":
            raise BuildFailed(504, f"building the libraries took longer than FAAS_DEPS_TIMEOUT="
                                   f"{self.deps.timeout:g} s ({what})")
        if outcome.oom:
            raise BuildFailed(500, f"{what} ran out of memory (FAAS_DEPS_MEMORY={self.deps.memory} bytes)")
        return outcome

    def watch_size(self, paths: tuple[Path, ...], started: Started, too_big: threading.Event,
                   done: threading.Event) -> None:
        while not done.wait(0.5):
            if sum(map(tree_size, paths)) > self.deps.max_size:
                too_big.set()
                started.cgroup.kill()
                return

    def resolve_pip(self, work: Path, requested: Requested, deadline: float) -> tuple[str, list[str]]:
        self.write_config(work, "pip")
        reqs = " ".join(shlex.quote(entry) for entry in requested.entries)   # type: ignore[arg-type]
        outcome = self.run_phase(work, (
            f"cd {BUILD_DIR_IN_SANDBOX} && PIP_CONFIG_FILE={BUILD_DIR_IN_SANDBOX}/pip.conf exec /usr/bin/python3 "
            f"-m pip install -q --dry-run --ignore-installed --only-binary :all: --cache-dir "
            f"{BUILD_DIR_IN_SANDBOX}/cache --report {BUILD_DIR_IN_SANDBOX}/report.json {reqs}"),
            True, deadline, "resolving")
        report = work / "report.json"
        if outcome.exit_code != 0 or not report.is_file():
            raise self.pip_error(outcome)
        return pip_lock(json.loads(report.read_text()))

    @staticmethod
    def pip_error(outcome: Outcome) -> ApiError:
        text = tail(outcome.stderr.decode("utf-8", "replace") + outcome.stdout.decode("utf-8", "replace"))
        missing = re.search(r"No matching distribution found for (\S+)", text)
        if missing:
            return BuildFailed(400, f"no binary wheel of {missing.group(1)} for this server's Python (or no "
                                    "such project or version): faas installs binary wheels only, so that no "
                                    "package code runs while building; ask the operator to add a wheel "
                                    "(FAAS_DEPS_FIND_LINKS)", output=text)
        return BuildFailed(400, "pip could not resolve the requirements", output=text)

    def resolve_npm(self, work: Path, requested: Requested, deadline: float) -> tuple[str, list[str]]:
        self.write_config(work, "npm")
        self.write_package_json(work, requested.as_json())
        outcome = self.run_phase(work, (
            f"cd {BUILD_DIR_IN_SANDBOX} && exec npm install --package-lock-only --ignore-scripts "
            "--no-audit --no-fund --loglevel=error"), True, deadline, "resolving")
        lock_file = work / "package-lock.json"
        if outcome.exit_code != 0 or not lock_file.is_file():
            text = tail(outcome.stderr.decode("utf-8", "replace"))
            raise BuildFailed(400, "npm could not resolve the dependencies", output=text)
        lock = lock_file.read_text()
        return lock, npm_pins(json.loads(lock), self.registry_ok)

    def registry_ok(self, resolved: str) -> bool:
        registry = self.deps.npm_registry or "https://registry.npmjs.org/"
        return resolved.startswith(registry.rstrip("/") + "/")

    @staticmethod
    def write_package_json(work: Path, dependencies: dict[str, str]) -> None:
        (work / "package.json").write_text(json.dumps(
            {"name": "faas-layer", "version": "1.0.0", "private": True, "dependencies": dependencies}, indent=2))
        os.chmod(work / "package.json", 0o644)

    def build(self, record: dict[str, Any], deadline: float) -> int:
        """Build the layer of a lock into staging, then move it into place atomically."""
        with self.staging() as work:
            tree = work / "layer"
            tree.mkdir()
            os.chmod(tree, 0o777)
            if record["kind"] == "pip":
                self.build_pip(work, record, deadline)
            else:
                self.build_npm(work, record, deadline)
            size = tree_size(tree)
            if size > self.deps.max_size:
                raise BuildFailed(400, f"the libraries are too large: {size} bytes installed, over "
                                       f"{self.deps.max_size} (FAAS_DEPS_MAX_SIZE)")
            meta = {"key": record["key"], "kind": record["kind"], "tag": record["tag"], "lock": record["lock"],
                    "packages": record.get("packages", []), "size": size, "built": time.time()}
            (tree / "faas-layer.json").write_text(json.dumps(meta, indent=1))
            seal(tree)
            try:
                os.rename(tree, self.path(record["key"]))
            except OSError:
                if not self.exists(record["key"]):   # not another process' identical build
                    raise
        return size

    def build_pip(self, work: Path, record: dict[str, Any], deadline: float) -> None:
        self.write_config(work, "pip")
        (work / "lock.txt").write_text(record["lock"])
        os.chmod(work / "lock.txt", 0o644)
        out = BUILD_DIR_IN_SANDBOX
        pip = "/usr/bin/python3 -m pip"
        outcome = self.run_phase(work, (
            f"cd {out} && export PIP_CONFIG_FILE={out}/pip.conf && exec {pip} download -q --only-binary :all: --no-deps --require-hashes "
            f"--cache-dir {out}/cache -d {out}/wheels -r {out}/lock.txt"), True, deadline, "downloading")
        if outcome.exit_code != 0:
            raise self.pip_error(outcome)
        unpacked = 0
        for wheel in (work / "wheels").glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                unpacked += sum(info.file_size for info in archive.infolist())
        if unpacked > self.deps.max_size:
            raise BuildFailed(400, f"the libraries are too large: {unpacked} bytes unpacked, over "
                                   f"{self.deps.max_size} (FAAS_DEPS_MAX_SIZE)")
        # Offline: install from the downloaded wheels, then compile bytecode that stays
        # valid on a read-only tree (unchecked-hash: mtimes do not matter).
        outcome = self.run_phase(work, (
            f"cd {out} && mkdir tmp && export PIP_CONFIG_FILE={out}/pip.conf TMPDIR={out}/tmp && "
            f"{pip} install -q --no-index --find-links {out}/wheels --only-binary :all: --no-deps "
            f"--require-hashes --no-compile --target {out}/layer/site -r {out}/lock.txt && exec /usr/bin/python3 "
            f"-m compileall -q -j 1 --invalidation-mode unchecked-hash {out}/layer/site"),
            False, deadline, "installing", watch=(work / "layer", work / "tmp"))
        if outcome.exit_code != 0:
            raise BuildFailed(500, "installing the libraries failed",
                              output=tail(outcome.stderr.decode("utf-8", "replace")))

    def build_npm(self, work: Path, record: dict[str, Any], deadline: float) -> None:
        self.write_config(work, "npm")
        self.write_package_json(work, record["requested"])
        (work / "package-lock.json").write_text(record["lock"])
        os.chmod(work / "package-lock.json", 0o644)
        outcome = self.run_phase(work, (
            f"cd {BUILD_DIR_IN_SANDBOX} && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && "
            f"exec mv node_modules package.json package-lock.json layer/"), True, deadline, "installing",
            watch=(work / "node_modules",))
        if outcome.exit_code != 0:
            raise BuildFailed(500, "installing the libraries failed",
                              output=tail(outcome.stderr.decode("utf-8", "replace")))

    def size_of(self, key: str) -> int:
        try:
            return int(json.loads((self.path(key) / "faas-layer.json").read_text()).get("size", 0))
        except (OSError, ValueError):
            return 0

    # -- calls ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, key: str) -> Iterator[None]:
        """Hold the layer for a call: a shared flock GC (of any process) respects, and the
        last-use time, written at most once a minute."""
        fd = os.open(self.used / key, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not self.exists(key):   # removed between Layers.ensure and now
                raise ApiError(503, "this version's libraries were just removed from this server; retry",
                               headers={"Retry-After": "1"})
            now = time.time()
            if now - self.touched.get(key, 0) > 60:
                self.touched[key] = now
                os.utime(fd)
            yield
        finally:
            os.close(fd)

    # -- warm imports -----------------------------------------------------------------------
    def warm_argv(self, runtime: Runtime, deps: dict[str, Any], code: str) -> tuple[str, ...] | None:
        """The pool entry of this version's warm sandboxes: its interpreter started with the
        layer added and the layer's modules the code imports already imported. Registered
        on the first call, which imports them itself (so it never races the first warm
        sandbox's start); at most FAAS_DEPS_WARM_LAYERS of them, least recently called
        dropped. None when there is nothing worth preloading, or not yet."""
        if not self.deps.warm or self.pool is None:
            return None
        modules = self.preload_modules(deps, code)
        if not modules:
            return None
        argv = (*runtime.argv, f"--layer={LAYERS_IN_SANDBOX}/{deps['key']}", "--preload=" + ",".join(modules))
        with self.warm_lock:
            known = argv in self.warm
            self.warm[argv] = None
            self.warm.move_to_end(argv)
            dropped = []
            while len(self.warm) > self.deps.warm_layers:
                dropped.append(self.warm.popitem(last=False)[0])
        for old in dropped:
            self.pool.remove(old)
        if not known:
            self.pool.add(argv, self.deps.warm)
        return argv if known else None

    def preload_modules(self, deps: dict[str, Any], code: str) -> tuple[str, ...]:
        """Top-level modules of the layer that the code imports (Python), or requested
        packages it requires or imports (Node); remembered per layer and code."""
        cache_key = (deps["key"], hashlib.sha256(code.encode()).hexdigest())
        if cache_key not in self.modules:
            if len(self.modules) > 1024:
                self.modules.clear()
            if deps["kind"] == "pip":
                imported = set()
                for match in re.finditer(r"(?m)^\s*(?:from\s+([A-Za-z_]\w*)|import\s+([A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*))", code):
                    names = [match.group(1)] if match.group(1) else match.group(2).split(",")
                    imported.update(name.strip().split(".")[0] for name in names)
                found = sorted(imported & self.top_level_modules(deps["key"]))
            else:
                found = sorted(name for name in deps["requested"] if re.search(
                    r"""(?:require|import)\s*\(\s*['"]""" + re.escape(name) + r"""['"]|from\s+['"]""" + re.escape(name) + r"""['"]""", code))
            self.modules[cache_key] = tuple(found[:16])
        return self.modules[cache_key]

    def top_level_modules(self, key: str) -> set[str]:
        try:
            entries = os.listdir(self.path(key) / "site")
        except OSError:
            return set()
        return {entry.split(".")[0] for entry in entries
                if not entry.endswith((".dist-info", ".libs", ".pth")) and entry not in ("__pycache__", "bin")
                and re.fullmatch(r"[A-Za-z_]\w*", entry.split(".")[0])}

    def describe(self) -> dict[str, Any]:
        """/healthz: the layer store and the warm sandboxes of called layers."""
        count, size = self.totals()
        warm = {}
        if self.pool is not None:
            with self.pool.lock:
                for argv in list(self.warm):
                    if argv in self.pool.stats:
                        warm[f"{argv[-2].rsplit('/', 1)[-1][:12]} {argv[-1][10:]}"] = self.pool.describe_one(argv)
        return {"enabled": self.deps.enabled, "available": self.available, "layers": count, "bytes": size,
                "warm": warm}

    # -- operator commands -------------------------------------------------------------------
    def listing(self, referenced: dict[str, int]) -> list[dict[str, Any]]:
        rows = []
        for layer in sorted(self.layers.iterdir()) if self.layers.is_dir() else []:
            try:
                meta = json.loads((layer / "faas-layer.json").read_text())
            except (OSError, ValueError):
                continue
            rows.append({"key": layer.name, "kind": meta.get("kind"), "size": meta.get("size", 0),
                         "packages": meta.get("packages", []), "last_used": self.last_used(layer.name),
                         "versions": referenced.get(layer.name, 0)})
        return rows

    def last_used(self, key: str) -> float:
        for path in (self.used / key, self.path(key) / "faas-layer.json"):
            try:
                return path.stat().st_mtime
            except OSError:
                continue
        return 0.0

    def totals(self) -> tuple[int, int]:
        rows = self.listing({})
        return len(rows), sum(row["size"] for row in rows)

    GC_INTERVAL = 3600.0

    def start_collector(self, store: Store, stopping: threading.Event) -> None:
        """Collect garbage every GC_INTERVAL seconds and soon after a delete (collect_soon)."""
        self.collect_wake = threading.Event()

        def loop() -> None:
            while not stopping.is_set():
                self.collect_wake.wait(self.GC_INTERVAL)
                self.collect_wake.clear()
                if stopping.is_set():
                    return
                try:
                    removed = self.gc(set(store.layer_keys()), self.deps.grace)
                except Exception:   # a store outage must not end the collector
                    LOG.exception("layer garbage collection failed")
                    continue
                if removed:
                    LOG.info("removed %d layers (unreferenced, or over FAAS_DEPS_MAX_TOTAL): %s", len(removed),
                             " ".join(removed))
        if self.available:
            threading.Thread(target=loop, name="layer-gc", daemon=True).start()

    def collect_soon(self) -> None:
        wake = getattr(self, "collect_wake", None)
        if wake is not None:
            wake.set()

    def forget_warm(self, key: str) -> None:
        """A removed layer's warm sandboxes go too."""
        with self.warm_lock:
            gone = [argv for argv in self.warm if f"{LAYERS_IN_SANDBOX}/{key}" in argv[-2]]
            for argv in gone:
                del self.warm[argv]
        for argv in gone:
            if self.pool is not None:
                self.pool.remove(argv)

    def gc(self, referenced: set[str], grace: float, dry_run: bool = False) -> list[str]:
        """Mark and sweep: remove layers no stored version references and unused for
        `grace` seconds; then, while the store is above FAAS_DEPS_MAX_TOTAL, referenced
        ones idle for min(grace, 60) s, least recently used first (rebuilt from their lock
        when needed). Never one a call holds (of any server process on this directory)."""
        rows, now = self.listing({}), time.time()
        removed = [row["key"] for row in rows if row["key"] not in referenced
                   and now - row["last_used"] >= grace and self.remove(row["key"], dry_run)]
        total = sum(row["size"] for row in rows if row["key"] not in removed)
        for row in sorted(rows, key=lambda row: row["last_used"]):
            if total <= self.deps.max_total:
                break
            if row["key"] not in removed and now - row["last_used"] >= min(grace, 60) \
                    and self.remove(row["key"], dry_run):
                removed.append(row["key"])
                total -= row["size"]
        return removed

    def remove(self, key: str, dry_run: bool) -> bool:
        """Remove one layer unless a call holds it. Renamed into tmp/ first: a half-removed
        tree is never seen under a key."""
        fd = os.open(self.used / key, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False   # a call is using it
            if not dry_run:
                self.forget_warm(key)
                trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.tmp))
                os.rename(self.path(key), trash / key)
                shutil.rmtree(trash, ignore_errors=True)
                os.unlink(self.used / key)
            return True
        finally:
            os.close(fd)


def seal(tree: Path) -> None:
    """Root-owned and read-only for everyone: directories 0555, files 0444 (0555 when
    executable). World-readable, so any sandbox uid can use the layer."""
    for directory, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                if os.geteuid() == 0:
                    os.lchown(path, 0, 0)
                continue
            mode = os.lstat(path).st_mode
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            os.chmod(path, 0o555 if stat.S_ISDIR(mode) or mode & 0o111 else 0o444)
    if os.geteuid() == 0:
        os.chown(tree, 0, 0)
    os.chmod(tree, 0o555)


def build_sandbox_argv(base: list[str], work: Path, net: bool, find_links: str) -> list[str]:
    """The run sandbox's argv for a build step: the same namespaces, user, capabilities
    and read-only system, plus the staging dir at /out (the only writable place besides
    /tmp), the files name resolution and TLS need, and the network when asked."""
    argv = list(base)
    root_ro = next(i for i in range(len(argv) - 1) if argv[i] == "--remount-ro" and argv[i + 1] == "/")
    extra = ["--bind", str(work), BUILD_DIR_IN_SANDBOX]
    for path in ("/etc/ssl", "/etc/ca-certificates", "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf",
                 "/etc/pip.conf", "/etc/npmrc", "/etc/host.conf", "/etc/gai.conf"):
        extra += ["--ro-bind-try", path, path]
    if find_links and "://" not in find_links:
        extra += ["--ro-bind", find_links, FIND_LINKS_IN_SANDBOX]
    argv[root_ro:root_ro] = extra
    if net:
        argv.insert(argv.index("--unshare-all") + 1, "--share-net")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        if os.environ.get(name):
            argv += ["--setenv", name, os.environ[name]]
    return argv


def layer_request(record: dict[str, Any] | None) -> dict[str, str]:
    """What a call's request adds for its wrapper: the layer to load, if any."""
    return {"layer": f"{LAYERS_IN_SANDBOX}/{record['key']}"} if record else {}


def thread_variables(max_cpus: float) -> list[str]:
    """BLAS/OpenMP pools sized to the run's CPU limit: OpenBLAS otherwise starts a thread
    per host CPU, and `import numpy` fails under the default limits on 8+ core hosts."""
    threads = str(max(1, int(max_cpus)))
    return [arg for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            for arg in ("--setenv", name, threads)]


def deps_summary(record: dict[str, Any], with_lock: bool = False) -> dict[str, Any]:
    """A version's libraries as answers show them: asked for, pinned, the layer key."""
    summary = {"kind": record["kind"], "requested": record["requested"], "packages": record.get("packages", []),
               "key": record["key"]}
    return {**summary, "lock": record["lock"]} if with_lock else summary


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
        memory = stored.get("memory", self.memory)   # stored as asked: bytes or a size like '64M'
        memory = parse_size("memory", memory) if isinstance(memory, str) else memory
        return dataclasses.replace(self, timeout=min(self.timeout, stored.get("timeout", self.timeout)),
                                   memory=min(self.memory, memory))


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


# ==========================================================================================
# 5. Sandbox
# ==========================================================================================

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
    network: "NetworkHelper | None" = None   # a networked sandbox's slirp4netns
    path: str = "bwrap"   # how it was spawned: bwrap, or forked by the zygote


class Sandbox:
    """Starts bwrap'd processes and pumps their output under a deadline and an output cap.

    Files the sandbox needs (wrappers, esbuild, /etc/passwd) are copied at start-up into a
    world-readable runtime directory, so the unprivileged sandbox user can read them wherever
    the server itself is installed."""

    def __init__(self, config: Config, limits: LimitBackend, runtime_dir: Path,
                 layers_dir: Path | None = None) -> None:
        self.config = config = config if config.sandbox_uid is not None else resolve_sandbox_identity(config)
        self.limits = limits
        self.layers_dir = layers_dir   # bound read-only into every sandbox (see Layers)
        self.bwrap = shutil.which("bwrap") or "bwrap"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self.drop_privileges = os.geteuid() == 0
        uid, gid = (config.sandbox_uid, config.sandbox_gid) if self.drop_privileges else (os.geteuid(), os.getegid())
        self.runtime_dir = runtime_dir
        self.install_runtime_files(uid, gid)
        self.base_argv = self.build_base_argv(uid, gid)
        self.seccomp = seccomp_program(platform.machine())
        self.network = Network(config, runtime_dir)
        self.network_argv = self.network.sandbox_argv(self.base_argv) if self.network.enabled else None
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
            *(["--ro-bind", str(self.layers_dir), LAYERS_IN_SANDBOX] if self.layers_dir else []),
            "--remount-ro", "/",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin",
            "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp",
            *thread_variables(self.config.max_cpus),
        ]

    def gate(self, limits: Limits, cgroup: RunCgroup, network: bool = False) -> list[str]:
        """The process started first: it joins the run's cgroups (writing 0, "myself"),
        sets its rlimits, drops to the sandbox user, then becomes bwrap. So every process
        of the run starts inside its limits, race-free and without preexec_fn. Dropping
        privileges here rather than with Popen(user=...) keeps Popen on its vfork path:
        forking a busy server costs milliseconds. `echo` is a builtin of /bin/sh (dash),
        so the gate itself writes the 0; if joining fails, the chain stops before bwrap."""
        steps = [f"echo 0 > {shlex.quote(path)}" for path in cgroup.join_files()]
        steps += [self.network.gate_step()] if network else []   # the filter, before bwrap exists
        steps += [rlimit_commands(limits, self.limits.name), 'exec "$@"']
        unshare = self.network.gate_prefix() if network else []
        return [*unshare, "/bin/sh", "-c", " && ".join(steps), "faas-gate", *self.privilege_drop(cgroup)]

    def start(self, argv: list[str], limits: Limits, result_fd: bool = True,
              base: list[str] | None = None, network: bool = False) -> "Started":
        """A fresh sandbox, placed in its own cgroup, its wrapper loading and then waiting for
        the request on stdin. Nothing of the caller's runs until `complete` sends it. `base`
        replaces the bwrap argv (a layer build's). With `network`, it has the internet
        through a filter (see Network), ready on return. The zygote forks it when it can
        (see its section), else bwrap starts it."""
        began = time.monotonic()
        cgroup = self.limits.create(uuid.uuid4().hex[:12], limits)
        if self.zygote is not None and result_fd and base is None and not network \
                and self.zygote.serves(argv, cgroup):
            try:
                forked = self.zygote.spawn(argv, limits, cgroup)
            except BaseException:
                cgroup.remove()
                raise
            if forked is not None:
                return Started(forked[0], cgroup, forked[1], limits, began, (time.monotonic() - began) * 1000,
                               path="zygote")
        result_r = info_r = -1
        try:
            child_fds = [seccomp_fd(self.seccomp)]
            tail = []
            if result_fd:
                result_r, result_w = os.pipe()
                child_fds.append(result_w)
                tail = [str(result_w)]
            bwrap = base or self.base_argv
            if network:
                if self.network_argv is None:
                    raise SandboxError("networked sandboxes are off (FAAS_NETWORK=off)")
                info_r, info_w = os.pipe()
                child_fds.append(info_w)
                bwrap = [*self.network_argv, "--info-fd", str(info_w)]
            command = [*self.gate(limits, cgroup, network), *cgroup.command_prefix(), *bwrap,
                       "--seccomp", str(child_fds[0]), "--", *argv, *tail]
            try:
                proc = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=child_fds, env=SANDBOX_HOST_ENV, cwd="/")
            finally:
                for fd in child_fds:
                    os.close(fd)
        except BaseException:
            for fd in (result_r, info_r):
                if fd >= 0:
                    os.close(fd)
            cgroup.remove()
            raise
        started = Started(proc, cgroup, result_r, limits, began, 0)
        if network:
            try:
                started.network = self.network.attach(info_r, cgroup)
            except BaseException:
                self.discard(started)
                raise
        started.spawn_ms = (time.monotonic() - began) * 1000
        return started

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
        """End a sandbox that never got a request (pool recycling, failed start, shutdown):
        it would wait for one, so it is killed at once."""
        outcome = Outcome()
        self.finish(started, outcome, grace=0)
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

    def finish(self, started: "Started", outcome: Outcome, grace: float = 1.0) -> None:
        """End the run: kill whatever is left (the whole pid namespace dies with bwrap), reap,
        read the counters, remove the cgroup. Safe on a process that has already exited.
        After a normal end, the sandbox gets `grace` seconds to exit by itself."""
        proc, cgroup = started.proc, started.cgroup
        if started.result_r >= 0:
            os.close(started.result_r)
            started.result_r = -1
        # After a normal end every pipe is closed, which bwrap does only as it exits.
        code, cpu_seconds = reap(proc, grace if outcome.status == "ok" else 0)
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
        if started.network is not None:
            self.network.detach(started.network)
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
        if code not in (None, 0) and outcome.result is None and outcome.status != "timeout":
            # A zygote's call reports a failed set-up itself; a gate killed by a deadline
            # shorter than its start never joined, and that is a timeout. The gate's is inferred.
            outcome.joined = not proc.setup_error if isinstance(proc, ZygoteCall) else cgroup.joined()
        cgroup.remove()


# ==========================================================================================
# 5a. Pool
# ==========================================================================================
# Sandboxes started ahead of calls, per interpreter: a call takes one and a background
# thread starts its replacement once the answer is out.

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


REFILL_DELAY = 0.003   # seconds between an answer and the refill it triggers (see Pool.refill)


class Pool:
    """Sandboxes started ahead of calls, per interpreter argv: each already in its own cgroup
    with the default limits, its wrapper loaded and blocked on stdin. A call takes one (never
    waits for one), uses it once, and a background thread starts a replacement. Security is
    that of a cold sandbox: same flags, same limits, nothing shared between calls."""

    def __init__(self, sandbox: Sandbox, sizes: dict[tuple[str, ...], int], limits: Limits,
                 idle_seconds: float, network: bool = False) -> None:
        self.sandbox = sandbox
        self.network = network   # a pool of networked sandboxes (their own filter and slirp each)
        self.sizes = sizes
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.idle: dict[tuple[str, ...], list[Started]] = {argv: [] for argv in sizes}
        self.stats = {argv: {"hits": 0, "misses": 0, "started": 0, "spawn_ms_total": 0.0} for argv in sizes}
        self.lock = threading.Lock()
        self.extra: set[tuple[str, ...]] = set()   # added later (layers' warm sandboxes)
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
                idle = self.idle.get(argv)
                started = idle.pop(0) if idle else None
            if started is None or reap(started.proc, 0)[0] is None:
                break
            if not self.sandbox.discard(started).joined:   # died while idle: try the next one
                LOG.error("pool: a pre-started sandbox could not join its cgroups")
        if started is not None and limits.memory != started.limits.memory \
                and not started.cgroup.lower_memory(limits.memory):
            with self.lock:
                self.idle.get(argv, []).insert(0, started)   # fine for the next call; this one goes cold
            started = None
        with self.lock:
            if argv in self.stats:
                self.stats[argv]["hits" if started else "misses"] += 1
        return started

    def add(self, argv: tuple[str, ...], size: int) -> None:
        """Pre-start `size` sandboxes of another argv from now on (a library layer's warm
        interpreters); `remove` stops and ends them."""
        with self.lock:
            if argv in self.sizes:
                return
            self.sizes[argv] = size
            self.idle[argv] = []
            self.stats[argv] = {"hits": 0, "misses": 0, "started": 0, "spawn_ms_total": 0.0}
            self.extra.add(argv)
        if not self.thread.is_alive() and not self.closing.is_set():
            with contextlib.suppress(RuntimeError):   # started by a concurrent add
                self.thread.start()
        self.wake.set()

    def remove(self, argv: tuple[str, ...]) -> None:
        with self.lock:
            self.sizes.pop(argv, None)
            self.stats.pop(argv, None)
            self.extra.discard(argv)
            victims = self.idle.pop(argv, [])
        for started in victims:
            self.sandbox.discard(started)

    def refill(self) -> None:
        """Called once a call has its answer: a spawn started while a call runs slows that
        call down (a cgroup v1 move stalls every fork and exit on the machine). The fill
        thread still waits REFILL_DELAY: a spawn at once competes with the client reading
        the answer (measured with a local client on 2 cores: a pooled Python call 0.3 ms
        slower on the zygote path, whose refill starts within a fraction of a millisecond)."""
        self.wake.set()

    def fill_loop(self) -> None:
        while not self.closing.is_set():
            self.recycle_stale()
            argv = self.next_to_fill()
            if argv is None:
                if self.wake.wait(1.0):
                    self.closing.wait(REFILL_DELAY)
                self.wake.clear()
                continue
            try:
                started = self.sandbox.start(list(argv), self.limits, network=self.network)
            except Exception:   # a failed spawn must not kill the pool; calls fall back to cold
                LOG.exception("pool: could not start a sandbox")
                self.closing.wait(1.0)
                continue
            with self.lock:
                removed = argv not in self.idle
                if not removed:
                    self.idle[argv].append(started)
                    self.stats[argv]["started"] += 1
                    self.stats[argv]["spawn_ms_total"] += started.spawn_ms
            if removed:
                self.sandbox.discard(started)

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
            return {pool_name(argv): self.describe_one(argv)
                    for argv in self.stats if argv not in self.extra}

    def describe_one(self, argv: tuple[str, ...]) -> dict[str, Any]:
        stats = self.stats[argv]
        return {"size": self.sizes[argv], "idle": len(self.idle[argv]), "hits": stats["hits"],
                "misses": stats["misses"], "started": stats["started"],
                "spawn_ms_avg": round(stats["spawn_ms_total"] / stats["started"], 2) if stats["started"] else None}

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
# 5b. Sandbox identity
# ==========================================================================================
# Every namespace of a sandbox is owned by the user namespace bwrap creates as the sandbox's
# host uid, and any other process running as that uid on the host holds full capabilities
# over it. So the uid belongs to faas alone: a system user of its own, created when missing,
# and the server refuses to start while a host process that is not a sandbox runs as it.

def create_sandbox_user(name: str) -> None:
    """A locked system user and group without a home or a login shell."""
    done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                           "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment",
                           "faas sandboxes", name], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 9):   # 9: created meanwhile by another server starting
        raise ConfigError(f"cannot create the sandbox user {name!r} (FAAS_SANDBOX_USER): "
                          f"{done.stderr.strip() or 'useradd exited ' + str(done.returncode)}")


def sandbox_user_ids(name: str, create: bool) -> tuple[int, int]:
    """The uid and gid of the sandbox user, created first if missing and `create`."""
    import pwd
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise ConfigError(f"the sandbox user {name!r} (FAAS_SANDBOX_USER) does not exist; "
                              "`python3 faas.py install` or a server started as root creates it") from None
        create_sandbox_user(name)
        entry = pwd.getpwnam(name)
    if entry.pw_uid in (0, NOBODY):
        raise ConfigError(f"the sandbox user {name!r} (FAAS_SANDBOX_USER) has uid {entry.pw_uid}, "
                          "which is not faas's alone")
    return entry.pw_uid, entry.pw_gid


def foreign_processes(uid: int, ours: tuple[str, ...]) -> list[str]:
    """Processes of this user namespace running as `uid` that are not a sandbox's own start:
    setpriv and bwrap run as the uid here for a moment (the sandbox itself lives in a user
    namespace of its own). Any other such process would own every sandbox's namespaces."""
    own_userns = os.stat("/proc/self/ns/user").st_ino
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = read_text(f"/proc/{name}/status")
            uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
            if str(uid) not in uids or os.stat(f"/proc/{name}/ns/user").st_ino != own_userns:
                continue
            exe = os.readlink(f"/proc/{name}/exe")
        except (OSError, StopIteration):
            continue   # gone, or a kernel thread
        if exe not in ours:
            found.append(f"pid {name} ({exe})")
    return found


def resolve_sandbox_identity(config: Config, create: bool = True) -> Config:
    """The config with the sandbox's uid and gid filled in. As root: FAAS_SANDBOX_UID, else
    the FAAS_SANDBOX_USER system user (created if missing); refused when the uid is in use.
    Not root: sandboxes run as the server's own uid (there is no other to drop to)."""
    if os.geteuid() != 0:
        return dataclasses.replace(config, sandbox_uid=os.geteuid(), sandbox_gid=os.getegid())
    uid, gid = config.sandbox_uid, config.sandbox_gid
    if uid is None:
        uid, user_gid = sandbox_user_ids(config.sandbox_user, create=create)
        gid = gid or user_gid
    ours = tuple(str(Path(found).resolve()) for found in (shutil.which("bwrap"), shutil.which("setpriv")) if found)
    others = foreign_processes(uid, ours)
    if others:
        raise ConfigError(f"host uid {uid} (the sandbox user, FAAS_SANDBOX_USER/FAAS_SANDBOX_UID) is used by "
                          f"other processes: {', '.join(others[:5])}; it must belong to faas alone")
    return dataclasses.replace(config, sandbox_uid=uid, sandbox_gid=gid)


# ==========================================================================================
# 5c. Secrets
# ==========================================================================================
# Per-function values an operator sets (PUT /functions/<path>/secrets) and the function reads
# as environment variables. Write-only: names are listed, values never leave except into
# that function's sandboxes, and only through the request on the wrapper's stdin (a pooled
# sandbox is started without them; /proc/1/environ of a sandbox is bwrap's, which holds none).
# Stored apart from code and encrypted at rest: SecretBox below.

SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
RESERVED_SECRET_NAMES = {"PATH", "HOME", "LANG", "PWD"}   # what the sandbox sets itself
SECRETS_MAX = 64
SECRET_VALUE_MAX = 32 * 1024


def check_secrets(body: dict[str, Any]) -> dict[str, str]:
    """A PUT body: names of environment variables to string values."""
    if len(body) > SECRETS_MAX:
        raise ApiError(400, f"at most {SECRETS_MAX} secrets per function")
    for name, value in body.items():
        if not SECRET_NAME_RE.fullmatch(name):
            raise ApiError(400, f"secret name {name[:130]!r} is not an environment variable name: letters, "
                                "digits and '_', not starting with a digit, at most 128 characters")
        if name in RESERVED_SECRET_NAMES or name.startswith("LD_"):
            raise ApiError(400, f"secret name {name!r} is reserved: PATH, HOME, LANG, PWD and LD_* are the "
                                "sandbox's own")
        if not isinstance(value, str):
            raise ApiError(400, f"the value of secret {name!r} must be a string")
        if "\0" in value or len(value.encode()) > SECRET_VALUE_MAX:
            raise ApiError(400, f"the value of secret {name!r} must be at most {SECRET_VALUE_MAX} bytes "
                                "without NUL characters")
    return body


class SecretBox:
    """Authenticated encryption from the standard library alone (there is no AES in it):
    encrypt-then-MAC with two keys derived from the master key by HMAC-SHA256.
    Keystream block i = HMAC-SHA256(enc_key, nonce || i), XORed with the plaintext (a PRF in
    counter mode); tag = HMAC-SHA256(mac_key, version || path || nonce || ciphertext), checked
    in constant time before anything is decrypted. The nonce is 16 random bytes per seal.
    The function's path is authenticated too: a sealed value moved to another function in
    the store does not open there."""
    VERSION = b"\x01"

    def __init__(self, master: bytes) -> None:
        self.enc_key = hmac.new(master, b"faas secrets: encryption", hashlib.sha256).digest()
        self.mac_key = hmac.new(master, b"faas secrets: authentication", hashlib.sha256).digest()

    def xor_keystream(self, nonce: bytes, data: bytes) -> bytes:
        stream = b"".join(hmac.new(self.enc_key, nonce + block.to_bytes(8, "big"), hashlib.sha256).digest()
                          for block in range((len(data) + 31) // 32))[:len(data)]
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")

    def tag(self, path: str, nonce: bytes, ciphertext: bytes) -> bytes:
        label = path.encode()
        return hmac.new(self.mac_key, self.VERSION + len(label).to_bytes(4, "big") + label + nonce + ciphertext,
                        hashlib.sha256).digest()

    def seal(self, path: str, plaintext: bytes) -> str:
        nonce = os.urandom(16)
        ciphertext = self.xor_keystream(nonce, plaintext)
        return base64.b64encode(self.VERSION + nonce + self.tag(path, nonce, ciphertext) + ciphertext).decode()

    def open(self, path: str, sealed: str) -> bytes | None:
        """The plaintext, or None if the value was not sealed for this path with this key."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except ValueError:
            return None
        version, nonce, tag, ciphertext = raw[:1], raw[1:17], raw[17:49], raw[49:]
        if version != self.VERSION or len(tag) != 32 or not hmac.compare_digest(tag, self.tag(path, nonce, ciphertext)):
            return None
        return self.xor_keystream(nonce, ciphertext)


def secret_master_key(config: Config) -> bytes:
    """FAAS_SECRET_KEY, else 32 random bytes in <data dir>/secret.key, created 0600 on first use."""
    if config.secret_key:
        return config.secret_key.encode()
    path = config.data_dir / "secret.key"
    config.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            LOG.warning("%s is readable by other users: chmod 600 it", path)
        try:
            key = bytes.fromhex(path.read_text().strip())
        except ValueError:
            key = b""
        if len(key) < 16:
            raise ConfigError(f"{path} does not hold a key (64 hex digits)") from None
        return key
    with os.fdopen(fd, "w") as file:
        file.write(os.urandom(32).hex() + "\n")
    LOG.info("created the secrets key %s (back it up with the store, or set FAAS_SECRET_KEY)", path)
    return bytes.fromhex(path.read_text().strip())


class SQLiteSecrets:
    """A table of its own beside the versions: names in clear, the values sealed."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        with store.connection() as db:
            db.execute("CREATE TABLE IF NOT EXISTS secrets (path TEXT PRIMARY KEY, names TEXT NOT NULL, "
                       "sealed TEXT NOT NULL, updated REAL NOT NULL)")

    def put(self, path: str, names: list[str], sealed: str) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO secrets VALUES (?,?,?,?)", (path, json.dumps(names), sealed, time.time()))

    def get(self, path: str) -> tuple[list[str], str] | None:
        rows = self.store.rows("SELECT names, sealed FROM secrets WHERE path=?", (path,))
        return (json.loads(rows[0][0]), rows[0][1]) if rows else None

    def delete(self, path: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM secrets WHERE path=?", (path,))


class RedisSecrets:
    """One hash per function, `<prefix>secrets:<path>` (names, sealed), apart from its code."""

    def __init__(self, store: RedisStore) -> None:
        self.redis = store.redis
        self.prefix = store.prefix

    def key(self, path: str) -> str:
        return f"{self.prefix}secrets:{path}"

    def put(self, path: str, names: list[str], sealed: str) -> None:
        self.redis.hset(self.key(path), mapping={"names": json.dumps(names), "sealed": sealed,
                                                 "updated": repr(time.time())})

    def get(self, path: str) -> tuple[list[str], str] | None:
        names, sealed = self.redis.hmget(self.key(path), "names", "sealed")
        return (json.loads(names), sealed.decode()) if names is not None and sealed is not None else None

    def delete(self, path: str) -> None:
        self.redis.delete(self.key(path))


class Secrets:
    """The secrets of every function: set, listed by name, handed to its calls."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.stored = RedisSecrets(store) if isinstance(store, RedisStore) else SQLiteSecrets(store)
        self.lock = threading.Lock()
        self.sealer: SecretBox | None = None

    def box(self) -> SecretBox:
        with self.lock:
            if self.sealer is None:
                try:
                    self.sealer = SecretBox(secret_master_key(self.config))
                except (ConfigError, OSError) as error:
                    LOG.error("secrets key: %s", error)
                    raise ApiError(500, "the server's secrets key cannot be read (see its log; "
                                        "FAAS_SECRET_KEY or secret.key in the data directory)") from None
            return self.sealer

    def replace(self, path: str, values: dict[str, str]) -> list[str]:
        """The function's secrets become exactly `values` ({} removes them all)."""
        if not values:
            self.stored.delete(path)
            return []
        names = sorted(values)
        self.stored.put(path, names, self.box().seal(path, json.dumps(values).encode()))
        return names

    def names(self, path: str) -> list[str]:
        found = self.stored.get(path)
        return found[0] if found else []

    def env(self, path: str) -> dict[str, str]:
        """The values for one call of the function at `path`."""
        found = self.stored.get(path)
        return self.open(path, found[1]) if found is not None else {}

    def open(self, path: str, sealed: str) -> dict[str, str]:
        plaintext = self.box().open(path, sealed)
        if plaintext is None:
            raise ApiError(500, f"the secrets of '{path}' cannot be decrypted with this server's key: "
                                "set them again, or give every server the same FAAS_SECRET_KEY")
        return json.loads(plaintext)

    def delete(self, path: str) -> None:
        self.stored.delete(path)


# ==========================================================================================
# 5d. Network
# ==========================================================================================
# Opt-in internet for a function (research/network.md): the gate, still root, makes the
# sandbox a network namespace of its own (`unshare --net`, owned by the init user namespace
# so only host root may change it) and loads an nftables egress filter into it before
# anything else runs there; bwrap keeps that namespace (--share-net) and reports its child
# on --info-fd; faas then attaches slirp4netns (a user-mode TCP/IP stack: no host bridge,
# NAT or forwarding) and sends the request only once slirp is ready. The filter refuses the
# host itself (loopback by any address, slirp's gateway alias, every host address), its
# on-link networks, private, shared, link-local and multicast ranges, and FAAS_NETWORK_DENY;
# a broken filter stops the gate before bwrap, so a call fails closed. IPv4 only: slirp
# offers no IPv6 route (and the filter refuses private IPv6 ranges besides).

NETWORK_MODES = ("none", "internet")
SLIRP_DNS = "10.0.2.3"      # slirp's forwarder to the host's resolver
BLOCKED4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
            "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3")
BLOCKED6 = ("::/127", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "fc00::/7",
            "fe80::/10", "fec0::/10", "ff00::/8")
SANDBOX_ETC = {
    "resolv.conf": f"nameserver {SLIRP_DNS}\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n127.0.1.1 sandbox\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def check_network(value: Any) -> str:
    if value is None:
        return "none"
    if value not in NETWORK_MODES:
        raise ApiError(400, f"network must be one of {', '.join(repr(mode) for mode in NETWORK_MODES)}")
    return value


def parse_networks(name: str, text: str) -> tuple[str, ...]:
    """FAAS_NETWORK_DENY: comma-separated addresses or CIDR ranges, IPv4 or IPv6."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an address or a CIDR range") from None
    return tuple(found)


def host_networks() -> tuple[list[str], list[str]]:
    """This host's own IPv4 addresses and on-link IPv4 networks, and its IPv6 addresses, as
    the kernel reports them for the server's network namespace (/proc, ~0.2 ms)."""
    v4: list[str] = []
    last = ""
    for line in read_text("/proc/net/fib_trie").splitlines():
        text = line.strip()
        if text.startswith(("|--", "+--")):
            last = text[3:].split()[0]
        elif text.startswith("/32 host LOCAL") and last:
            v4.append(last)
    for row in read_text("/proc/net/route").splitlines()[1:]:
        fields = row.split()
        if len(fields) >= 8 and fields[0] != "lo" and int(fields[2], 16) == 0 and int(fields[7], 16) != 0:
            network = socket.inet_ntoa(struct.pack("<I", int(fields[1], 16)))
            mask = socket.inet_ntoa(struct.pack("<I", int(fields[7], 16)))
            v4.append(str(ipaddress.ip_network(f"{network}/{mask}", strict=False)))
    v6 = [str(ipaddress.IPv6Address(bytes.fromhex(row.split()[0])))
          for row in read_text("/proc/net/if_inet6").splitlines() if row.strip()]
    return sorted(set(v4)), sorted(set(v6))


def nft_ruleset(blocked4: list[str], blocked6: list[str], max_connections: int, rate: int | None) -> str:
    """The egress filter of one networked sandbox's network namespace. Refusals are
    rejects, not drops: a blocked connect fails at once (EHOSTUNREACH) instead of hanging."""
    limit = (f"    limit rate over {rate} bytes/second burst {max(rate // 4, 65536)} bytes drop\n"
             if rate else "")
    return (
        "table inet faas {\n"
        f"  set blocked4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {', '.join(blocked4)} }} }}\n"
        f"  set blocked6 {{ type ipv6_addr; flags interval; auto-merge; elements = {{ {', '.join(blocked6)} }} }}\n"
        "  chain out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        '    oifname "lo" accept\n'
        f"    meta l4proto {{ tcp, udp }} ip daddr {SLIRP_DNS} th dport 53 accept\n"
        "    ip daddr @blocked4 reject with icmpx type admin-prohibited\n"
        "    ip6 daddr @blocked6 reject with icmpx type admin-prohibited\n"
        f"    meta l4proto tcp ct state new ct count over {max_connections} reject with tcp reset\n"
        f"{limit}"
        "  }\n"
        + (f"  chain in {{\n    type filter hook input priority 0; policy accept;\n"
           f'    iifname "lo" accept\n{limit}  }}\n' if rate else "")
        + "}\n")


@dataclasses.dataclass
class NetworkHelper:
    """The slirp4netns of one networked sandbox: it exits when exit_w closes (also when the
    server dies), and is killed and reaped by `Network.detach` at the end of the call."""
    slirp: subprocess.Popen
    exit_w: int


class Network:
    """Everything networked sandboxes need: the tools, the filter file, the /etc files."""
    READY_TIMEOUT = 10.0

    def __init__(self, config: Config, runtime_dir: Path) -> None:
        self.config = config
        self.enabled = config.network == "allow"
        self.directory = runtime_dir / "net"
        self.rules_file = self.directory / "net.nft"
        self.rules = ""
        self.changed_at = 0.0   # monotonic time of the last change of the rules
        self.lock = threading.Lock()
        self.current = Every(2.0, self.refresh)
        if self.enabled:
            self.tools = self.find_tools()
            self.directory.mkdir(mode=0o755, exist_ok=True)
            for name, text in SANDBOX_ETC.items():
                (self.directory / name).write_text(text)
                os.chmod(self.directory / name, 0o644)
            self.refresh()
            self.self_test()

    @staticmethod
    def find_tools() -> dict[str, str]:
        if os.geteuid() != 0:
            raise ConfigError("FAAS_NETWORK=allow needs the server to run as root: it makes each networked "
                              "sandbox's network namespace and loads its filter")
        tools = {name: shutil.which(name) for name in ("unshare", "nft", "slirp4netns")}
        missing = [name for name, found in tools.items() if not found]
        if missing or not Path("/dev/net/tun").exists():
            raise ConfigError(f"FAAS_NETWORK=allow needs {', '.join(missing) or '/dev/net/tun'}: "
                              "apt-get install -y slirp4netns nftables util-linux (or run `faas.py check`)")
        return {name: str(found) for name, found in tools.items()}

    def ruleset(self) -> str:
        own4, own6 = host_networks()
        deny = self.config.network_deny
        blocked4 = [*BLOCKED4, *own4, *(n for n in deny if ":" not in n)]
        blocked6 = [*BLOCKED6, *own6, *(n for n in deny if ":" in n)]
        return nft_ruleset(blocked4, blocked6, self.config.network_max_connections, self.config.network_rate)

    def refresh(self) -> str:
        """Rewrite the filter file when the host's addresses changed (checked every 2 s)."""
        rules = self.ruleset()
        with self.lock:
            if rules != self.rules:
                staged = self.rules_file.with_suffix(".new")
                staged.write_text(rules)
                staged.replace(self.rules_file)
                self.rules = rules
                self.changed_at = time.monotonic()
        return rules

    def current_for(self, started: "Started") -> bool:
        """Whether a pre-started sandbox's filter was loaded from the current rules (a host
        address that changed since must be blocked too)."""
        self.current()
        return started.born >= self.changed_at

    def self_test(self) -> None:
        """Load the filter once into a throw-away namespace: a server that could not filter
        does not start (instead of failing every networked call)."""
        done = subprocess.run([self.tools["unshare"], "--net", "--", self.tools["nft"], "-f", str(self.rules_file)],
                              capture_output=True, text=True, check=False, timeout=30)
        if done.returncode != 0:
            raise ConfigError(f"FAAS_NETWORK=allow: the network filter does not load: {done.stderr.strip()[-400:]}")

    def gate_prefix(self) -> list[str]:
        self.current()
        return [self.tools["unshare"], "--net", "--"]

    def gate_step(self) -> str:
        return f"{shlex.quote(self.tools['nft'])} -f {shlex.quote(str(self.rules_file))}"

    def sandbox_argv(self, base_argv: list[str]) -> list[str]:
        """bwrap's argv for a networked sandbox: the gate's namespace kept, a resolver, hosts
        and CA certificates; added before the root is made read-only."""
        at = next(i for i in range(len(base_argv) - 1) if base_argv[i:i + 2] == ["--remount-ro", "/"])
        etc = [arg for name in SANDBOX_ETC for arg in ("--ro-bind", str(self.directory / name), f"/etc/{name}")]
        return [*base_argv[:at], "--share-net", *etc, "--ro-bind-try", "/etc/ssl/certs", "/etc/ssl/certs",
                *base_argv[at:]]

    def attach(self, info_r: int, cgroup: RunCgroup) -> NetworkHelper:
        """Read the sandbox's pid from bwrap's info fd, then start slirp4netns into its network
        namespace (in the run's cgroups) and wait until it is ready. SandboxError if not."""
        deadline = time.monotonic() + self.READY_TIMEOUT
        info = read_until_eof(info_r, deadline)
        try:
            child = json.loads(info)["child-pid"]
            netns = os.open(f"/proc/{child}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except (ValueError, KeyError, TypeError, OSError):
            raise SandboxError("a networked sandbox did not start (its network filter could not be loaded)") from None
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            if os.fstat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino:
                raise SandboxError("a networked sandbox shares the server's network namespace")
            join = [f"echo 0 > {shlex.quote(path)}" for path in cgroup.join_files()]
            # slirp4netns --enable-sandbox makes only "/" private before it pivots and detaches
            # the old root: from the server's own mount namespace that unmount would propagate
            # and take mounts below the host's shared mounts with it (measured: /run/netns/*).
            # So it starts in a mount namespace of its own, every mount private.
            slirp = subprocess.Popen(
                ["/bin/sh", "-c", " && ".join([*join, 'exec "$@"']), "faas-slirp",
                 self.tools["unshare"], "--mount", "--propagation", "private", "--", self.tools["slirp4netns"],
                 "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp",
                 f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", "--netns-type=path", f"/proc/self/fd/{netns}", "tap0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=[netns, ready_w, exit_r], env=SANDBOX_HOST_ENV, cwd="/")
        except BaseException:
            os.close(exit_w)
            raise
        finally:
            for fd in (netns, ready_w, exit_r):
                os.close(fd)
        helper = NetworkHelper(slirp, exit_w)
        ready = read_until_eof(ready_r, deadline, stop_at=1)
        if ready != b"1":
            self.detach(helper)
            error = slirp.stderr.read().decode("utf-8", "replace").strip()[-300:] if slirp.stderr else ""
            raise SandboxError(f"slirp4netns did not connect a networked sandbox: {error or 'not ready in time'}")
        return helper

    @staticmethod
    def detach(helper: NetworkHelper) -> None:
        if helper.exit_w >= 0:
            os.close(helper.exit_w)
            helper.exit_w = -1
        helper.slirp.kill()
        reap(helper.slirp, 5.0)
        if helper.slirp.stderr:
            helper.slirp.stderr.close()


# -- faas.py check ---------------------------------------------------------------------------
SELF_TEST_PY = """import errno, socket
out = {}
for host, port in event:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        out[host] = "OPEN"
    except socket.timeout:
        out[host] = "TIMEOUT"
    except OSError as e:
        out[host] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
return out"""


def network_dependencies(config: Config) -> list[Any]:
    """What networked calls need: required with FAAS_NETWORK=allow, else optional."""
    required = config.network == "allow"
    found = []
    for name, package, version_flag in (("slirp4netns", "slirp4netns", "--version"), ("nft", "nftables", "--version"),
                                        ("unshare", "util-linux", "--version")):
        path = shutil.which(name)
        found.append(Dependency(name, bool(path), f"{path} ({version_of([path, version_flag])})" if path
                                else "networked calls (FAAS_NETWORK=allow)", f"apt-get install -y {package}",
                                package, required=required))
    found.append(Dependency("/dev/net/tun", Path("/dev/net/tun").exists(), "slirp4netns's tap device",
                            "modprobe tun", None, required=required))
    found.append(Dependency("root", os.geteuid() == 0, "networked sandboxes are set up as root",
                            "run the server as root (faas.service does)", None, required=required))
    return found


def network_self_test(config: Config, port: int) -> tuple[bool, str]:
    """Load the filter into a throw-away namespace, then start one networked sandbox and try
    the faas port through slirp's gateway alias and through this host's own address: both
    must fail. Every packet stays on this machine (never a LAN or metadata address)."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="faas-check-"))
    try:
        config = dataclasses.replace(resolve_sandbox_identity(config, create=False), network="allow")
        sandbox = Sandbox(config, RlimitBackend(), runtime_dir)   # Network() loads the filter once
        listed = subprocess.run([*sandbox.network.gate_prefix(), "/bin/sh", "-c", f"{sandbox.network.gate_step()} && "
                                 f"{shlex.quote(sandbox.network.tools['nft'])} list table inet faas"],
                                capture_output=True, text=True, check=False)
        if listed.returncode != 0 or "blocked4" not in listed.stdout:
            return False, f"the filter did not list in a fresh namespace: {listed.stderr.strip()[-300:]}"
        own4 = [a for a in host_networks()[0] if "/" not in a and not a.startswith("127.")]
        targets = [["10.0.2.2", port], *([[own4[0], port]] if own4 else [])]
        request = json.dumps({"code": SELF_TEST_PY, "event": targets, "language": "python"}).encode()
        limits = dataclasses.replace(Limits.from_config(config), timeout=20)
        started = sandbox.start(list(RUNTIMES["python"].argv), limits, network=True)
        outcome = sandbox.complete(started, request, limits, None)
        result = (outcome.result or {}).get("value")
        if not isinstance(result, dict) or any(v == "OPEN" for v in result.values()):
            return False, f"a networked sandbox reached this host: {result or describe_failure(outcome, limits)}"
        return True, ", ".join(f"{host}:{port} {result[host]}" for host, port in targets)
    except (ConfigError, SandboxError, OSError) as error:
        return False, str(error)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def describe_network(config: Config) -> str:
    if config.network != "allow":
        return "off (FAAS_NETWORK=off: functions have no network)"
    own4, own6 = host_networks()
    resolvers = re.findall(r"^\s*nameserver\s+(\S+)", read_text("/etc/resolv.conf"), re.MULTILINE)
    return (f"allow: blocks {len(BLOCKED4) + len(BLOCKED6)} ranges + {len(own4) + len(own6)} host addresses/networks"
            f" + {len(config.network_deny)} FAAS_NETWORK_DENY; at most {config.network_max_connections} connections"
            f" per call; DNS via {', '.join(resolvers) or 'none'} (the host's resolver)")


def read_until_eof(fd: int, deadline: float, stop_at: int = 0) -> bytes:
    """What a pipe delivers until its writers close it (or `stop_at` bytes, or the deadline);
    closes fd."""
    data = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not stop_at or len(data) < stop_at:
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    break
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(fd)
    return data


# ==========================================================================================
# 5e. Zygote
# ==========================================================================================
# Python calls are forked from one long-lived, pre-imported interpreter instead of a
# bwrap + interpreter start each (research/forkserver.md, design (a)): ~7 ms of CPU per
# call instead of ~25. The zygote runs in a bwrap sandbox of its own whose uid 0 is faas's
# sandbox uid on the host and whose capabilities exist in its own user namespace only; every call is a
# child in fresh namespaces that gives all of them up before the request is read
# (wrappers/zygote.py). This section sits below Sandbox.start: the run's cgroup, the pool,
# complete/pump/finish and outcomes are the same on both paths. While no zygote is up,
# and for calls it cannot serve (networked calls, systemd-run scopes, directories outside
# what it exposes), Sandbox.start takes the bwrap path.

ZYGOTE_IN_SANDBOX = f"{WRAPPERS_IN_SANDBOX}/zygote.py"
ZYGOTE_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_ADMIN")   # in its user ns only
ZYGOTE_ALLOWED = ("mount", "unshare")   # what the zygote needs of the deny-list
ZYGOTE_READY_SECONDS = 15.0
ZYGOTE_FORK_SECONDS = 3.0   # a zygote that has not forked a call by then is hung (stopped): replaced
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
        self.forked = threading.Event()   # the zygote cloned the call's process
        self.answered = threading.Event()   # forked, refused, or the zygote is gone

    def exit(self, code: int, cpu_seconds: float | None) -> None:
        self.returncode, self.cpu_seconds = code, cpu_seconds
        self.exited.set()
        self.answered.set()

    def close(self) -> None:
        """The server's ends of the pipes, for a call that never ran."""
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()

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
        self.hung = False   # killed because it did not fork a call in time
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        machine = platform.machine()
        fds = [seccomp_fd(seccomp_program(machine, ZYGOTE_ALLOWED, refuse_new_userns=True)),
               seccomp_fd(seccomp_program(machine, refuse_new_userns=True)), theirs.fileno()]
        base = sandbox.base_argv   # a call's uid and gid are those a bwrap sandbox has
        command = [*argv, "--seccomp", str(fds[0]), "--", "/usr/bin/python3", "-I", ZYGOTE_IN_SANDBOX,
                   str(fds[2]), str(fds[1]), base[base.index("--uid") + 1], base[base.index("--gid") + 1]]
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

    def spawn(self, args: list[str], limits: Limits, cgroup: RunCgroup,
              backend_name: str) -> tuple[ZygoteCall, int] | None:
        """Ask the zygote for a call's sandbox: (the call, the result pipe's read end), or
        None when this zygote cannot take it (dead, retired, ended before it forked the
        call, or hung: then it is killed), and the caller takes the bwrap path."""
        token = uuid.uuid4().hex[:16]
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(4)]   # stdin, stdout, stderr, result
        ours = [pipes[0][1], *(read_end for read_end, _ in pipes[1:])]
        theirs = [pipes[0][0], *(write_end for _, write_end in pipes[1:])]
        call = ZygoteCall(self, token, *ours[:3])
        taken = False
        try:
            joins = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup.join_files()]
            theirs += joins
            request = {"id": token, "args": args, "limits": rlimit_values(limits, backend_name),
                       "cgroups": len(joins)}
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
                call.close()
                os.close(ours[3])
        if not taken:
            return None
        if not call.answered.wait(ZYGOTE_FORK_SECONDS):
            self.hang()
        if call.forked.is_set() or call.setup_error is not None:   # refused: complete reports it
            return call, ours[3]
        with self.lock:
            self.calls.pop(token, None)
        call.close()
        os.close(ours[3])
        return None

    def hang(self) -> None:
        """The zygote did not fork a call in time (stopped, or stuck): no more calls go to
        it, and it is killed; its dispatcher then ends its calls and a new one is started."""
        with self.lock:
            if self.dead:
                return
            self.dead = self.hung = True
        LOG.error("zygote %d did not fork a call within %.0f s: killed; calls take the bwrap path until "
                  "another is up", self.generation, ZYGOTE_FORK_SECONDS)
        self.cgroup.kill()
        self.proc.kill()   # with --die-with-parent, the zygote and its calls go too (rlimit mode: no cgroup)

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
            if kind == "forked":
                self.forked(rest)
            elif kind == "exit":
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

    def forked(self, token: str) -> None:
        with self.lock:
            call = self.calls.get(token)
        if call is not None:
            call.forked.set()
            call.answered.set()

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

    def __init__(self, sandbox: Sandbox, backend: LimitBackend, config: Config) -> None:
        self.sandbox, self.backend, self.config = sandbox, backend, config
        self.argv = self.build_argv()
        self.python = RUNTIMES["python"].argv
        self.current: ZygoteProcess | None = None
        self.lock = threading.Lock()
        self.stats = {"started": 0, "died": 0, "recycled": 0, "calls": 0, "fallbacks": 0, "start_failures": 0,
                      "hung": 0}
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.first_try = threading.Event()
        self.retiring: set[ZygoteProcess] = set()
        self.restart_after = 0.0
        self.thread = threading.Thread(target=self.supervise, name="zygote", daemon=True)
        self.thread.start()
        self.first_try.wait(ZYGOTE_READY_SECONDS + 5)

    def build_argv(self) -> list[str]:
        """faas's bwrap flags, except: uid/gid 0 in the sandbox's user namespace (faas's
        sandbox uid on the host), user namespaces allowed (each call makes its own; the seccomp rule refuses
        them to calls), the ZYGOTE_CAPABILITIES there instead of none (SETFCAP maps the
        zygote's uid 0 in a call's user namespace, NET_ADMIN brings up a call's lo). A
        nested user namespace or --disable-userns would lock the mounts and calls could not
        mount a fresh /proc. The library layers of base_argv are there for every call."""
        argv = list(self.sandbox.base_argv)
        argv.remove("--disable-userns")
        argv[argv.index("--uid") + 1] = "0"
        argv[argv.index("--gid") + 1] = "0"
        at = argv.index("--cap-drop")
        argv[at:at + 2] = [flag for cap in ZYGOTE_CAPABILITIES for flag in ("--cap-add", cap)]
        return argv

    def serves(self, argv: list[str], cgroup: RunCgroup) -> bool:
        """Python calls placed by cgroup files (not a systemd-run scope). Networked calls and
        layer builds never get here (see Sandbox.start)."""
        return tuple(argv[:len(self.python)]) == self.python and not cgroup.command_prefix()

    def spawn(self, argv: list[str], limits: Limits, cgroup: RunCgroup) -> tuple[ZygoteCall, int] | None:
        """A call's sandbox forked by the zygote, or None (the caller takes the bwrap path)."""
        with self.lock:
            current = self.current
        forked = None
        if current is not None:
            forked = current.spawn(argv[len(self.python):], limits, cgroup, self.backend.name)
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
                self.stats["hung"] += process.hung
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

    def __init__(self, config: Config, store: Store, sandbox: Sandbox, pool: Pool, metrics: Metrics,
                 layers: Layers, secrets: "Secrets", network_pool: Pool | None = None) -> None:
        self.config = config
        self.store = store
        self.layers = layers
        self.secrets = secrets
        self.sandbox = sandbox
        self.pool = pool
        self.network_pool = network_pool
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
        if number is None:
            if version is None:
                raise ApiError(404, f"no function at path '{path}'")
            raise ApiError(404, f"function '{path}' has no version {version}")
        return self.stored(path, number)

    def stored(self, path: str, number: int) -> Version:
        """A version the store has just said exists (its content is read once, then from memory)."""
        found = self.versions.get((path, number))
        if found is None:
            found = self.store.get(path, number)
            if found is None:
                raise ApiError(404, f"function '{path}' has no version {number}")
            self.versions.put((path, number), found, len(found.code) + len(found.compiled or ""))
        return found

    def needs(self, version: Version, env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a stored version needs to run on this server, settled before it takes a slot:
        the operator's leave to use the internet, its libraries' layer (built here first if
        this node lacks it, which is not charged to the timeout), its function's secrets
        (read here unless the caller has them: `env`, from a Redis claim). Returns invoke's
        keyword arguments and the answer's extra fields."""
        if version.network == "internet" and self.config.network != "allow":
            raise ApiError(403, f"version {version.version} of '{version.path}' uses the internet, but network "
                                "access is disabled on this server (FAAS_NETWORK=off); the operator must set "
                                "FAAS_NETWORK=allow, or upload a version without network", reason="network_disabled")
        extra: dict[str, Any] = {}
        if version.deps:
            layer = self.layers.ensure(version.deps)
            if not layer.cached:
                extra["deps_build_ms"] = layer.build_ms
        if env is None:
            env = self.secrets.env(version.path)
        return {"deps": version.deps, "env": env, "network": version.network}, extra

    def invoke(self, function: str, runtime: Runtime, code: str, event: Any, limits: Limits,
               sink: LineSink | None, on_start: Callable[[], None] | None = None, reserved: bool = False,
               on_sandbox: Callable[[Started], None] | None = None, deps: dict[str, Any] | None = None,
               env: dict[str, str] | None = None, network: str = "none"
               ) -> tuple[int, dict[str, Any], Callable[[], None]]:
        """Run one call: (HTTP status, answer, what to do once the answer is sent). `on_start`
        runs once a slot is taken, so a stream only begins when the call will really run
        (an overloaded server answers 429 as JSON). `reserved`: the caller holds a slot
        (a queued call); `on_sandbox` gets the sandbox (to kill it when the call is cancelled).
        `deps`: the version's libraries, whose layer exists on this node (Layers.ensure) and
        is held until the sandbox is gone. `env`: the function's secrets."""
        request = json.dumps({"code": code, "event": event, "language": runtime.language,
                              **layer_request(deps), **({"env": env} if env else {})}).encode()
        networked = network == "internet"
        warm = self.layers.warm_argv(runtime, deps, code) if deps and not networked else None
        holding = self.layers.using(deps["key"]) if deps else contextlib.nullcontext()
        holding.__enter__()
        try:
            with contextlib.nullcontext() if reserved else self.slots:
                if on_start is not None:
                    on_start()
                outcome = self.run_sandboxed(runtime.argv, request, limits, sink, warm, networked, on_sandbox)
        except BaseException:
            holding.__exit__(None, None, None)
            raise
        try:
            status, answer = build_answer(outcome, limits)
        except BaseException:
            outcome.cleanup()
            holding.__exit__(None, None, None)
            raise
        self.metrics.inc("faas_calls_total", function=function, language=runtime.language, status=outcome.status)
        self.metrics.observe("faas_call_duration_seconds", outcome.duration_ms / 1000, language=runtime.language)
        self.metrics.observe("faas_function_duration_seconds", outcome.duration_ms / 1000, function=function)
        self.metrics.observe("faas_sandbox_spawn_seconds", outcome.spawn_ms / 1000)
        self.metrics.inc("faas_calls_by_spawn_path_total", language=runtime.language, path=outcome.spawn_path)
        with self.paths_lock:
            self.paths[(runtime.language, outcome.spawn_path)] += 1

        def after_answer() -> None:
            """End the sandbox, then start its replacement: neither slows the answer."""
            outcome.cleanup()
            holding.__exit__(None, None, None)
            (self.network_pool if networked and self.network_pool else self.pool).refill()
        return status, answer, after_answer

    def spawn_paths(self) -> dict[str, dict[str, int]]:
        """Calls per language and the path their sandbox took (zygote or bwrap)."""
        with self.paths_lock:
            counts = dict(self.paths)
        paths: dict[str, dict[str, int]] = {}
        for (language, path), count in sorted(counts.items()):
            paths.setdefault(language, {})[path] = count
        return paths

    def run_sandboxed(self, argv: tuple[str, ...], request: bytes, limits: Limits, sink: LineSink | None,
                      warm: tuple[str, ...] | None = None, networked: bool = False,
                      on_sandbox: Callable[[Started], None] | None = None) -> Outcome:
        """A pre-started sandbox when the pool has one (for libraries, one that already
        imported the version's libraries first), else a cold one: never a wait. A networked
        call takes one of the networked pool, whose filter must be current."""
        if networked:
            started = self.network_pool.take(argv, limits) if self.network_pool is not None else None
            if started is not None and not self.sandbox.network.current_for(started):
                self.sandbox.discard(started)
                started = None
        else:
            started = (self.pool.take(warm, limits) if warm else None) or self.pool.take(argv, limits)
        if started is None:
            started = self.sandbox.start([*argv, "--cold"], limits, network=networked)
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
# 6b. Calls: records, the calls this server runs, waiters and workers
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
    return 0 if version.network == "internet" else configured


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


# the stored answer (JSON) of a call that waited too long to start, on either store
EXPIRED_ANSWER = json.dumps(final_answer("expired", "the call was not started within FAAS_ASYNC_MAX_AGE"))


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
        self.arrived = threading.Event()   # someone registered: wakes a pausing reader of completions

    def register(self, call_id: str) -> threading.Event:
        event = threading.Event()
        with self.lock:
            self.events.setdefault(call_id, []).append(event)
        self.arrived.set()
        return event

    def pause(self, seconds: float) -> None:
        """Let completions gather for up to `seconds`, or until someone new waits for one."""
        self.arrived.clear()
        self.arrived.wait(seconds)

    def unregister(self, call_id: str, event: threading.Event) -> None:
        with self.lock:
            events = self.events.get(call_id, [])
            if event in events:
                events.remove(event)
            if not events:
                self.events.pop(call_id, None)

    def notify(self, call_id: str) -> bool:
        """Wake the waiters of `call_id`; whether there were any."""
        with self.lock:
            events = self.events.get(call_id, ())
            for event in events:
                event.set()
            return bool(events)


def is_final(record: dict[str, Any]) -> bool:
    return record["status"] in CALL_FINAL


class Workers:
    """Threads that run claimed calls, kept for the next call: starting a thread per call
    cost about a tenth of a millisecond of CPU. About as many as run slots ever ran at
    once, since every task holds a slot (a task given while a worker has released its slot
    but is not idle yet starts one more)."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def run(self, task: Callable[[], None]) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
                self.tasks.put(task)
                return
        threading.Thread(target=self.work, args=(task,), name="call-worker", daemon=True).start()

    def work(self, task: Callable[[], None]) -> None:
        while True:
            try:
                task()
            except Exception:
                LOG.exception("a call worker's task failed")
            with self.lock:
                self.idle += 1
            task = self.tasks.get()


# ==========================================================================================
# 6c. Calls: submit, run, wait, follow, cancel, spill (on either store)
# ==========================================================================================


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
        self.workers = Workers()
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
                  "status": "queued", "request": {"input": event, "limits": dict(vars(limits))},
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
        """Run a claimed call on a worker thread; the caller has taken a run slot for it."""
        running = self.adopt(record)
        self.workers.run(lambda: self.execute(running))

    def adopt(self, record: dict[str, Any]) -> RunningCall:
        """A claimed call becomes one this server runs (a cancel may already wait for it)."""
        running = RunningCall(record)
        with self.lock:
            self.running[running.id] = running
            cancelled = running.id in self.cancel_requested
        if cancelled:
            running.cancel()
        return running

    def execute(self, running: RunningCall | None) -> None:
        """Run a claimed call, then each call its final write claimed, on this thread: handing
        them to another worker cost a wake-up and a switch of the interpreter lock per call."""
        while running is not None:
            running = self.execute_one(running)

    def execute_one(self, running: RunningCall) -> RunningCall | None:
        """Run a claimed call and store its result. While calls are queued and no request
        waits for a slot, the same write claims the next queued call, which inherits the
        slot: under load a call costs one write less and no wake-up of the consumer. Gives
        that call, once this one's sandbox is cleaned up."""
        record = running.record
        self.metrics.observe("faas_call_queue_wait_seconds", max(0.0, record["started"] - record["created"]))
        after_answer: Callable[[], None] = lambda: None
        slots = self.invoker.slots
        try:
            version = self.claimed_version(record)
            limits = Limits(**record["request"]["limits"])
            needs, extra = self.invoker.needs(version, self.claimed_secrets(record))
            code, answer, after_answer = self.invoker.invoke(
                record["path"], RUNTIMES[version.language], version.runnable, record["request"]["input"],
                limits, running.sink, reserved=True, on_sandbox=running.on_sandbox, **needs)
            answer = {"http": code, **answer, **extra, "version": version.version}
        except ApiError as error:   # the version was deleted after the call was queued
            answer = {"http": error.status, "error": error.message, "status": "error"}
        except Exception:
            LOG.exception("call %s failed to run", running.id)
            answer = final_answer("internal", "the server failed to run the call; see its log")
        finally:
            take_next = not self.stopping.is_set() and slots.waiting == 0
            if not take_next:
                slots.release()
        if running.cancelled:
            answer = {key: value for key, value in answer.items() if key not in ("data", "type")}
            answer.update(final_answer("cancelled", "the call was cancelled while it ran"))
        following = None
        try:
            following = self.finish(running, answer, take_next)
        finally:
            running.finish()
            with self.lock:
                self.running.pop(running.id, None)
                self.cancel_requested.discard(running.id)
            next_call = self.adopt(following) if following is not None else None
            if next_call is None and take_next:
                slots.release()
            try:
                after_answer()
            except Exception:   # the next call holds a slot and a claim: it must still run
                LOG.exception("call %s: ending its sandbox failed", running.id)
        return next_call

    def claimed_secrets(self, record: dict[str, Any]) -> dict[str, str] | None:
        """The function's secrets when the claim read them (Redis: no round trip of their own)."""
        if "sealed_secrets" not in record:
            return None
        sealed = record["sealed_secrets"]
        return self.invoker.secrets.open(record["path"], sealed) if sealed else {}

    def claimed_version(self, record: dict[str, Any]) -> Version:
        """The version a claimed call runs: the claim checked that it still exists."""
        if not record.get("version_exists"):
            raise ApiError(404, f"function '{record['path']}' has no version {record['version']} "
                                "(deleted after the call was queued)")
        return self.invoker.stored(record["path"], record["version"])

    def finish(self, running: RunningCall, answer: dict[str, Any], take_next: bool) -> dict[str, Any] | None:
        """The fenced final write, retried while the store is unreachable. With `take_next`,
        the same write claims the next queued call for this slot: its record, or None."""
        status = answer["status"]
        deadline = time.monotonic() + max(60.0, self.config.lease * 4)
        while True:
            try:
                written, following = self.backend.finish(running, status, answer, take_next)
                break
            except Exception as error:
                if not is_store_error(error) or time.monotonic() > deadline:
                    LOG.error("call %s: its result could not be stored: %s", running.id, error)
                    return None
                time.sleep(0.5)
        if not written:
            LOG.warning("call %s attempt %d: late result refused (the call was taken over or ended)",
                        running.id, running.attempt)
            self.metrics.inc("faas_calls_refused_total")
            return None
        self.metrics.inc("faas_calls_final_total", status=status)
        if running.record.get("callback_url"):
            self.callbacks.schedule(running.id)
        return following

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
# 6d. Calls on SQLite (one server)
# ==========================================================================================

Written = TypeVar("Written")


@dataclasses.dataclass
class PendingWrite:
    operation: Callable[[sqlite3.Connection], Any]
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class GroupCommit:
    """Writes of many threads committed together. With synchronous=FULL every commit is an
    fsync, about a third of a millisecond of the disk and much of the kernel's CPU: three
    per call cost about a seventh of the async throughput here. While one thread commits, the writes
    that arrive wait and go in the next batch: one transaction, one fsync for all. Alone,
    a write commits at once. Each write runs in a savepoint of its own, so one that raises
    (a full queue's 429) leaves the others; if the commit fails, every write of the batch
    fails with it (nothing of them was written)."""

    def __init__(self, store: "SQLiteStore") -> None:
        self.store = store
        self.changed = threading.Condition()
        self.pending: list[PendingWrite] = []
        self.committing = False

    def run(self, operation: Callable[[sqlite3.Connection], Written]) -> Written:
        write = PendingWrite(operation)
        with self.changed:
            self.pending.append(write)
            while self.committing and not write.done:
                self.changed.wait()
            batch: list[PendingWrite] = []
            if not write.done:
                self.committing = True
                batch, self.pending = self.pending, []
        if batch:
            try:
                self.commit(batch)
            finally:
                with self.changed:
                    for each in batch:
                        each.done = True
                    self.committing = False
                    self.changed.notify_all()
        if write.error is not None:
            raise write.error
        return write.result

    def commit(self, batch: list[PendingWrite]) -> None:
        try:
            with self.store.connection() as db:
                self.write(db, batch)
        except BaseException as error:   # no connection, BEGIN or COMMIT failed (locked, I/O), or a lone
            for write in batch:          # write failed: none of the batch was written, each caller hears why
                write.result, write.error = None, error

    def write(self, db: sqlite3.Connection, batch: list[PendingWrite]) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            if len(batch) == 1:   # alone, a write needs no savepoint: its failure is the transaction's
                batch[0].result = batch[0].operation(db)
            else:
                for write in batch:
                    self.apply(db, write)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def apply(db: sqlite3.Connection, write: PendingWrite) -> None:
        db.execute("SAVEPOINT write")
        try:
            write.result = write.operation(db)
        except Exception as error:
            db.execute("ROLLBACK TO write")
            write.error = error
        db.execute("RELEASE write")


class SQLiteCalls:
    """Calls in the function store's SQLite file: a `calls` table is record and queue at
    once. A call is claimed by one UPDATE ... RETURNING; the consumer is woken by an
    in-process event when a call is queued, never by polling. One server per file. Writes
    go through a GroupCommit."""
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
        self.commits = GroupCommit(store)
        with store.connection() as db:
            db.executescript(self.SCHEMA)

    def row_to_record(self, row: tuple) -> dict[str, Any]:
        record = dict(zip(self.COLUMNS, row))
        for column in self.JSON_COLUMNS:
            record[column] = json.loads(record[column]) if record[column] else None
        return record

    def submit(self, record: dict[str, Any], max_queue: int) -> tuple[dict[str, Any], bool]:
        now = time.time()
        record = {**record, "created": now, "deadline": now + record.pop("max_age"),
                  "expires": now + self.config.ttl}
        def insert(db: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
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
            return record, False
        submitted, replayed = self.commits.run(insert)
        if not replayed:
            self.queued.set()
        return submitted, replayed

    def get(self, call_id: str) -> dict[str, Any] | None:
        rows = self.store.rows(f"SELECT {', '.join(self.COLUMNS)} FROM calls WHERE id=? AND expires>?",
                               (call_id, time.time()))
        return self.row_to_record(rows[0]) if rows else None

    def claim(self, node: str, owner: str) -> dict[str, Any] | None:
        return self.commits.run(lambda db: self.claim_in(db, node, owner))

    def claim_in(self, db: sqlite3.Connection, node: str, owner: str) -> dict[str, Any] | None:
        """The oldest queued call that may still start, now running here (expire_queued
        marks the others), and whether its version still exists."""
        now = time.time()
        rows = db.execute(
            f"UPDATE calls SET status='running', node=?, owner=?, started=?, expires=?, attempt=attempt+1 "
            f"WHERE id = (SELECT id FROM calls WHERE status='queued' AND deadline>=? ORDER BY created LIMIT 1) "
            f"RETURNING {', '.join(self.COLUMNS)}, EXISTS (SELECT 1 FROM versions v WHERE v.path=calls.path "
            f"AND v.version=calls.version)", (node, owner, now, now + self.config.ttl, now)).fetchall()
        if not rows:
            return None
        return {**self.row_to_record(rows[0][:-1]), "version_exists": bool(rows[0][-1])}

    def expire_queued(self) -> list[str]:
        now = time.time()
        answer = EXPIRED_ANSWER
        ids = [row[0] for row in self.commits.run(lambda db: db.execute(
            "UPDATE calls SET status='expired', finished=?, answer=?, expires=? "
            "WHERE status='queued' AND deadline<? RETURNING id",
            (now, answer, now + self.config.ttl, now)).fetchall())]
        for call_id in ids:
            self.waiters.notify(call_id)
        return ids

    def stored_events(self, call_id: str, cursor: str | None, wait: float) -> list[tuple[str, dict[str, Any]]]:
        rows = self.store.rows("SELECT events FROM calls WHERE id=?", (call_id,))
        events = json.loads(rows[0][0]) if rows and rows[0][0] else []
        mark = event_key(cursor) if cursor else (0, 0)
        return [(eid, event) for eid, event in events if event_key(eid) > mark]

    def finish(self, running: RunningCall, status: str, answer: dict[str, Any],
               take_next: bool) -> tuple[bool, dict[str, Any] | None]:
        """(written, the next queued call claimed in the same transaction when `take_next`)."""
        now = time.time()
        record = running.record
        values = (status, json.dumps(answer), json.dumps(running.events), now, now + self.config.ttl,
                  running.id, record["owner"], running.attempt)

        def write(db: sqlite3.Connection) -> tuple[bool, dict[str, Any] | None]:
            done = db.execute("UPDATE calls SET status=?, answer=?, events=?, finished=?, expires=? "
                              "WHERE id=? AND status='running' AND owner=? AND attempt=?", values).rowcount
            return bool(done), self.claim_in(db, record["node"], record["owner"]) if done and take_next else None
        written, following = self.commits.run(write)
        self.waiters.notify(running.id)
        return written, following

    def cancel(self, call_id: str) -> tuple[str, dict[str, Any] | None]:
        now = time.time()
        answer = json.dumps(final_answer("cancelled", "the call was cancelled before it started"))
        cancelled = self.commits.run(lambda db: db.execute(
            "UPDATE calls SET status='cancelled', finished=?, answer=?, expires=? "
            "WHERE id=? AND status='queued'", (now, answer, now + self.config.ttl, call_id)).rowcount)
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
        self.commits.run(lambda db: db.execute("UPDATE calls SET callback=? WHERE id=?",
                                               (json.dumps(state), call_id)).rowcount)

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
            if record["attempt"] < record["max_attempts"]:
                requeued += self.commits.run(lambda db: db.execute(
                    "UPDATE calls SET status='queued', node=NULL, owner=NULL, started=NULL "
                    "WHERE id=? AND status='running'", (record["id"],)).rowcount)
                continue
            answer = json.dumps(final_answer("lost", f"the server ({record['node']}) stopped while running the call"))
            if self.commits.run(lambda db: db.execute(
                    "UPDATE calls SET status='lost', finished=?, answer=?, expires=? WHERE id=? AND status='running'",
                    (now, answer, now + self.config.ttl, record["id"])).rowcount):
                lost.append(record["id"])
        if requeued:
            self.queued.set()
        return requeued, lost

    def sweep(self) -> None:
        """Retention: records past FAAS_CALL_TTL go, in small batches."""
        self.commits.run(lambda db: db.execute(
            "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE expires<? AND status NOT IN "
            "('queued', 'running') LIMIT 500)", (time.time(),)).rowcount)


# ==========================================================================================
# 6e. Calls on Redis (many servers, one queue)
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
        for name, value in pairs(cjson.decode(ARGV[7])) do
            fields[#fields + 1] = name
            fields[#fields + 1] = value
        end
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
    # claim(): the queue entry `entry` of `stream`, read by this node, becomes its running
    # call: {'run', record as JSON, whether its version still exists, its function's sealed
    # secrets or ''}, or {'expired', id} or {'skip'}. `versions` and `secrets` are the
    # store's key prefixes of a function's version set and secrets. (The record travels as
    # one JSON text, here and at ENQUEUE, not as a reply element or an argument per field:
    # redis-py spends most of its time per element.)
    LUA_CLAIM = LUA_NOW + """
local function claim(key, stream, entry, id, node, owner, expired, versions, secrets)
    local function drop() redis.call('XACK', stream, ARGV[2], entry); redis.call('XDEL', stream, entry) end
    if redis.call('HGET', key, 'status') ~= 'queued' or redis.call('HGET', key, 'entry') ~= entry then
        drop()
        return {'skip'}
    end
    if now > tonumber(redis.call('HGET', key, 'deadline')) then
        drop()
        redis.call('HSET', key, 'status', 'expired', 'finished', fmt(now), 'answer', expired)
        redis.call('EXPIRE', key, ARGV[3])
        done(id, 'expired')
        return {'expired', id}
    end
    redis.call('HINCRBY', key, 'attempt', 1)
    redis.call('HSET', key, 'status', 'running', 'node', node, 'owner', owner, 'started', fmt(now))
    redis.call('HDEL', key, 'cancel')
    redis.call('EXPIRE', key, ARGV[3])
    if redis.call('HGET', key, 'kind') == 'sync' then done(id, 'running') end
    local fields, record = redis.call('HGETALL', key), {}
    for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
    local exists = redis.call('ZSCORE', versions .. record['path'] .. ':versions', record['version'])
    local sealed = redis.call('HGET', secrets .. record['path'], 'sealed')
    return {'run', cjson.encode(record), exists and 1 or 0, sealed or ''}
end
"""
    CLAIM = LUA_CLAIM + """
        return claim(KEYS[1], KEYS[2], ARGV[4], ARGV[1], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
    """
    # After the final write, with ARGV[8] = '1': claim the next queued call for this node
    # (spilled sync calls first), so that under load a call needs no read of its own.
    FINISH = LUA_CLAIM + """
        if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4]
                or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[5] then
            return {0}
        end
        local entry = redis.call('HGET', KEYS[1], 'entry')
        redis.call('HSET', KEYS[1], 'status', ARGV[6], 'answer', ARGV[7], 'finished', fmt(now))
        redis.call('HDEL', KEYS[1], 'cancel')
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        redis.call('XACK', KEYS[2], ARGV[2], entry)
        redis.call('XDEL', KEYS[2], entry)
        if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ARGV[3]) end
        done(ARGV[1], ARGV[6])
        if ARGV[8] ~= '1' then return {1} end
        for _, stream in ipairs({KEYS[5], KEYS[6]}) do
            local read = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[9], 'COUNT', 1, 'STREAMS', stream, '>')
            if read then
                local entry = read[1][2][1]
                local id = entry[2][2]
                return {1, claim(ARGV[10] .. id, stream, entry[1], id, ARGV[9], ARGV[4], ARGV[11], ARGV[12],
                                 ARGV[13])}
            end
        end
        return {1}
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
    # After a read of completions nobody here waited for, the next read waits this long
    # (seconds), unless someone starts waiting: a completion of a call another server ran,
    # or a cancel through another server, is then at most this late. The calls this server
    # ends wake its waiters at once (finish).
    DONE_PAUSE = 0.02

    def __init__(self, store: RedisStore, config: Config, calls: Calls) -> None:
        import redis
        self.calls = calls
        self.config = config.calls
        self.prefix = config.redis_prefix
        timeout = config.redis_timeout
        self.redis = redis_client(config.redis_url, timeout, decode_responses=True)
        self.blocking = redis.Redis.from_url(config.redis_url, decode_responses=True,
                                             socket_timeout=max(timeout, self.BLOCK_MS / 1000 + 2),
                                             socket_connect_timeout=timeout, health_check_interval=30)
        self.streams = {"sync": self.key("calls:sync"), "async": self.key("calls:async")}
        self.done_key = self.key("calls:done")
        self.scripts = {name: self.redis.register_script(getattr(self, name))
                        for name in ("ENQUEUE", "CLAIM", "FINISH", "CANCEL", "RECOVER", "SWEEP")}
        self.node_key = self.key(f"node:{self.config.node_id}")
        self.versions_prefix = store.keys("")[1]   # + path + ':versions' is a function's version set
        self.secrets_prefix = RedisSecrets(store).key("")   # + path is a function's secrets
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
    def encode(self, record: dict[str, Any]) -> str:
        """The record's fields as one JSON object of strings (ENQUEUE stores each in the hash)."""
        return json.dumps({name: json.dumps(value) if name in self.JSON_FIELDS else str(value)
                           for name, value in record.items()
                           if value is not None and name not in ("created", "deadline", "entry", "stream")})

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
                                [max_queue, int(bool(record.get("idem"))), record["max_age"], self.encode(record)])
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

    def finish(self, running: RunningCall, status: str, answer: dict[str, Any],
               take_next: bool) -> tuple[bool, dict[str, Any] | None]:
        """(written, the next queued call claimed by the same script when `take_next`)."""
        self.flush(running)
        record = running.record
        reply = self.run_script("FINISH", running.id, record["stream"],
                                [self.events_key(running.id), self.streams["sync"], self.streams["async"]],
                                [record["owner"], running.attempt, status, json.dumps(answer), int(take_next),
                                 self.config.node_id, self.key("call:"), EXPIRED_ANSWER, self.versions_prefix,
                                 self.secrets_prefix])
        self.calls.waiters.notify(running.id)
        return bool(reply[0]), self.claimed(reply[1]) if len(reply) > 1 else None

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
                free = max(1, slots.max_runs - slots.active)   # a deep queue: several per read
                reply = self.blocking.xreadgroup(self.GROUP, self.config.node_id,
                                                 {self.streams["sync"]: ">", self.streams["async"]: ">"},
                                                 count=free, block=self.BLOCK_MS)
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
                entry_id, self.config.node_id, self.calls.owner, EXPIRED_ANSWER, self.versions_prefix,
                self.secrets_prefix])
        except BaseException:
            slots.release()
            raise
        record = self.claimed(reply)
        if record is None:
            slots.release()
            return
        self.calls.start_run(record)

    def claimed(self, reply: list[Any]) -> dict[str, Any] | None:
        """The record of a call the Lua claim() gave this node, or None (an expired call ends here)."""
        if reply[0] == "expired":
            self.calls.ended(reply[1])
        if reply[0] != "run":
            return None
        return {**self.decode(json.loads(reply[1])), "version_exists": bool(reply[2]), "sealed_secrets": reply[3]}

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
            awaited = False
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    call_id = fields.get("id", "")
                    if fields.get("status") == "cancelling" and call_id in self.calls.running:
                        self.calls.cancel_local(call_id)
                    awaited |= self.calls.waiters.notify(call_id)
            if reply and not awaited:   # under load, a read per completion costs more than they
                self.calls.waiters.pause(self.DONE_PAUSE)

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
        for entry_id, fields in self.redis.xrange(stream, f"({groups[self.GROUP]['last-delivered-id']}", "+",
                                                  count=100):
            if self.run_script("SWEEP", fields.get("id", ""), stream, [], [entry_id, EXPIRED_ANSWER]):
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
# 6f. Callbacks and the HTTP side of calls
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
        "faas_function_duration_seconds": ("histogram", "Wall time of function calls by function."),
        "faas_sandbox_spawn_seconds": ("histogram", "Time to create a run's cgroup and start its sandbox."),
        "faas_calls_by_spawn_path_total": ("counter", "Function calls by language and how their sandbox was "
                                                      "spawned: forked by the zygote, or bwrap."),
        "faas_uploads_total": ("counter", "Stored uploads by language."),
        "faas_store_errors_total": ("counter", "Requests that failed because the store did."),
        "faas_http_requests_total": ("counter", "HTTP requests by route and status code."),
        "faas_deps_builds_total": ("counter", "Library layer builds by result (ok, failed)."),
        "faas_deps_build_seconds": ("histogram", "Wall time of library layer builds."),
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


# /functions/<path>/secrets is the secrets of <path>: no function path ends in /secrets.
SECRETS_ROUTE = re.compile(r"/functions/(?P<path>.+)/secrets")
FUNCTION_ROUTE = re.compile(r"/functions/(?P<path>(?!.+/secrets$).+)")


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
        ("GET", FUNCTION_ROUTE, "get_function", "admin"),
        ("PATCH", FUNCTION_ROUTE, "patch_function", "admin"),
        ("DELETE", FUNCTION_ROUTE, "delete_function", "admin"),
        ("GET", SECRETS_ROUTE, "get_secrets", "admin"),
        ("PUT", SECRETS_ROUTE, "put_secrets", "admin"),
        ("DELETE", SECRETS_ROUTE, "delete_secrets", "admin"),
        ("GET", re.compile(r"/(?:console/?)?"), "get_console_page", "public"),
        ("GET", re.compile(r"/console/(?P<name>[A-Za-z0-9_-]+\.[a-z]+)"), "get_console_file", "public"),
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
        self.send_json(200, {"functions": [with_sha256(self.app.invoker, function)
                                           for function in self.app.store.list_functions()]})

    def get_console_page(self) -> None:
        self.get_console_file("index.html")

    def get_console_file(self, name: str) -> None:
        data, content_type = self.app.console.file(name)
        self.send_body(200, data, content_type, CONSOLE_HEADERS)

    def get_function(self, path: str) -> None:
        check_path(path)
        version_number = self.query_version()
        function = self.app.store.describe(path)
        if function is None:
            raise ApiError(404, f"no function at path '{path}'")
        versions = self.app.store.list_versions(path)
        network = next((v["network"] for v in versions if v["version"] == function["latest"]), "none")
        answer = {**function, "network": network, "versions": versions, "secrets": self.app.secrets.names(path)}
        if version_number is not None:
            version = self.app.invoker.resolve(path, version_number)
            answer.update(version=version.version, code=version.code)
            if version.deps:
                answer["dependencies"] = deps_summary(version.deps, with_lock=True)
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
        self.app.layers.collect_soon()   # their layers may now be unreferenced
        if remaining is None:
            self.app.secrets.delete(path)   # a new function at this path starts without them
        LOG.info("deleted request_id=%s path=%s version=%s count=%d", self.request_id, path,
                 version_number or "all", deleted)
        self.send_json(200, {"path": path, "deleted": deleted, "latest": remaining and remaining["latest"]})

    def put_secrets(self, path: str, values: dict[str, str] | None = None) -> None:
        """Replace the function's secrets (write-only: the answer names them, never a value)."""
        check_path(path)
        if values is None:
            if self.headers.get("Content-Length", "").strip() in ("", "0"):   # never clear them by accident
                raise ApiError(400, "send a JSON object of secret names to values ({} removes them all, "
                                    "as DELETE does)")
            values = check_secrets(self.read_json())
        if self.app.store.find(path) is None:
            raise ApiError(404, f"no function at path '{path}'")
        names = self.app.secrets.replace(path, values)
        LOG.info("secrets request_id=%s path=%s names=%s", self.request_id, path, ",".join(names) or "-")
        self.send_json(200, {"path": path, "secrets": names})

    def get_secrets(self, path: str) -> None:
        check_path(path)
        if self.app.store.find(path) is None:
            raise ApiError(404, f"no function at path '{path}'")
        self.send_json(200, {"path": path, "secrets": self.app.secrets.names(path)})

    def delete_secrets(self, path: str) -> None:
        self.put_secrets(path, {})

    def post_upload(self) -> None:
        body = self.read_json()
        path = check_path(body.get("path"))
        if SECRETS_ROUTE.fullmatch(f"/functions/{path}"):
            raise ApiError(400, "a path may not end in '/secrets': /functions/<path>/secrets holds a function's secrets")
        runtime = check_language(body.get("language"))
        code = check_code(body.get("code"))
        limits = requested_limits(body)
        self.app.invoker.limits.lowered(limits)   # validates; stored as asked, capped at run time
        requested = check_dependencies(body, runtime, self.app.config.deps)
        network = self.allowed_network(body)
        compiled = self.app.invoker.prepare(runtime, code)
        deps, layer = self.app.layers.lock_and_build(requested) if requested else (None, None)
        version = self.app.store.put(path, runtime.language, code, compiled, limits, deps, network)
        self.app.metrics.inc("faas_uploads_total", language=runtime.language)
        LOG.info("request_id=%s uploaded path=%s version=%d language=%s", self.request_id, path,
                 version.version, runtime.language)
        answer: dict[str, Any] = {"path": path, "language": runtime.language, "version": version.version}
        if deps and layer:
            answer["dependencies"] = {**deps_summary(deps), "cached": layer.cached, "build_ms": layer.build_ms,
                                      "resolve_ms": layer.resolve_ms, "size": layer.size}
        self.send_json(200, answer)

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
        needs, extra = self.app.invoker.needs(version)
        self.run(path, RUNTIMES[version.language], version.runnable, event, limits, stream,
                 {"version": version.version, **extra}, **needs)

    def post_run_now(self) -> None:
        body = self.read_json()
        runtime = check_language(body.get("language"))
        code = check_code(body.get("code"))
        stream = self.wants_stream(body)
        event = parse_input(body)
        limits = self.app.invoker.limits.lowered(requested_limits(body))
        requested = check_dependencies(body, runtime, self.app.config.deps)
        network = self.allowed_network(body)
        if runtime.transpile:
            code = self.app.invoker.transpile(code)
        deps, extra = None, {}
        if requested:
            deps, layer = self.app.layers.lock_and_build(requested)
            extra = {"dependencies": {**deps_summary(deps), "cached": layer.cached, "size": layer.size}}
            if not layer.cached:
                extra["deps_build_ms"] = layer.build_ms
        self.run("run-now", runtime, code, event, limits, stream, extra, deps, network=network)

    def allowed_network(self, body: dict[str, Any]) -> str:
        network = check_network(body.get("network"))
        if network == "internet" and self.app.config.network != "allow":
            raise ApiError(400, "network access is disabled on this server (FAAS_NETWORK=off): functions may not "
                                "use the internet; the operator can allow it with FAAS_NETWORK=allow",
                           reason="network_disabled")
        return network

    def run(self, function: str, runtime: Runtime, code: str, event: Any, limits: Limits, stream: bool,
            extra: dict[str, Any], deps: dict[str, Any] | None = None, env: dict[str, str] | None = None,
            network: str = "none") -> None:
        if not stream:
            status, answer, after_answer = self.app.invoker.invoke(function, runtime, code, event, limits, None,
                                                                   deps=deps, env=env, network=network)
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
                                                               log_line, on_start=self.start_sse, deps=deps,
                                                               env=env, network=network)
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


# ==========================================================================================
# 7b. Running the server: the App assembles every part, serves, drains and stops
# ==========================================================================================

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
        self.config = config = resolve_sandbox_identity(config)
        self.metrics = Metrics()
        self.store = open_store(config)
        runtime_base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        sweep_runtime_dirs(Path(runtime_base or tempfile.gettempdir()))
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"faas-runtime-{os.getpid()}-", dir=runtime_base))
        self.limit_backend = choose_limit_backend(config)
        self.layers = Layers(config, self.metrics, serving=True)
        self.sandbox = Sandbox(config, self.limit_backend, self.runtime_dir,
                               self.layers.layers if self.layers.available else None)
        self.layers.sandbox = self.sandbox
        self.zygote = start_zygote(config, self.sandbox, self.limit_backend)
        pool_sizes = {runtime.argv: config.pool_sizes[pool_name(runtime.argv)] for runtime in RUNTIMES.values()
                      if os.access(runtime.interpreter, os.X_OK)}
        self.pool = Pool(self.sandbox, pool_sizes, Limits.from_config(config), config.pool_idle)
        self.layers.pool = self.pool
        network_sizes = {argv: config.network_pool_size for argv in pool_sizes} if self.sandbox.network.enabled else {}
        self.network_pool = Pool(self.sandbox, network_sizes, Limits.from_config(config), config.pool_idle, network=True)
        self.secrets = Secrets(config, self.store)
        self.invoker = Invoker(config, self.store, self.sandbox, self.pool, self.metrics, self.layers,
                               self.secrets, self.network_pool)
        self.calls = Calls(config, self.store, self.invoker, self.metrics)
        openapi = HERE / "openapi.json"
        self.openapi = openapi.read_bytes() if openapi.is_file() else None
        self.console = Console(CONSOLE_DIR if config.console else None)
        self.started = time.time()
        self.stopping = threading.Event()
        self.server: Server | None = None
        self.layers.start_collector(self.store, self.stopping)

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
            "sandbox_uid": self.config.sandbox_uid, "network": self.config.network,
            "runtimes": {name: {"interpreter": rt.interpreter,
                                "available": os.access(rt.interpreter, os.X_OK)
                                and (not rt.transpile or self.sandbox.has_esbuild)}
                         for name, rt in RUNTIMES.items()},
            "runs_active": self.invoker.slots.active, "runs_waiting": self.invoker.slots.waiting,
            "max_runs": self.config.max_runs, "pool": self.pool.describe(), "libraries": self.layers.describe(),
            "network_pool": self.network_pool.describe(),
            "zygote": self.zygote.describe() if self.zygote else {"state": "off", "why": zygote_off_reason(self.config,
                                                                                                    self.limit_backend)},
            "spawn_paths": self.invoker.spawn_paths(),
            "uptime_s": round(time.time() - self.started, 1),
            "calls": self.calls.describe(),
        }

    def render_metrics(self) -> str:
        slots = self.invoker.slots
        layer_count, layer_bytes = self.layers.totals()
        rejected_connections = self.server.rejected if self.server else 0
        return self.metrics.render({
            "faas_runs_in_flight": ("Sandboxes running now.", slots.active),
            "faas_runs_waiting": ("Calls waiting for a run slot.", slots.waiting),
            "faas_max_runs": ("Configured FAAS_MAX_RUNS.", slots.max_runs),
            'faas_rejected_total{reason="queue"}': ("Calls refused: 429 queue full, 503 too many connections.",
                                                    slots.rejected),
            'faas_rejected_total{reason="connections"}': ("", rejected_connections),
            "faas_uptime_seconds": ("Seconds since the server started.", round(time.time() - self.started, 3)),
            "faas_deps_layers": ("Library layers on this node's disk.", layer_count),
            "faas_deps_bytes": ("Bytes of the library layers on this node's disk.", layer_bytes),
            **self.calls_gauges(),
            "faas_zygote_up": ("1 while a zygote forks Python sandboxes; 0 while they take the bwrap path.",
                               int(self.zygote is not None and self.zygote.describe()["state"] == "up")),
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
        self.layers.close()
        self.network_pool.close()
        if self.zygote is not None:
            self.zygote.close()
        self.store.close()
        self.limit_backend.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


# ==========================================================================================
# 7c. Console (static files beside faas.py, served at / and /console)
# ==========================================================================================

CONSOLE_DIR = HERE / "console"
CONSOLE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# The page's script and styles come from this server only, it may talk to nothing else, and
# no other site may frame it. User data is only ever set as text (textContent), never as HTML.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Console:
    """The console's files, read once at start-up; None (FAAS_CONSOLE=off) serves nothing."""

    def __init__(self, directory: Path | None) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        if directory is not None and directory.is_dir():
            for file in directory.iterdir():
                if file.is_file() and file.suffix in CONSOLE_TYPES:
                    self.files[file.name] = (file.read_bytes(), CONSOLE_TYPES[file.suffix])

    def file(self, name: str) -> tuple[bytes, str]:
        if not self.files:
            raise ApiError(404, "the console is off (FAAS_CONSOLE=off) or not installed beside faas.py")
        if name not in self.files:
            raise ApiError(404, f"no console file {name!r}")
        return self.files[name]


def with_sha256(invoker: Invoker, function: dict[str, Any]) -> dict[str, Any]:
    """A function's summary plus its latest code's sha256, so a client (`faas.py deploy`)
    can tell from one listing which functions changed. The code comes from the invoker's
    cache of versions when it is there; a function deleted meanwhile gets None."""
    try:
        latest = invoker.resolve(function["path"], function["latest"])
    except ApiError:
        return {**function, "sha256": None}
    return {**function, "sha256": hashlib.sha256(latest.code.encode()).hexdigest()}


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
    return deps + library_dependencies(config) + network_dependencies(config)


def library_dependencies(config: Config) -> list[Dependency]:
    """pip and npm build the libraries functions declare (optional: without them, uploads
    with requirements/dependencies fail), and the layer store they build into."""
    if not config.deps.enabled:
        return [Dependency("libraries", True, "off (FAAS_DEPS=off)", "", None, required=False)]
    pip = version_of([RUNTIMES["python"].interpreter, "-m", "pip", "--version"])
    npm = shutil.which("npm")
    layers = layer_store_root(config) / "layers"
    count = len([p for p in layers.iterdir() if (p / "faas-layer.json").is_file()]) if layers.is_dir() else 0
    size = sum(int(json.loads((p / "faas-layer.json").read_text()).get("size", 0))
               for p in layers.iterdir() if (p / "faas-layer.json").is_file()) if layers.is_dir() else 0
    return [
        Dependency("pip", pip.startswith("pip "), pip or "builds Python libraries (requirements)",
                   "apt-get install -y python3-pip", "python3-pip", required=False),
        Dependency("npm", bool(npm), f"{npm} ({version_of(['npm', '--version'])})" if npm
                   else "builds JavaScript libraries (dependencies)", "apt-get install -y npm", "npm",
                   required=False),
        Dependency("layer store", True, f"{layers}: {count} layers, {size} bytes", "", None, required=False),
    ]


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
    print(f"{'info':<20} {'network':<16} {describe_network(config)}")
    failed = False
    if not any(dep.name in ("slirp4netns", "nft", "unshare", "/dev/net/tun", "root") for dep in missing):
        passed, detail = network_self_test(config, config.port)
        failed = not passed and config.network == "allow"
        print(f"{'ok' if passed else 'FAILED':<20} {'network test':<16} {detail}")
    return 1 if failed or any(dep.required for dep in missing) else 0


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


INSTALL_DIRS = ("wrappers", "console")
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
    for name in INSTALL_DIRS:
        shutil.copytree(HERE / name, prefix / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        print(f"copied {HERE / name} -> {prefix / name}")
    esbuild = HERE / "node_modules/@esbuild"
    if esbuild.is_dir():
        shutil.copytree(esbuild, prefix / "node_modules/@esbuild", dirs_exist_ok=True, symlinks=True)
        print(f"copied {esbuild} -> {prefix / 'node_modules/@esbuild'}")
    elif shutil.which("npm"):
        print(f"installing esbuild: npm ci --ignore-scripts in {prefix}", flush=True)
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=prefix, check=False)
    else:
        print("TypeScript needs esbuild: apt-get install -y npm, then run this again")
    user = os.environ.get("FAAS_SANDBOX_USER", "").strip() or "faas-sandbox"
    try:
        uid, _ = sandbox_user_ids(user, create=True)
        print(f"sandbox user {user}: uid {uid} (every call runs as it; FAAS_SANDBOX_USER)")
    except ConfigError as error:
        print(f"faas install: {error}", file=sys.stderr)
        return 1
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
        user = os.environ.get("FAAS_SANDBOX_USER", "").strip() or "faas-sandbox"
        if subprocess.run(["userdel", user], capture_output=True, check=False).returncode == 0:
            print(f"removed the sandbox user {user}")
    else:
        print("kept the stored functions in /var/lib/faas and settings in /etc/faas (--purge removes them)")
    return 0


# ==========================================================================================
# 8b. Client commands: deploy, call, ls, logs (talk to a running server over HTTP)
# ==========================================================================================

CLIENT_COMMANDS = ("deploy", "call", "ls", "logs")
SOURCE_LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript"}
SKIPPED_DIRS = {"node_modules", "__pycache__"}
# `# faas: {"timeout": 5}` or `// faas: {...}` on one of a file's first lines
FRONT_MATTER = re.compile(r"\s*(?:#|//)\s*faas:\s*(\{.*\})\s*")
RESERVED_SETTINGS = ("path", "language", "code")


class ClientError(Exception):
    """The server could not be reached or answered something unusable: exit 2."""


class Remote:
    """The server at --url/FAAS_URL, with FAAS_TOKEN as the bearer token when set."""

    def __init__(self, url: str, token: str | None, timeout: float = 330) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"--url/FAAS_URL {url!r} is not an http(s) URL")
        self.parts, self.token, self.timeout = parts, token, timeout
        self.base = parts.path.rstrip("/")

    def open(self, method: str, path: str, body: Any = None, accept: str = "application/json") -> Any:
        """The response, not yet read (an SSE stream is read as it arrives)."""
        import http.client
        kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(self.parts.hostname, self.parts.port, timeout=self.timeout)
        headers = {"Accept": accept}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, self.base + path, body=data, headers=headers)
            return connection.getresponse()
        except OSError as error:
            raise ClientError(f"cannot reach {self.parts.geturl()}: {error}") from None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, parsed JSON answer)."""
        response = self.open(method, path, body)
        raw = response.read()
        try:
            return response.status, json.loads(raw or b"{}")
        except ValueError:
            raise ClientError(f"{method} {path}: the server answered {response.status} with non-JSON "
                              f"{raw[:200]!r}") from None

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        if status != 200:
            raise ClientError(f"{method} {path}: {status} {answer.get('error', answer) if isinstance(answer, dict) else answer}")
        return answer


@dataclasses.dataclass(frozen=True)
class LocalFunction:
    path: str
    file: Path
    language: str
    code: str
    settings: dict[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.code.encode()).hexdigest()


def front_matter(code: str) -> dict[str, Any]:
    for line in code.splitlines()[:5]:
        match = FRONT_MATTER.fullmatch(line)
        if match:
            return json.loads(match.group(1))
    return {}


def local_functions(root: Path, prefix: str) -> list[LocalFunction]:
    """Every *.py/*.js/*.ts under root (not in hidden dirs, node_modules, *.d.ts), as the
    function at its relative path without the extension. Settings: the directory's faas.json
    (`{"file.py": {...}}`), overridden by the file's front-matter comment."""
    found: list[LocalFunction] = []
    beside: dict[Path, dict[str, Any]] = {}
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if (file.suffix not in SOURCE_LANGUAGES or not file.is_file() or file.name.endswith(".d.ts")
                or any(part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts)):
            continue
        if file.parent not in beside:
            config = file.parent / "faas.json"
            try:
                beside[file.parent] = json.loads(config.read_text()) if config.is_file() else {}
            except ValueError as error:
                raise ClientError(f"{config}: not valid JSON: {error}") from None
        code = file.read_text(encoding="utf-8")
        try:
            settings = {**beside[file.parent].get(file.name, {}), **front_matter(code)}
        except ValueError as error:
            raise ClientError(f"{file}: the faas: comment is not a JSON object: {error}") from None
        if any(key in settings for key in RESERVED_SETTINGS):
            raise ClientError(f"{file}: settings may not set {', '.join(RESERVED_SETTINGS)}")
        path = "/".join(part for part in (prefix.strip("/"), relative.with_suffix("").as_posix()) if part)
        found.append(LocalFunction(path, file, SOURCE_LANGUAGES[file.suffix], code, settings))
    paths = collections.Counter(function.path for function in found)
    clashes = sorted(path for path, count in paths.items() if count > 1)
    if clashes:
        raise ClientError(f"two files would be the same function: {', '.join(clashes)}")
    return found


def settings_differ(declared: dict[str, Any], latest: dict[str, Any]) -> bool:
    """Whether a version's reported settings differ from the declared ones. timeout/memory are
    in its `limits`; another setting is compared with the field of its name when the server
    reports one of the same JSON type (or reports it as `{"requested": ...}`). A setting the
    server does not report comparably counts as unchanged: `deploy --force` uploads anyway."""
    limits = latest.get("limits") or {}
    for key, value in declared.items():
        if key in ("timeout", "memory"):
            if limits.get(key) != value:
                return True
            continue
        reported = latest.get(key)
        if isinstance(reported, dict) and not isinstance(value, dict) and "requested" in reported:
            reported = reported["requested"]
        if reported is not None and type(reported) is type(value) and reported != value:
            return True
    return False


def deploy_plan(remote: Remote, functions: list[LocalFunction], prune: bool, prefix: str,
                force: bool = False) -> tuple[list[tuple[str, LocalFunction]], list[str]]:
    """[(create|update|unchanged, function)] and the paths --prune deletes."""
    listed = {f["path"]: f for f in remote.ok("GET", "/functions")["functions"]}
    plan: list[tuple[str, LocalFunction]] = []
    for function in functions:
        known = listed.get(function.path)
        if known is None:
            plan.append(("create", function))
        elif force or known.get("sha256") != function.sha256:
            plan.append(("update", function))
        elif function.settings:
            versions = remote.ok("GET", "/functions/" + function.path)["versions"]
            latest = next((v for v in versions if v["version"] == known["latest"]), {})
            plan.append(("update" if settings_differ(function.settings, latest) else "unchanged", function))
        else:
            plan.append(("unchanged", function))
    scope = prefix.strip("/") + "/" if prefix.strip("/") else ""
    local = {function.path for function in functions}
    gone = sorted(path for path in listed if path.startswith(scope) and path not in local) if prune else []
    return plan, gone


def deploy(remote: Remote, root: Path, dry_run: bool, prune: bool, prefix: str, force: bool = False) -> int:
    if not root.is_dir():
        raise ClientError(f"{root} is not a directory")
    plan, gone = deploy_plan(remote, local_functions(root, prefix), prune, prefix, force)
    failed = 0
    for action, function in plan:
        if dry_run or action == "unchanged":
            print(f"{action if dry_run else 'unchanged':<10} {function.path}")
            continue
        body = {**function.settings, "path": function.path, "language": function.language, "code": function.code}
        status, answer = remote.call("POST", "/upload", body)
        if status == 200:
            print(f"{action + 'd':<10} {function.path}  version {answer['version']}", flush=True)
            continue
        failed += 1
        line = answer.get("line") if isinstance(answer, dict) else None
        where = f"{function.file}:{line}" if line else str(function.file)
        print(f"{'failed':<10} {function.path}", flush=True)
        print(f"{where}: {answer.get('error') if isinstance(answer, dict) else answer}", file=sys.stderr, flush=True)
    for path in gone:
        if dry_run:
            print(f"{'delete':<10} {path}")
            continue
        status, answer = remote.call("DELETE", "/functions/" + path)
        if status == 200:
            print(f"{'deleted':<10} {path}", flush=True)
        else:
            failed += 1
            print(f"{'failed':<10} {path}", flush=True)
            print(f"{path}: delete failed: {answer.get('error', answer)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def printable(data: Any, kind: str | None) -> str:
    return data if kind in ("string", "text") and isinstance(data, str) else json.dumps(data, ensure_ascii=False)


def report_failure(answer: dict[str, Any]) -> int:
    """A non-ok call's message (and the user's stack) on stderr: exit status 1."""
    message = answer.get("error") or answer.get("data") or answer.get("status")
    line = f" (line {answer['line']})" if answer.get("line") else ""
    print(f"faas: {answer.get('status', 'error')}: {message}{line}", file=sys.stderr)
    if answer.get("stack"):
        print(answer["stack"].rstrip(), file=sys.stderr)
    return 1


def report_refusal(response: Any) -> int:
    """A JSON error answer where an SSE stream was asked for (unknown call, refused token): exit 1."""
    raw = response.read()
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ClientError(f"the server answered {response.status} with {raw[:200]!r}, not a JSON error")
    return report_failure({"status": response.status, **answer})


def follow_events(response: Any) -> int:
    """An SSE answer: printed lines to stderr as they arrive, the result to stdout."""
    exit_code: int | None = None
    data: list[str] = []
    for raw in response:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if text.startswith("data:"):
            data.append(text[5:].removeprefix(" "))
            continue
        if text or not data:
            continue
        event = json.loads("\n".join(data))
        data = []
        if event.get("event") == "log":
            print(printable(event.get("data"), event.get("type")), file=sys.stderr, flush=True)
        elif event.get("event") == "result":
            print(printable(event.get("data"), event.get("type")), flush=True)
            exit_code = 0
        elif event.get("event") == "error":
            exit_code = report_failure(event)
    return report_failure({"error": "the stream ended without a result"}) if exit_code is None else exit_code


def call(remote: Remote, path: str, given: str | None, version: int | None, stream: bool) -> int:
    body: dict[str, Any] = {}
    if given is not None:
        try:
            body["input"] = json.loads(sys.stdin.read() if given == "-" else given)
        except ValueError as error:
            raise ClientError(f"the input is not JSON: {error}") from None
    query = f"?version={version}" if version is not None else ""
    if stream:
        response = remote.open("POST", f"/run/{path}{query}", {**body, "stream": True}, accept="text/event-stream")
        if response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream"):
            return follow_events(response)
        return report_refusal(response)
    status, answer = remote.call("POST", f"/run/{path}{query}", body)
    for field in ("stdout", "stderr"):
        if answer.get(field):
            sys.stderr.write(answer[field] if answer[field].endswith("\n") else answer[field] + "\n")
    if status != 200:
        return report_failure({"status": status, **answer})
    print(printable(answer.get("data"), answer.get("type")))
    return 0


def list_functions(remote: Remote) -> int:
    functions = remote.ok("GET", "/functions")["functions"]
    print(f"{'PATH':<40} {'LANGUAGE':<11} {'LATEST':>11} {'VERSIONS':>8}  UPDATED (UTC)")
    for f in functions:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f["updated"]))
        print(f"{f['path']:<40} {f['language']:<11} {f['latest']:>11} {f['versions']:>8}  {updated}")
    return 0


def logs(remote: Remote, call_id: str) -> int:
    """An async call's printed lines and result, replayed (and followed) from its record."""
    response = remote.open("GET", f"/calls/{urllib.parse.quote(call_id, safe='')}/events", accept="text/event-stream")
    if response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream"):
        return follow_events(response)
    return report_refusal(response)


def run_client(args: Any) -> int:
    try:
        remote = Remote(args.url or os.environ.get("FAAS_URL") or "http://127.0.0.1:8080",
                        os.environ.get("FAAS_TOKEN") or None)
        if args.command == "deploy":
            return deploy(remote, Path(args.directory), args.dry_run, args.prune, args.prefix, args.force)
        if args.command == "call":
            return call(remote, args.path, args.input, args.version, args.stream)
        if args.command == "logs":
            return logs(remote, args.id)
        return list_functions(remote)
    except ClientError as error:
        print(f"faas: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ==========================================================================================
# 8c. Command line: library commands, arguments and dispatch
# ==========================================================================================

def run_deps(config: Config, action: str, dry_run: bool) -> int:
    """`faas.py deps ls|prefetch|gc`: the layer store of this node against the locks that
    stored versions reference (the store of FAAS_DATA_DIR or REDIS_URL)."""
    store = open_store(config)
    layers = Layers(config)
    try:
        referenced = store.layer_keys()
        if action == "ls":
            print(f"{'key':<16} {'kind':<4} {'size':>12} {'last used (UTC)':<20} {'versions':>8}  packages")
            for row in layers.listing(referenced):
                used = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["last_used"]))
                print(f"{row['key'][:16]:<16} {row['kind']:<4} {row['size']:>12} {used:<20} "
                      f"{row['versions']:>8}  {' '.join(row['packages'])}")
            return 0
        if action == "gc":
            removed = layers.gc(set(referenced), config.deps.grace, dry_run)
            for key in removed:
                print(f"{'would remove' if dry_run else 'removed'} {key}")
            print(f"{len(removed)} layers {'to remove' if dry_run else 'removed'}; "
                  f"{len(layers.listing({}))} left")
            return 0
        return prefetch(config, store, layers)
    finally:
        store.close()


def prefetch(config: Config, store: Store, layers: Layers) -> int:
    """Build every layer a stored version references and this node lacks."""
    # named with this pid, like a server's: a server's start-up sweeps it if this process dies first
    runtime_dir = Path(tempfile.mkdtemp(prefix=f"faas-runtime-{os.getpid()}-"))
    backend = choose_limit_backend(config)
    layers.sandbox = Sandbox(config, backend, runtime_dir, layers.layers if layers.available else None)
    failed = 0
    try:
        records = {}
        for function in store.list_functions():
            for summary in store.list_versions(function["path"]):
                version = store.get(function["path"], summary["version"]) if "dependencies" in summary else None
                if version is not None and version.deps:
                    records[version.deps["key"]] = version.deps
        for key, record in records.items():
            try:
                info = layers.ensure(record)
            except ApiError as error:
                failed += 1
                print(f"failed  {key}: {error.message}")
                continue
            print(f"{'present' if info.cached else 'built':<7} {key} ({info.size} bytes, {info.build_ms} ms)")
    finally:
        backend.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return 1 if failed else 0


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
    deps = commands.add_parser("deps", help="the library layers on this node: ls, prefetch, gc")
    deps.add_argument("action", choices=("ls", "prefetch", "gc"))
    deps.add_argument("--dry-run", action="store_true", help="gc: only list what would be removed")
    deps.add_argument("--data-dir", help="SQLite store and layer directory (FAAS_DATA_DIR)")
    for name, text in (("install", "copy to PREFIX and install faas.service/faas.slice"),
                       ("uninstall", "remove what install put in place")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--prefix", type=Path, default=Path("/opt/faas"))
        if name == "uninstall":
            command.add_argument("--purge", action="store_true", help="also delete stored functions and settings")
    add_client_commands(commands)
    args = parser.parse_args(argv)
    args.command = args.command or "serve"
    return args


def add_client_commands(commands: Any) -> None:
    url = {"help": "the server (FAAS_URL, default http://127.0.0.1:8080); the token is FAAS_TOKEN"}
    deploy = commands.add_parser("deploy", help="upload every *.py/*.js/*.ts under DIR whose code changed")
    deploy.add_argument("directory", metavar="DIR")
    deploy.add_argument("--url", **url)
    deploy.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    deploy.add_argument("--prune", action="store_true", help="delete functions (under --prefix) not in DIR")
    deploy.add_argument("--prefix", default="", help="deploy DIR's functions under this path")
    deploy.add_argument("--force", action="store_true", help="upload every function, changed or not")
    call = commands.add_parser("call", help="call a function: data on stdout, printed lines on stderr")
    call.add_argument("path")
    call.add_argument("input", nargs="?", metavar="JSON", help="the input as JSON ('-' reads stdin)")
    call.add_argument("--version", type=int)
    call.add_argument("--stream", action="store_true", help="print lines as the function prints them")
    call.add_argument("--url", **url)
    ls = commands.add_parser("ls", help="list the functions")
    ls.add_argument("--url", **url)
    logs = commands.add_parser("logs", help="an async call's printed lines and result (GET /calls/ID/events)")
    logs.add_argument("id")
    logs.add_argument("--url", **url)


def main(argv: list[str]) -> int:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("FAAS_LOG_LEVEL", "INFO").upper(),
                        format="%(levelname)s %(message)s" if under_journald else
                        "%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        return run_client(args)
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
    if args.command == "deps":
        return run_deps(config, args.action, args.dry_run)
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
