"""The SQL sandbox: model- or data-written SQL cannot write files, change state, run past its
limits or raise; ordinary queries and the shipped dataset's gold results are unchanged."""
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from rlhf import sql_data
from conftest import ROOT

SETUP = ("CREATE TABLE t (name VARCHAR, age INTEGER); INSERT INTO t VALUES ('a', 3); "
         "INSERT INTO t VALUES ('b', 5); CREATE TABLE u (name VARCHAR, city VARCHAR); "
         "INSERT INTO u VALUES ('a', 'Oslo'); INSERT INTO u VALUES ('b', 'Lima');")
EMPTY_GOLD = "SELECT name FROM t WHERE age > 100"
RECURSE = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
JOIN21 = "SELECT COUNT(*) FROM " + ", ".join(f"t t{i}" for i in range(21))     # 2**21 rows


# ---------------------------------------------------------------- no statement can write a file


def file_attacks(d):
    """(setup_sql, query) pairs that wrote a file under `d` before the sandbox."""
    return {
        "attach from query": (SETUP, f"ATTACH DATABASE '{d}/x.db' AS p"),
        "attach from setup": (SETUP + f"ATTACH DATABASE '{d}/s.db' AS p; CREATE TABLE p.t (x); "
                              "INSERT INTO p.t VALUES (1);", "SELECT 1"),
        "vacuum into from query": (SETUP, f"VACUUM INTO '{d}/y.db'"),
        "vacuum into from setup": (SETUP + f"VACUUM INTO '{d}/z.db';", "SELECT 1"),
        "attach after a comment": (SETUP, f"SELECT 1 /* */; ATTACH '{d}/c.db' AS p"),
        "relative attach": (SETUP, "ATTACH 'rel.db' AS p"),
    }


@pytest.mark.parametrize("name", list(file_attacks("d")))
def test_no_statement_writes_a_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # a relative path would land here
    setup, query = file_attacks(tmp_path)[name]
    assert sql_data.execute_sql(setup, query) is None
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- memory and time stay bounded

BIG = {
    "randomblob 1 GB": (SETUP, "SELECT length(randomblob(1000000000))"),
    "zeroblob 1 GB": (SETUP, "SELECT length(zeroblob(1000000000) || 'x')"),
    "printf repeat 1e9": (SETUP, "SELECT length(printf('%.*c', 1000000000, 'x'))"),
    "replace blow-up": (SETUP, "SELECT length(replace(hex(zeroblob(4000)), '0', "
                        "hex(zeroblob(4000))))"),
    "substr and concat": (SETUP, "SELECT length(substr(hex(zeroblob(600000)), 1) || 'x')"),
    "recursive doubling string": (SETUP, "WITH RECURSIVE r(s, n) AS (SELECT 'x', 0 UNION ALL "
                                  "SELECT s || s, n + 1 FROM r WHERE n < 31) "
                                  "SELECT max(length(s)) FROM r"),
    "many big rows": (SETUP, RECURSE + "SELECT n || hex(zeroblob(4990)) FROM r LIMIT 1000000"),
    "many big distinct keys": (SETUP, RECURSE + "SELECT count(DISTINCT n || hex(zeroblob(4990))) "
                               "FROM (SELECT n FROM r LIMIT 1000000)"),
    "slow trim per row": (SETUP, RECURSE + "SELECT length(trim(n || hex(zeroblob(4990)), "
                          "replace(hex(zeroblob(400)), '0', 'b') || '0123456789')) FROM r"),
    "runaway cross join": (SETUP, JOIN21),
    "runaway setup": ("CREATE TABLE n (x); WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL "
                      "SELECT i + 1 FROM r) INSERT INTO n SELECT i FROM r;", "SELECT 1"),
    "big value in setup": ("CREATE TABLE b (x); INSERT INTO b VALUES (zeroblob(500000000) || 'x');",
                           "SELECT length(x) FROM b"),
}
# run in a fresh process, where the peak RSS (ru_maxrss) is the memory in use; the address-space
# cap only keeps a broken sandbox from taking the test machine down
CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.path.insert(0, sys.argv[1])
from rlhf import sql_data
setup, query = json.loads(sys.stdin.read())
r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
res = sql_data.execute_sql(setup, query)
seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([res, seconds, (r1 - r0) / 1024]))
"""


@pytest.mark.parametrize("name", list(BIG))
def test_attack_is_refused_in_bounded_time_and_memory(name):
    pytest.importorskip("resource")
    p = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], input=json.dumps(BIG[name]),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    result, seconds, rss_mb = json.loads(p.stdout)
    assert result is None
    assert seconds < 1.5, seconds                # before: 5 s (printf) to never (runaway setup)
    assert rss_mb < 100, rss_mb                  # before: 1 GB (randomblob) to 5.6 GB (big rows)


# ---------------------------------------------------------------- the answer may only read

STATE_CHANGES = ["DELETE FROM t", "UPDATE t SET age = 1", "INSERT INTO t VALUES ('c', 1)",
                 "DROP TABLE t", "VACUUM", "PRAGMA writable_schema = ON",
                 "PRAGMA journal_mode = OFF", "PRAGMA user_version = 5",
                 "DELETE FROM t RETURNING *", "EXPLAIN DELETE FROM t", "CREATE TABLE v (x)", "",
                 "  -- nothing\n"]


@pytest.mark.parametrize("query", STATE_CHANGES)
def test_non_select_never_matches_an_empty_gold(query):
    assert sql_data.execute_sql(SETUP, EMPTY_GOLD) == []
    assert sql_data.execute_sql(SETUP, query) is None
    assert not sql_data.execution_match(SETUP, EMPTY_GOLD, query)   # before: True for most


@pytest.mark.parametrize("setup_tail", [
    "PRAGMA writable_schema = ON;", "PRAGMA user_version = 5;", "ALTER TABLE t ADD c;",
    "CREATE TRIGGER g AFTER INSERT ON t BEGIN DELETE FROM t; END;",
    "CREATE VIRTUAL TABLE f USING fts5(x);"])
def test_setup_may_only_build_and_fill_tables(setup_tail):
    assert sql_data.execute_sql(SETUP + setup_tail, "SELECT 1") is None


@pytest.mark.parametrize("query", ["SELECT 1; DROP TABLE t", "SELECT 1; SELECT 2",
                                   "SELECT 1 /* */; PRAGMA user_version = 5",
                                   "SELECT 1 -- \n; VACUUM"])
def test_several_statements_are_refused(query):
    before = sql_data.REFUSED["several statements"]
    assert sql_data.execute_sql(SETUP, query) is None
    assert sql_data.REFUSED["several statements"] == before + 1


# fts3_tokenizer gave a C pointer before; a pragma function is refused like the PRAGMA itself
@pytest.mark.parametrize("query", ["SELECT load_extension('x')", "SELECT fts3_tokenizer('simple')",
                                   "SELECT * FROM pragma_table_info('t')",
                                   "SELECT FORMAT('%d', 1)"])
def test_risky_functions_are_refused(query):
    assert sql_data.execute_sql(SETUP, query) is None


def test_refusals_are_counted_by_reason():
    before = sql_data.REFUSED.copy()
    assert sql_data.execute_sql(SETUP, "DELETE FROM t") is None
    assert sql_data.execute_sql(SETUP, "SELECT length(zeroblob(1000000))") is None
    assert sql_data.execute_sql(SETUP, JOIN21) is None
    assert sql_data.execute_sql(SETUP, "SELECT nme FROM t") is None
    gained = sql_data.REFUSED - before
    assert gained == {"not authorized": 1, "too big": 1, "steps": 1, "error": 1}


# ---------------------------------------------------------------- ordinary SQL is unchanged

GOOD = {
    "SELECT name FROM t WHERE age > 3": [("b",)],
    "select NAME from T where AGE >= 3 order by age desc": [("a",), ("b",)],
    "SELECT name FROM t;": [("a",), ("b",)],                      # one trailing ';' still runs
    "SELECT name FROM t; -- done": [("a",), ("b",)],
    "WITH o AS (SELECT name FROM t WHERE age < 4) SELECT name FROM o": [("a",)],
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) "
    "SELECT n FROM r": [(i,) for i in range(1, 11)],
    "SELECT COUNT(*), SUM(age), AVG(age), MIN(name), MAX(age) FROM t": [(2, 8, 4.0, "a", 5)],
    "SELECT AVG(age) / 3.0 FROM t": [(1.333333,)],                 # floats rounded to 6 places
    "SELECT t.name, u.city FROM t JOIN u ON t.name = u.name": [("a", "Oslo"), ("b", "Lima")],
    "SELECT name FROM t WHERE age = (SELECT MAX(age) FROM t)": [("b",)],
    "SELECT name FROM u WHERE name IN (SELECT name FROM t WHERE age > 4)": [("b",)],
    "SELECT city, COUNT(*) FROM u GROUP BY city HAVING COUNT(*) > 0": [("Lima", 1), ("Oslo", 1)],
    "SELECT DISTINCT upper(name) FROM t WHERE name LIKE 'a%'": [("A",)],
    "SELECT NULL UNION ALL SELECT 1": [(None,), (1,)],             # raised TypeError before
    "SELECT 'a' UNION ALL SELECT 1": [(1,), ("a",)],
    "SELECT name FROM t WHERE age > 100": [],
}


@pytest.mark.parametrize("query", list(GOOD))
def test_ordinary_queries_return_their_rows(query):
    assert sql_data.execute_sql(SETUP, query) == GOOD[query]


def test_setup_may_use_views_drops_and_transactions():
    setup = ("DROP TABLE IF EXISTS t; BEGIN; " + SETUP + " COMMIT; CREATE VIEW old AS "
             "SELECT name FROM t WHERE age > 4; CREATE INDEX i ON t (age); UPDATE t SET age = 9 "
             "WHERE name = 'a'; DELETE FROM u WHERE city = 'Lima';")
    assert sql_data.execute_sql(setup, "SELECT * FROM old") == [("a",), ("b",)]
    assert sql_data.execute_sql(setup, "SELECT COUNT(*) FROM u") == [(1,)]


def plain_sqlite(setup_sql, query):
    """The metric without the sandbox: what the shipped results must stay equal to."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(setup_sql)
        rows = con.execute(query).fetchall()
        return sorted(tuple(round(x, 6) if isinstance(x, float) else x for x in r) for r in rows)
    except sqlite3.Error:
        return None
    finally:
        con.close()


def test_shipped_dataset_results_are_unchanged():
    rows = [json.loads(line) for name in ("train.json", "eval.json")
            for line in (ROOT / "dataset" / name).read_text().splitlines()]
    t0 = time.perf_counter()
    for r in rows:
        assert plain_sqlite(r["setup_sql"], r["chosen"]) is not None, r["chosen"]
        for query in (r["chosen"], r["response"]):                 # the gold metric's two sides
            expected = plain_sqlite(r["setup_sql"], query)
            assert sql_data.execute_sql(r["setup_sql"], query) == expected, query
    assert time.perf_counter() - t0 < 60                            # about 4 s on 2 cores
