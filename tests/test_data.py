"""The dataset generator, the loader and the execution-accuracy metric."""
import hashlib
import json

import pytest

import util
from conftest import ROOT


def test_generator_is_deterministic_and_reproduces_committed_files(tmp_path):
    util.write_dataset(tmp_path)
    for name in ("train.json", "eval.json"):
        new = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert new == hashlib.sha256((ROOT / "dataset" / name).read_bytes()).hexdigest(), name


@pytest.fixture(scope="module")
def full():
    return util.load_rows(ROOT / "dataset" / "train.json"), util.load_rows(ROOT / "dataset" / "eval.json")


def test_every_chosen_runs_and_every_rejected_differs(full):
    for split in full:
        for r in split:
            gold = util.execute_sql(r["setup_sql"], r["chosen"])
            assert gold not in (None, [], [(None,)]), r["chosen"]
            assert util.execute_sql(r["setup_sql"], r["rejected"]) != gold, r["rejected"]
            for other in r["more_rejected"]:                              # every extra rejected answer is wrong too
                assert util.execute_sql(r["setup_sql"], other) != gold and other != r["rejected"], other


def test_variety_sizes_and_split(full):
    train, eval_ = full
    assert len(train) >= 5000 and len(eval_) >= 500
    assert {r["family"] for r in train} == set(util.FAMILIES)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in eval_}
    assert len({r["prompt"].split("(")[0] for r in train}) >= 20          # many table names
    for r in train[:50]:
        assert r["prompt"].startswith("Human: context= CREATE TABLE ") and r["prompt"].endswith(" Assistant:")


def test_demo_error_rate_in_band_and_habits_are_systematic(full):
    stats = util.dataset_stats(full[0])
    assert 0.6 <= stats["demo_correct"] <= 0.85
    assert stats["rejected_differs"] == 1.0
    by_kind = {}
    for r in full[0]:
        strict = r["family"] != "compare" or any(w in r["prompt"] for w in ("more than", "less than"))
        kind = "habit" if r["family"] in util.HABITS and strict else "clean"
        by_kind.setdefault(kind, []).append(util.execution_match(r["setup_sql"], r["chosen"], r["response"]))
    habit_rate = sum(by_kind["habit"]) / len(by_kind["habit"])
    assert habit_rate == pytest.approx(1 - util.HABIT_RATE, abs=0.03)   # the habit is the majority: greedy SFT copies it
    assert all(by_kind["clean"])                                        # elsewhere the demos are right


def test_rejected_includes_contrasts_against_shortcuts(full):
    rejected = [r["rejected"] for r in full[0]]
    # extra AND / DISTINCT where the question does not ask for them, strict > where it says "at least"
    assert sum(" AND " in x for r, x in zip(full[0], rejected) if r["family"] in ("lookup", "count", "agg_where")) > 200
    assert sum("DISTINCT" in x for r, x in zip(full[0], rejected) if r["family"] == "count") > 50
    assert sum(" > " in x for r, x in zip(full[0], rejected) if "at least" in r["prompt"]) > 50


def test_execution_match():
    setup = "CREATE TABLE t (name VARCHAR, age INTEGER); INSERT INTO t VALUES ('a', 3); INSERT INTO t VALUES ('b', 5);"
    assert util.execution_match(setup, "SELECT name FROM t WHERE age > 3", " SELECT name FROM t WHERE age >= 4")
    assert not util.execution_match(setup, "SELECT name FROM t WHERE age > 3", "SELECT name FROM t WHERE age >= 3")
    assert not util.execution_match(setup, "SELECT name FROM t", "SELECT nme FROM t")          # error -> wrong
    assert util.execution_match(setup, "SELECT name FROM t", "SELECT name FROM t ORDER BY age DESC")  # order-free
    assert util.execution_accuracy([{"setup_sql": setup, "chosen": "SELECT COUNT(*) FROM t"}] * 2,
                                   ["SELECT COUNT(name) FROM t", "SELECT 1"]) == 0.5
    runaway = "SELECT COUNT(*) FROM t a, t b, t c, t d, t e, t f, t g, t h, t i, t j, t k, t l, t m, t n, t o, t p, t q, t r, t s, t u, t v"
    assert util.execute_sql(setup, runaway) is None                 # stopped, not waited for


# ---------------------------------------------------------------- loader

ROW = {"prompt": "Human: q Assistant:", "chosen": " SELECT 1", "rejected": " SELECT 2", "response": " SELECT 1"}


def _jsonl(path, recs):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return path


def test_loader_formats_agree(tmp_path):
    import pandas as pd
    a = util.load_rows(_jsonl(tmp_path / "a.jsonl", [ROW, ROW]))
    (tmp_path / "b.json").write_text(json.dumps([ROW, ROW]))
    b = util.load_rows(tmp_path / "b.json")
    pd.DataFrame([ROW, ROW]).to_parquet(tmp_path / "c.parquet")
    c = util.load_rows(tmp_path / "c.parquet")
    assert a == b == c == [ROW, ROW]


def test_loader_aliases(tmp_path):
    rec = {"question": "Human: q Assistant:", "answer": " SELECT 1", "negative": " SELECT 2", "extra": 7}
    rec2 = {"query": "Human: q Assistant:", "response_chosen": " SELECT 1", "response_rejected": " SELECT 2"}
    rows = util.load_rows(_jsonl(tmp_path / "x.jsonl", [rec, rec2]))
    for r in rows:
        assert (r["prompt"], r["chosen"], r["rejected"]) == ("Human: q Assistant:", " SELECT 1", " SELECT 2")
    assert rows[0]["extra"] == 7


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "p", "chosen": "c", "rejected": ', "bad.jsonl:2: invalid JSON"),
    ({"prompt": "p", "chosen": "c"}, "bad.jsonl:2: field 'rejected' is missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "bad.jsonl:2: field 'chosen' is empty"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "bad.jsonl:2: field 'prompt' must be a string"),
    ([1, 2], "bad.jsonl:2: expected a JSON object"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "more_rejected": "x"}, "bad.jsonl:2: field 'more_rejected' must be"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "more_rejected": ["x", ""]}, "bad.jsonl:2: field 'more_rejected' must be"),
])
def test_loader_bad_rows_name_file_line_field(tmp_path, bad, message, capsys):
    path = _jsonl(tmp_path / "bad.jsonl", [ROW, bad, ROW])
    with pytest.raises(util.DataError, match=message):
        util.load_rows(path)
    rows = util.load_rows(path, skip_bad=True)
    assert len(rows) == 2
    assert "skipped 1 bad row(s)" in capsys.readouterr().out


def test_loader_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(util.DataError, match="empty"):
        util.load_rows(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError, match="0_download"):
        util.load_rows(tmp_path / "nope.json")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_special_tokens(tok, rows):
    assert tok.pad_token_id != tok.eos_token_id
    assert {tok.pad_token, tok.eos_token, tok.bos_token} == {"<pad>", "</s>", "<s>"}
    for r in rows[:20]:
        ids = util.encode_prompt(tok, r["prompt"]) + util.encode_response(tok, r["chosen"])
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == r["prompt"] + r["chosen"]
        assert tok.pad_token_id not in ids


def test_encode_batch_gives_the_tokenizers_own_ids(tok, rows):
    texts = [r[k] for r in rows for k in ("prompt", "chosen")] + ["", "  two  spaces", "é ü 中文 \t\n", "a </s> b <pad>"]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert util.encode_batch(tok, texts) == want
    assert util.encode_batch(tok, texts, bos=True, eos=True) == [[tok.bos_token_id] + w + [tok.eos_token_id] for w in want]

    class Slow:                                 # a tokenizer without a Rust backend takes the plain call
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, texts, add_special_tokens):
            return tok(texts, add_special_tokens=add_special_tokens)
    assert util.encode_batch(Slow(), texts, eos=True) == [w + [tok.eos_token_id] for w in want]


def test_shipped_tokenizer_is_reproducible(rows, tmp_path):
    full = util.load_rows(ROOT / "dataset" / "train.json")
    util.train_tokenizer(full, tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((ROOT / "tokenizer" / "tokenizer.json").read_text())


def test_fit_rows_drops_only_the_overlong_extra_rejected(tok, capsys):
    cfg = util.get_config("smoke", max_response_tokens=6)
    row = {"prompt": "Human: q Assistant:", "chosen": " SELECT 1", "rejected": " SELECT 2",
           "more_rejected": [" SELECT 3", " SELECT a FROM b WHERE c = 1 AND d = 2"]}
    kept = util.fit_rows(tok, [row], cfg, ("chosen", "rejected"), more_rejected=8)
    assert kept[0]["more_rejected"] == [" SELECT 3"] and len(row["more_rejected"]) == 2   # the input is not changed
    assert "skipped 1 more_rejected answers" in capsys.readouterr().out
    assert util.fit_rows(tok, [row, row], cfg, ("chosen", "rejected"), more_rejected=1)[1]["more_rejected"] == [" SELECT 3"]
    assert "skipped 2 more_rejected answers" in capsys.readouterr().out
    assert util.fit_rows(tok, [row], cfg, ("chosen", "rejected"))[0] == row    # a stage that uses none: row as is
    assert "more_rejected" not in capsys.readouterr().out
