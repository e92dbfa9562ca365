"""The SQLite calls' GroupCommit on a real SQLite file with real threads: writes that arrive
while another commits share the next transaction, and each keeps its own outcome.

The batch is made deterministic by holding the first write inside its commit until the
others have queued behind it."""
import threading

import pytest

import faas   # the repository root is on sys.path through its conftest.py
from tests.helpers import wait_until


@pytest.fixture
def commits(tmp_path):
    store = faas.SQLiteStore(tmp_path)
    with store.connection() as db:
        db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    yield faas.GroupCommit(store), store


def keys(store):
    return sorted(row[0] for row in store.rows("SELECT k FROM t"))


def insert(key):
    return lambda db: db.execute("INSERT INTO t VALUES (?)", (key,)).rowcount


def refuse(db):
    db.execute("INSERT INTO t VALUES ('refused')")
    raise faas.ApiError(429, "full")


def run_in_thread(commits, operation, outcomes, name):
    def call():
        try:
            outcomes[name] = ("ok", commits.run(operation))
        except BaseException as error:
            outcomes[name] = ("error", error)
    thread = threading.Thread(target=call)
    thread.start()
    return thread


def held_batch(commits, operations):
    """Run `first` alone while it is held, queue `operations` behind it, release: those
    then commit as one batch. Returns each one's outcome by name."""
    release, entered = threading.Event(), threading.Event()

    def first(db):
        entered.set()
        release.wait(10)
        return db.execute("INSERT INTO t VALUES ('first')").rowcount
    outcomes = {}
    threads = [run_in_thread(commits[0], first, outcomes, "first")]
    assert entered.wait(10)
    for name, operation in operations.items():
        threads.append(run_in_thread(commits[0], operation, outcomes, name))
    assert wait_until(lambda: len(commits[0].pending) == len(operations), timeout=10)
    release.set()
    for thread in threads:
        thread.join(10)
    return outcomes


def test_a_refused_write_leaves_the_others_of_its_batch(commits):
    outcomes = held_batch(commits, {"a": insert("a"), "refused": refuse, "b": insert("b")})
    assert outcomes["first"] == ("ok", 1) and outcomes["a"] == ("ok", 1) and outcomes["b"] == ("ok", 1)
    kind, error = outcomes["refused"]
    assert kind == "error" and isinstance(error, faas.ApiError) and error.status == 429
    assert keys(commits[1]) == ["a", "b", "first"]   # nothing of the refused write


def test_a_write_sqlite_refuses_fails_alone(commits):
    outcomes = held_batch(commits, {"a": insert("a"), "dup": insert("first"), "b": insert("b")})
    assert outcomes["first"] == ("ok", 1) and outcomes["a"] == ("ok", 1) and outcomes["b"] == ("ok", 1)
    kind, error = outcomes["dup"]
    assert kind == "error" and isinstance(error, faas.sqlite3.IntegrityError), outcomes["dup"]
    assert keys(commits[1]) == ["a", "b", "first"]


def test_a_lone_write_that_raises_writes_nothing(commits):
    with pytest.raises(faas.ApiError):
        commits[0].run(refuse)
    assert keys(commits[1]) == []
    assert commits[0].run(insert("after")) == 1   # and the next write goes through
    assert keys(commits[1]) == ["after"]
