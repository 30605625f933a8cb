"""The synthetic text-to-SQL preference set (dataset/train.json, eval.json) and its gold metric.

Each row: a CREATE TABLE context, a question, and the SQL that answers it. `chosen` is correct,
`rejected` is a plausible mistake, `response` is a human-style demonstration with systematic
habits, and `setup_sql` fills the table so that any SQL can be executed and compared with the
gold answer (execution accuracy). util re-exports these names."""
from __future__ import annotations

import collections
import itertools
import random
import sqlite3
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:                          # Windows: no memory guard, the other limits still hold
    resource = None

from .runtime import ROOT
from .saving import write_jsonl


TABLES = ["employee", "player", "city", "book", "ship", "school", "movie", "song", "team", "store",
          "car", "hotel", "airport", "student", "museum", "restaurant", "river", "mountain",
          "company", "club", "singer", "film", "station", "bridge", "farm", "park", "race",
          "journal", "gym", "bakery", "festival", "library"]
TEXT_COLUMNS = {
    "name": ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Juno",
             "Kira", "Luis"],
    "city": ["Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Tokyo", "Accra", "Perth",
             "Dublin"],
    "country": ["France", "Peru", "Norway", "Egypt", "India", "Chile", "Italy", "Japan", "Ghana",
                "Kenya"],
    "team": ["Lions", "Eagles", "Sharks", "Wolves", "Bears", "Hawks", "Tigers", "Owls", "Foxes"],
    "color": ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey"],
    "genre": ["drama", "comedy", "jazz", "rock", "horror", "poetry", "fantasy", "history", "folk"],
    "status": ["active", "retired", "pending", "closed", "open", "paused", "sold"],
    "region": ["north", "south", "east", "west", "central", "coastal", "inland"],
    "owner": ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay"],
    "category": ["gold", "silver", "bronze", "basic", "premium", "standard"],
    "language": ["English", "Spanish", "French", "Hindi", "Arabic", "Swahili", "Korean"],
    "position": ["forward", "guard", "center", "keeper", "striker", "winger"],
}
NUMBER_COLUMNS = {                  # at most two digits: small models copy short numbers reliably
    "age": (18, 90), "salary": (10, 99), "height": (50, 99), "weight": (40, 99),
    "population": (10, 99),
    "score": (1, 99), "price": (5, 99), "rank": (1, 60), "points": (0, 99),
    "capacity": (20, 99), "length": (10, 70), "rating": (1, 10), "budget": (10, 99),
    "floors": (1, 80),
    "members": (3, 99), "wins": (0, 40), "goals": (0, 50), "pages": (40, 99), "seats": (2, 50),
}
AGGREGATES = {"MAX": "highest", "MIN": "lowest", "AVG": "average", "SUM": "total"}
FAMILIES = ["lookup", "count", "aggregate", "compare", "and", "order", "distinct", "agg_where"]
# the demonstrators' recurring habits: in these families most demos make the same mistake
HABITS = {"compare": "'more/less than' written as >= / <=", "and": "second condition dropped",
          "distinct": "DISTINCT forgotten in COUNT"}
HABIT_RATE = 0.75


def plural(word: str) -> str:
    """English plural of a table noun (city -> cities, bus -> buses)."""
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def _sql_value(v) -> str:
    """An SQL literal: numbers bare, text single-quoted."""
    return str(v) if isinstance(v, int) else "'" + v.replace("'", "''") + "'"


def _make_table(rng: random.Random) -> dict:
    """A random table: name, 2 text and 2 number columns, 7 rows with a repeated text value and
    distinct numbers."""
    name = rng.choice(TABLES)
    texts = rng.sample(sorted(TEXT_COLUMNS), 2)
    nums = rng.sample(sorted(NUMBER_COLUMNS), 2)
    columns = [texts[0], nums[0], texts[1], nums[1]]
    n_rows = 7
    data = {c: [rng.choice(TEXT_COLUMNS[c]) for _ in range(n_rows)] for c in texts}
    # a repeated value, so DISTINCT and COUNT(*) questions bite
    for c in texts:
        data[c][rng.randrange(1, n_rows)] = data[c][0]
    for c in nums:                           # distinct numbers, so highest/lowest have one answer
        lo, hi = NUMBER_COLUMNS[c]
        data[c] = rng.sample(range(lo, hi + 1), n_rows)
    rows = [tuple(data[c][i] for c in columns) for i in range(n_rows)]
    return dict(name=name, columns=columns, texts=texts, nums=nums, rows=rows)


def _create_sql(t: dict) -> str:
    cols = ", ".join(f"{c} {'INTEGER' if c in NUMBER_COLUMNS else 'VARCHAR'}" for c in t["columns"])
    return f"CREATE TABLE {t['name']} ({cols})"


def _setup_sql(t: dict) -> str:
    inserts = " ".join(f"INSERT INTO {t['name']} VALUES ({', '.join(_sql_value(v) for v in r)});"
                       for r in t["rows"])
    return _create_sql(t) + "; " + inserts


def _question(rng: random.Random, t: dict, family: str) -> tuple[str, str, str, str, list[str]]:
    """(question, gold SQL, habit SQL or '', contrast SQL or '', wrong SQLs) for one family on
    table t.
    A contrast is a mistake that *adds* what fixes a habit where the question does not ask for it
    (an extra AND, a DISTINCT, a non-strict comparison), so a reward model cannot learn
    "AND/DISTINCT/>= is good" as a shortcut."""
    T, rows, cols = t["name"], t["rows"], t["columns"]
    Ts = plural(T)
    b, c = t["texts"]
    n, m = t["nums"]
    idx = {col: i for i, col in enumerate(cols)}
    row = rng.choice(rows)
    v, w, k = row[idx[b]], row[idx[c]], row[idx[n]]
    other_v = rng.choice([x for x in TEXT_COLUMNS[b] if x != v])
    a = rng.choice([x for x in cols if x != b])
    wrong_a = rng.choice([x for x in cols if x not in (a, b)])
    habit = contrast = ""
    w2 = rng.choice([x for x in TEXT_COLUMNS[c] if x != w])
    if family in ("lookup", "count") and rng.random() < 0.5:    # numbers to copy, not only words
        b, v, other_v = n, k, rng.choice([x for x in range(*NUMBER_COLUMNS[n]) if x != k])
        a = rng.choice([x for x in cols if x != b])
        wrong_a = rng.choice([x for x in cols if x not in (a, b)])
    # the filter value as an SQL literal (quoted if text)
    sv, so = _sql_value(v), _sql_value(other_v)
    if family == "lookup":
        q = rng.choice([f"What is the {a} of the {T} whose {b} is {v}?",
                        f"What {a} does the {T} with {b} {v} have?"])
        gold = f"SELECT {a} FROM {T} WHERE {b} = {sv}"
        contrast = f"SELECT {a} FROM {T} WHERE {b} = {sv} AND {c} = '{w2}'"
        wrong = [contrast, f"SELECT {wrong_a} FROM {T} WHERE {b} = {sv}",
                 f"SELECT {a} FROM {T} WHERE {b} = {so}",
                 f"SELECT {a} FROM {T}", f"SELECT {a} FROM {T} WHERE {b} = {v}",
                 f"SELECT {a} {T} WHERE {b} = {sv}"]
    elif family == "count":
        q = rng.choice([f"How many {Ts} have {b} {v}?", f"Count the {Ts} whose {b} is {v}."])
        gold = f"SELECT COUNT(*) FROM {T} WHERE {b} = {sv}"
        contrast = rng.choice([f"SELECT COUNT(DISTINCT {b}) FROM {T} WHERE {b} = {sv}",
                               f"SELECT COUNT(*) FROM {T} WHERE {b} = {sv} AND {c} = '{w2}'"])
        wrong = [contrast, f"SELECT COUNT(*) FROM {T}",
                 f"SELECT COUNT(*) FROM {T} WHERE {b} = {so}",
                 f"SELECT COUNT(*) FROM {T} WHERE {b} != {sv}",
                 f"SELECT {b} FROM {T} WHERE {b} = {sv}",
                 f"SELECT COUNT(*) FROM WHERE {b} = {sv}"]
    elif family == "aggregate":
        agg = rng.choice(sorted(AGGREGATES))
        q = rng.choice([f"What is the {AGGREGATES[agg]} {n} of all {Ts}?",
                        f"Find the {AGGREGATES[agg]} {n} among {Ts}."])
        gold = f"SELECT {agg}({n}) FROM {T}"
        wrong = [f"SELECT {a2}({n}) FROM {T}" for a2 in sorted(AGGREGATES) if a2 != agg] + \
                [f"SELECT {agg}({m}) FROM {T}", f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{v}'",
                 f"SELECT {agg}({n} FROM {T}"]
    elif family == "compare":
        # a value in the table, with rows on both sides
        k = sorted(r[idx[n]] for r in rows)[rng.randrange(2, 5)]
        op, word = rng.choice([(">", "more than"), ("<", "less than"), (">=", "at least"),
                               ("<=", "at most")])
        q = rng.choice([f"List the {a} of {Ts} with {n} {word} {k}.",
                        f"Which {a} belongs to {Ts} whose {n} is {word} {k}?"])
        gold = f"SELECT {a} FROM {T} WHERE {n} {op} {k}"
        if len(op) == 1:                    # the habit: 'more than 30' written as >= 30
            habit = f"SELECT {a} FROM {T} WHERE {n} {op}= {k}"
        else:                               # 'at least 30' really is >= 30; the strict one is wrong
            contrast = f"SELECT {a} FROM {T} WHERE {n} {op[0]} {k}"
        flip = {">": "<", "<": ">", ">=": "<=", "<=": ">="}[op]
        wrong = [habit or contrast, f"SELECT {a} FROM {T} WHERE {n} {flip} {k}",
                 f"SELECT {wrong_a} FROM {T} WHERE {n} {op} {k}",
                 f"SELECT {a} FROM {T} WHERE {m} {op} {k}", f"SELECT {a} FROM {T} WHERE {n} = {k}",
                 f"SELECT {a} FROM {T} {n} {op} {k}"]
    elif family == "and":
        q = rng.choice([f"What is the {n} of the {T} whose {b} is {v} and {c} is {w}?",
                        f"Give the {n} of {Ts} with {b} {v} and {c} {w}."])
        gold = f"SELECT {n} FROM {T} WHERE {b} = '{v}' AND {c} = '{w}'"
        habit = f"SELECT {n} FROM {T} WHERE {b} = '{v}'"
        wrong = [habit, f"SELECT {n} FROM {T} WHERE {b} = '{v}' OR {c} = '{w}'",
                 f"SELECT {n} FROM {T} WHERE {c} = '{w}'",
                 f"SELECT {m} FROM {T} WHERE {b} = '{v}' AND {c} = '{w}'",
                 f"SELECT {n} FROM {T} WHERE {b} = '{v}' AND {c} = '{w}"]
    elif family == "order":
        desc = rng.random() < 0.5
        word = "highest" if desc else "lowest"
        q = rng.choice([f"Which {b} has the {word} {n}?",
                        f"Name the {b} of the {T} with the {word} {n}."])
        gold = f"SELECT {b} FROM {T} ORDER BY {n} {'DESC' if desc else 'ASC'} LIMIT 1"
        wrong = [f"SELECT {b} FROM {T} ORDER BY {n} {'ASC' if desc else 'DESC'} LIMIT 1",
                 f"SELECT {b} FROM {T} ORDER BY {m} {'DESC' if desc else 'ASC'} LIMIT 1",
                 f"SELECT {c} FROM {T} ORDER BY {n} {'DESC' if desc else 'ASC'} LIMIT 1",
                 f"SELECT {b} FROM {T} ORDER {n} {'DESC' if desc else 'ASC'} LIMIT 1"]
    elif family == "distinct":
        q = rng.choice([f"How many different {b} values do the {Ts} have?",
                        f"Count the distinct {b} of all {Ts}."])
        gold = f"SELECT COUNT(DISTINCT {b}) FROM {T}"
        habit = f"SELECT COUNT({b}) FROM {T}"
        wrong = [habit, f"SELECT COUNT(DISTINCT {c}) FROM {T}", f"SELECT DISTINCT {b} FROM {T}",
                 f"SELECT COUNT(DISTINCT {b} FROM {T}"]
    elif family == "agg_where":
        agg = rng.choice(sorted(AGGREGATES))
        q = rng.choice([f"What is the {AGGREGATES[agg]} {n} of {Ts} whose {b} is {v}?",
                        f"Find the {AGGREGATES[agg]} {n} for {Ts} with {b} {v}."])
        gold = f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{v}'"
        contrast = f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{v}' AND {c} = '{w2}'"
        wrong = [contrast, f"SELECT {agg}({n}) FROM {T}",
                 f"SELECT {agg}({m}) FROM {T} WHERE {b} = '{v}'",
                 f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{other_v}'"] + \
                [f"SELECT {a2}({n}) FROM {T} WHERE {b} = '{v}'"
                 for a2 in sorted(AGGREGATES) if a2 != agg]
    else:
        raise ValueError(f"unknown family {family!r}")
    return q, gold, habit, contrast, wrong


def format_prompt(create_sql: str, question: str) -> str:
    """The prompt format of Simple_RLHF's sql-create-context data."""
    return f"Human: context= {create_sql} question= {question} Assistant:"


def make_row(rng: random.Random, family: str) -> dict | None:
    """One preference row of a family, or None when this random table cannot make every wrong SQL
    differ."""
    t = _make_table(rng)
    setup = _setup_sql(t)
    q, gold, habit, contrast, wrong = _question(rng, t, family)
    gold_result = execute_sql(setup, gold)
    if gold_result is None or gold_result in ([], [(None,)]):
        return None                                   # empty answers make wrong queries look right
    wrong = [s for s in wrong if s and execute_sql(setup, s) != gold_result]
    if (habit and habit not in wrong) or (contrast and contrast not in wrong) or not wrong:
        return None                         # the habit / contrast must really change the result
    # rejected: the family's habit (or the contrast) half the time, else any other mistake
    special = habit or contrast
    rejected = special if special and rng.random() < 0.5 else rng.choice(wrong)
    response = habit if habit and rng.random() < HABIT_RATE else gold
    return {"prompt": format_prompt(_create_sql(t), q), "chosen": " " + gold,
            "rejected": " " + rejected, "response": " " + response, "family": family,
            "setup_sql": setup,
            "more_rejected": [" " + s for s in wrong if s != rejected]}


def make_dataset(n_train: int = 6000, n_eval: int = 800,
                 seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Deterministic train and eval rows, families in equal shares; no eval prompt appears in
    train."""
    rng = random.Random(seed)
    train, eval_, seen = [], [], set()
    for rows, n in ((train, n_train), (eval_, n_eval)):
        i = 0
        while len(rows) < n:
            row = make_row(rng, FAMILIES[i % len(FAMILIES)])
            if row is None or row["prompt"] in seen:
                continue
            seen.add(row["prompt"])
            rows.append(row)
            i += 1
    return train, eval_


def write_dataset(data_dir=ROOT / "dataset") -> dict:
    """Regenerate dataset/train.json and dataset/eval.json (byte for byte the committed files)."""
    train, eval_ = make_dataset()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    write_jsonl(train, Path(data_dir, "train.json"))
    write_jsonl(eval_, Path(data_dir, "eval.json"))
    return {"train": len(train), "eval": len(eval_)}

# ------------------------------------------------------------- execution accuracy (the gold metric)


# Every execution of data- or model-written SQL goes through execute_sql: an in-memory database
# that no statement can leave (no ATTACH, VACUUM INTO, PRAGMA, extension), with caps on value size,
# VM steps, wall time, memory and rows. A refused statement is an execution failure (None).
REFUSED = collections.Counter()              # failures by reason ('not authorized', 'steps', ...)
SETUP_MAX_STEPS = 2_000_000                  # VM instructions for setup_sql (shipped: ~100)
TIME_LIMIT_S = 0.5                           # per phase (setup, query); checked every _EVERY steps
MEMORY_LIMIT = 64 << 20                      # bytes a call may add to the process's peak RSS
MAX_ROWS = 100_000                           # more result rows than this: a failure
QUERY_SQL_LENGTH = 100_000                   # bytes of query text; model answers are < 1 KB
SETUP_SQL_LENGTH = 1_000_000                 # bytes of setup script; the shipped ones are < 600
_EVERY = 100                                 # progress check period in VM instructions
_LIMITS = {
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,        # no second database, so no file (VACUUM INTO attaches)
    # a longer string/blob/row fails ("too big"); small because instr, replace and trim take time
    # quadratic in it within one VM step, where no guard runs: 1 MB strings, 6 s to hours
    sqlite3.SQLITE_LIMIT_LENGTH: 10_000,
    sqlite3.SQLITE_LIMIT_COLUMN: 500,
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 200,    # parser recursion
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 50,
    sqlite3.SQLITE_LIMIT_FUNCTION_ARG: 32,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1000,
}
_A = sqlite3
_QUERY_ACTIONS = frozenset({_A.SQLITE_SELECT, _A.SQLITE_READ, _A.SQLITE_FUNCTION,
                            _A.SQLITE_RECURSIVE})
# setup may build and fill its own tables; DROP too, so scripts starting "DROP TABLE IF EXISTS" run
_SETUP_ACTIONS = _QUERY_ACTIONS | {
    _A.SQLITE_CREATE_TABLE, _A.SQLITE_CREATE_TEMP_TABLE, _A.SQLITE_CREATE_INDEX,
    _A.SQLITE_CREATE_TEMP_INDEX, _A.SQLITE_CREATE_VIEW, _A.SQLITE_CREATE_TEMP_VIEW,
    _A.SQLITE_DROP_TABLE, _A.SQLITE_DROP_TEMP_TABLE, _A.SQLITE_DROP_INDEX,
    _A.SQLITE_DROP_TEMP_INDEX, _A.SQLITE_DROP_VIEW, _A.SQLITE_DROP_TEMP_VIEW,
    _A.SQLITE_INSERT, _A.SQLITE_UPDATE, _A.SQLITE_DELETE, _A.SQLITE_TRANSACTION,
    _A.SQLITE_SAVEPOINT, _A.SQLITE_REINDEX}      # CREATE INDEX asks for REINDEX too
# fts3_tokenizer('simple') returns a C pointer, and with 2 arguments installs one; printf (alias
# format) repeats '%.*c' a billion times in one step, past the length limit (5 s, result NULL)
_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "printf", "format"})
_TYPE_RANK = {type(None): 0, int: 1, float: 1, str: 2, bytes: 3}


def _authorizer(allowed: frozenset):
    """An sqlite authorizer admitting only `allowed` actions on the main and temp databases."""
    def check(action, arg1, arg2, db_name, source):
        if action not in allowed or db_name not in (None, "main", "temp"):
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
    return check


def _peak_rss() -> int:
    """The process's peak resident memory in bytes; 0 where the resource module is missing."""
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024    # macOS counts bytes, Linux KiB


def _reason(e: BaseException) -> str:
    """A short failure reason for REFUSED, from an exception raised while running SQL."""
    msg = str(e).lower()
    if isinstance(e, MemoryError):
        return "memory"
    if "not authorized" in msg or "too many attached" in msg:
        return "not authorized"
    if "too big" in msg or "too large" in msg:
        return "too big"
    if "one statement at a time" in msg:
        return "several statements"
    return "error"


def _sorted_rows(rows: list) -> list:
    """Rows with floats rounded to 6 places, sorted so that results compare order-free."""
    rows = [tuple(round(x, 6) if isinstance(x, float) else x for x in r) for r in rows]
    try:
        return sorted(rows)
    except TypeError:                        # NULL or text next to numbers: rank by type first
        return sorted(rows, key=lambda r: tuple((_TYPE_RANK[type(x)], 0 if x is None else x)
                                                for x in r))


def execute_sql(setup_sql: str, query: str, max_steps: int = 200_000):
    """Sorted rows of `query` (sandboxed) on a new db built by `setup_sql`; None on failure."""
    con = sqlite3.connect(":memory:", isolation_level=None)   # no implicit BEGIN before a query
    left = [SETUP_MAX_STEPS // _EVERY]       # progress checks left in the current phase
    why = [None]                             # which guard stopped the VM, if one did
    deadline, peak0 = [time.monotonic() + TIME_LIMIT_S], _peak_rss()

    def guard():                             # a runaway statement is stopped, not waited for
        left[0] -= 1
        if left[0] < 0:
            why[0] = "steps"
        elif time.monotonic() > deadline[0]:
            why[0] = "time"
        elif _peak_rss() - peak0 > MEMORY_LIMIT:
            why[0] = "memory"
        return why[0] is not None
    try:
        for limit, value in _LIMITS.items():
            con.setlimit(limit, value)
        con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, SETUP_SQL_LENGTH)
        if hasattr(con, "enable_load_extension"):     # absent where Python lacks extension support
            con.enable_load_extension(False)
        if hasattr(con, "setconfig") and hasattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE"):  # 3.12+
            con.setconfig(sqlite3.SQLITE_DBCONFIG_DEFENSIVE, True)
        con.execute("PRAGMA temp_store = MEMORY")     # big sorts must not spill to temp files
        con.set_progress_handler(guard, _EVERY)
        con.set_authorizer(_authorizer(_SETUP_ACTIONS))
        con.executescript(setup_sql)
        con.set_authorizer(_authorizer(_QUERY_ACTIONS))           # the answer may only read
        con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, QUERY_SQL_LENGTH)
        left[0], deadline[0] = max_steps // _EVERY, time.monotonic() + TIME_LIMIT_S
        cur = con.execute(query)             # more than one statement raises ProgrammingError
        if cur.description is None:          # an empty answer or a statement that is no query
            REFUSED["not a query"] += 1
            return None
        rows = list(itertools.islice(cur, MAX_ROWS + 1))
        if len(rows) > MAX_ROWS:
            REFUSED["too many rows"] += 1
            return None
        return _sorted_rows(rows)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as e:
        REFUSED[why[0] or _reason(e)] += 1
        return None
    finally:
        con.close()


def execution_match(setup_sql: str, gold: str, predicted: str) -> bool:
    """True when the predicted SQL runs and returns the same rows as the gold SQL."""
    gold_rows = execute_sql(setup_sql, gold)
    return gold_rows is not None and execute_sql(setup_sql, predicted) == gold_rows


def execution_accuracy(rows: list[dict], predictions: list[str]) -> float:
    """Share of predictions whose result equals the gold (`chosen`) result on the row's tables."""
    hits = [execution_match(r["setup_sql"], r["chosen"], p) for r, p in zip(rows, predictions)]
    return sum(hits) / max(len(hits), 1)


def dataset_stats(rows: list[dict]) -> dict:
    """Rows per family, demo correctness and the share of rejected answers whose result differs."""
    import collections
    fam = collections.Counter(r.get("family", "?") for r in rows)
    demo_ok = [execution_match(r["setup_sql"], r["chosen"], r["response"]) for r in rows]
    rej_diff = [not execution_match(r["setup_sql"], r["chosen"], r["rejected"]) for r in rows]
    return {"rows": len(rows), "per_family": dict(sorted(fam.items())),
            "demo_correct": sum(demo_ok) / len(rows), "rejected_differs": sum(rej_diff) / len(rows)}
