"""Your own data through every stage: chat-style pairs with no response and no setup_sql, prompts
in a .txt, the report without a gold metric; data hygiene: BOM, CRLF, duplicate pairs, leakage,
HH-style rows, chats, column names, hub ids."""
import contextlib
import dataclasses
import importlib.util
import io
import json
import math

import pytest

from rlhf import data_files
import util
from conftest import ROOT

FIX = ROOT / "tests" / "fixtures"


def _smoke(out, **more):
    """The smoke preset on the fixture: 200 chat pairs, 60 prompts in a .txt, 40 held-out rows."""
    pairs = str(FIX / "chat_prefs.jsonl")
    return util.load_config({"preset": "smoke", "out_dir": str(out), "sft_data": pairs,
                             "pref_data": pairs, "prompt_data": str(FIX / "chat_prompts.txt"),
                             "eval_data": str(FIX / "chat_eval.jsonl"), **more})


def _printed(fn, *args):
    """(fn's result, what it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args)
    return result, buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """SFT, reward model, PPO and DPO on the fixture, in-process as `python util.py <stage>`."""
    cfg = _smoke(tmp_path_factory.mktemp("own"))
    return cfg, {st: _printed(util.run_stage, st, cfg) for st in ("sft", "rm", "ppo", "dpo")}


def test_fixture_is_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_chat_prefs", FIX / "make_chat_prefs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.HERE = tmp_path
    gen.main()
    for name in ("chat_prefs.jsonl", "chat_eval.jsonl", "chat_prompts.txt"):
        assert (tmp_path / name).read_bytes() == (FIX / name).read_bytes(), name
    rows = util.load_rows(FIX / "chat_prefs.jsonl")
    assert len(rows) == 200 and not any("response" in r or "setup_sql" in r for r in rows)


def test_every_stage_runs_on_chat_pairs_and_says_what_it_used(run):
    cfg, out = run
    printed = {stage: text for stage, (_, text) in out.items()}
    # 2 of the first 64 pairs are held out for validation (Config.val_fraction): 62 train
    assert "2 held out for validation (Config.val_fraction=0.05)" in printed["sft"]
    assert ("SFT training rows: 62 of 62 rows have no 'response': SFT uses their 'chosen' answer"
            in printed["sft"])
    assert "SFT: 62 training rows used, 16 held-out rows" in printed["sft"]
    assert "reward model: 62 training pairs used, 16 held-out pairs" in printed["rm"]
    # the reward's scale is measured on SFT answers to the 2 validation prompts
    assert "preference pairs (val): 2 of 64 rows" in printed["rm"]
    assert (f"prompts (train): 58 of 60 rows from {FIX / 'chat_prompts.txt'}"
            in printed["ppo"])                                              # .txt feeds PPO
    assert ("DPO: 62 training pairs used; 2 validation pairs and 0 validation prompts for the curves"
            in printed["dpo"])              # chat pairs have no tables to run a sampled answer on
    assert "leakage: 0 of 16 evaluation prompts are also in the SFT demonstrations" in \
        printed["sft"]
    for stage, (summary, _) in out.items():
        finite = {k: v for k, v in summary.items() if k != "gold_acc"}
        assert all(math.isfinite(v) for v in finite.values() if isinstance(v, float)), stage
    assert math.isfinite(out["sft"][0]["eval_loss"]) and math.isfinite(out["rm"][0]["eval_acc"])
    assert math.isnan(out["ppo"][0]["gold_acc"])      # no setup_sql: no verdict, not accuracy 0
    for d in ("actor", "critic", "rlhf", "dpo"):
        assert (cfg.path(d, "config.json").exists() and cfg.path(d, "run_config.json").exists()), d


def test_each_stage_leaves_its_record_under_logs(run):
    cfg, out = run
    for stage in ("sft", "rm", "ppo", "dpo"):
        lines = cfg.path("logs", f"{stage}.jsonl").read_text().splitlines()
        history = [json.loads(ln) for ln in lines]
        assert history and history[-1]["step" if stage != "ppo" else "iteration"] == \
            out[stage][0]["step" if stage != "ppo" else "iteration"]
        assert "NaN" not in "".join(lines)                 # strict JSON: a NaN is written as null
        again = util.load_config(cfg.path("logs", f"{stage}_config.json"))
        assert again == cfg                             # the resolved config loads back as it was
        data = json.loads(cfg.path("logs", f"{stage}_data.json").read_text())
        assert data["leaked_eval_prompts"] == 0 and data["eval"]["used"] == 16
    sources = json.loads(cfg.path("logs", "sft_data.json").read_text())
    assert sources["sft"]["source"] == str(FIX / "chat_prefs.jsonl")
    metrics = json.loads(cfg.path("actor", "metrics.json").read_text())["history"]
    assert len(cfg.path("logs", "sft.jsonl").read_text().splitlines()) == len(metrics)


def test_evaluation_and_report_without_gold_show_what_needs_none(run, monkeypatch):
    cfg, _ = run
    tok = util.load_tokenizer(cfg.path("actor"))
    model = util.load_causal_lm(cfg.path("actor"), cfg=cfg)
    rm = util.load_score_model(cfg.path("critic"), cfg=cfg)
    evalset = util.load_data(cfg, "eval")
    summary, rows = util.evaluate_policy(model, tok, evalset, cfg, rm=rm, ref=model, desc="SFT")
    assert "exec_acc_greedy" not in summary and summary["n_with_setup_sql"] == 0
    assert {"rm_score", "kl_to_sft", "length", "eos_rate"} <= set(summary)
    assert math.isfinite(summary["rm_score"]) and all(r["greedy_ok"] is None for r in rows)
    monkeypatch.setattr(util, "REPORT_MODELS", {"SFT": "actor", "DPO": "dpo"})    # two are enough
    conf = cfg.path("my.json")
    conf.write_text(json.dumps(dataclasses.asdict(cfg)))
    _, text = _printed(util.main, ["report", "--config", str(conf)])
    report = json.loads(cfg.path("report.json").read_text())
    assert set(report["models"]) == {"SFT", "DPO"}
    assert report["models"]["SFT"]["win_rate_vs_sft"] == 0.5
    assert all("exec_acc_greedy" not in m and "rm_score" in m for m in report["models"].values())
    assert "needs 'setup_sql'" in report["not_measured"]["exec_acc"]
    assert report["per_family"]["SFT"] == {}
    assert "not shown, exec_acc: execution accuracy not measured" in text
    assert "win_rate_vs_sft" in text


def test_grpo_without_a_verifiable_reward_refuses_at_its_start_or_uses_the_rm(run, monkeypatch):
    cfg, _ = run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    with monkeypatch.context() as m:
        m.setattr(util, "load_causal_lm", no_model)
        with pytest.raises(util.ConfigError, match=r"none has 'setup_sql'.*Set grpo_rm_weight > 0"):
            util.run_stage("grpo", cfg)
    assert not cfg.path("grpo").exists()
    summary, text = _printed(util.run_stage, "grpo", dataclasses.replace(cfg, grpo_rm_weight=1.0))
    assert "rewarded by the reward model only" in text
    assert math.isfinite(summary["reward"]) and math.isnan(summary["gold_acc"])


def test_shipped_data_gives_the_same_rows_in_the_same_order():
    """The tiny preset's stages read the rows they read before the data sources existed, in the
    same order, less the validation split (the same prompts held out for every stage)."""
    cfg = util.get_config("tiny")
    everything = util.load_rows(ROOT / "dataset" / "train.json", limit=cfg.n_train)
    train = [r for r in everything if not util.in_validation(r["prompt"], cfg.val_fraction)]
    assert 0.9 * len(everything) < len(train) < len(everything)
    for kind in ("sft", "pref", "prompt"):
        rows = util.load_data(cfg, kind)
        assert rows == train and util.with_fields(rows, ("chosen", "rejected"), "x") == train, kind
    assert util.demonstrations(rows, "x") is rows
    shipped_eval = util.load_rows(ROOT / "dataset" / "eval.json", limit=cfg.n_eval)
    assert util.load_data(cfg, "eval") == shipped_eval


# ---------------------------------------------------------------- hygiene

PAIR = {"prompt": "Human: q1 Assistant:", "chosen": " a", "rejected": " b"}


def _pairs(n):
    return [{**PAIR, "prompt": f"Human: q{i} Assistant:"} for i in range(n)]


def test_bom_and_crlf_are_accepted(tmp_path):
    rows = _pairs(3)
    lf = tmp_path / "lf.jsonl"
    lf.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    array = tmp_path / "array.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).replace("\n", "\r\n").encode())
    assert util.load_rows(lf) == util.load_rows(crlf) == util.load_rows(array) == rows
    txt = tmp_path / "prompts.txt"
    txt.write_bytes(b"\xef\xbb\xbfHuman: q0 Assistant:\r\n\r\nHuman: q1 Assistant:\r\n")
    assert util.load_rows(txt, ("prompt",)) == [{"prompt": "Human: q0 Assistant:"},
                                                {"prompt": "Human: q1 Assistant:"}]


def test_pairs_with_nothing_to_prefer_are_skipped_and_counted(tmp_path, capsys):
    rows = _pairs(6)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = "  a "                          # the same answer, spaced differently
    rows[4]["rejected"] = ""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = util.get_config("smoke", pref_data=str(f), sft_data=str(f), n_train=0)
    pairs = util.load_data(cfg, "pref")
    assert [r["prompt"] for r in pairs] == [f"Human: q{i} Assistant:" for i in (0, 2, 5)]
    assert pairs.info["skipped_chosen_equals_rejected"] == 2
    assert pairs.info["skipped_no_rejected_answer"] == 1
    out = capsys.readouterr().out
    assert f"{f}: skipped 2 pair(s) with chosen equals rejected (first: {f}:2)" in out
    assert f"{f}: skipped 1 pair(s) with no rejected answer (first: {f}:5)" in out
    assert len(util.load_data(cfg, "sft")) == 6           # a demonstration needs no rejected answer
    # rows handed to the trainers directly (a notebook's load_rows) are filtered there too
    assert len(util.with_fields(util.load_data(cfg, "sft"), ("chosen", "rejected"), "pairs")) == 3
    assert "pairs: 3 of 6 rows left out" in capsys.readouterr().out


def test_prompts_in_training_and_evaluation_are_counted(tmp_path, capsys):
    train, evalset = _pairs(5), _pairs(8)[3:]
    evalset[1]["prompt"] = "Human:  q4\nAssistant:"       # the same prompt, other whitespace
    assert util.report_leakage(train, evalset, "preference pairs") == 2
    out = capsys.readouterr().out
    assert "leakage: 2 of 5 evaluation prompts are also in the preference pairs" in out
    f, g = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in train))
    g.write_text("".join(json.dumps(r) + "\n" for r in evalset))
    assert util.leaked_prompts(util.load_rows(f), util.load_rows(g)) == 2


@pytest.mark.parametrize("chosen, rejected, want", [
    # answers that begin alike stay answers
    ("\n\nHuman: hi there\n\nAssistant: I like cats",
     "\n\nHuman: hi there\n\nAssistant: I like dogs",
     ("Human: hi there\n\nAssistant:", " I like cats", " I like dogs")),
    # earlier turns belong to the prompt
    ("Human: a Assistant: b Human: c Assistant: yes",
     "Human: a Assistant: b Human: c Assistant: no",
     ("Human: a Assistant: b Human: c Assistant:", " yes", " no")),
    # no turn marker: a word boundary
    ("Q: 2+2 A: 4", "Q: 2+2 A: 5", ("Q: 2+2 A:", " 4", " 5")),
    ("the answer is four", "the answer is five", ("the answer is", " four", " five")),
])
def test_hh_rows_are_split_at_the_shared_prompt(tmp_path, chosen, rejected, want):
    f = tmp_path / "hh.jsonl"
    f.write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    row = util.load_rows(f)[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == want
    assert row["prompt"] + row["chosen"] in (chosen, chosen.lstrip())


def test_hh_rows_without_a_shared_prompt_are_refused(tmp_path):
    f = tmp_path / "hh.jsonl"
    good = {"chosen": "Human: x Assistant: a", "rejected": "Human: x Assistant: b"}
    f.write_text(json.dumps(good) + "\n" + json.dumps({"chosen": "yes", "rejected": "no"}) + "\n")
    with pytest.raises(util.DataError, match=r"hh.jsonl:2: no prompt field.*each row a 'prompt'"):
        util.load_rows(f)


def test_chats_and_column_names(tmp_path):
    user, yes, no = ({"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "hello"),
                                                             ("assistant", "go away")))
    recs = [{"prompt": [user], "chosen": [yes], "rejected": [no]},      # TRL's explicit prompt
            {"chosen": [user, yes], "rejected": [user, no]},             # the prompt in each chat
            # UltraFeedback: the prompt as text, and again in each chat
            {"prompt": "Human: hi Assistant:", "chosen": [user, yes], "rejected": [user, no]},
            {"messages": [user, yes]}]                                   # an SFT chat
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs = util.load_rows(f, ("prompt", "chosen", "rejected"), limit=3)
    want = ("Human: hi Assistant:", " hello", " go away")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs] == [want] * 3
    sft = util.load_rows(f, ("prompt", ("response", "chosen")))[3]
    assert (sft["prompt"], sft["response"]) == ("Human: hi Assistant:", " hello")
    g = tmp_path / "cols.jsonl"
    rec = {"instruction": "Human: q Assistant:", "good": " a", "bad": " b", "tables": "x"}
    g.write_text(json.dumps(rec) + "\n")
    columns = {"prompt": "instruction", "chosen": "good", "rejected": "bad", "setup_sql": "tables"}
    cfg = util.get_config("smoke", pref_data=str(g), columns=columns)
    assert util.load_data(cfg, "pref") == [{"prompt": "Human: q Assistant:", "chosen": " a",
                                            "rejected": " b", "setup_sql": "x"}]
    with pytest.raises(util.DataError, match=r"cols.jsonl:1: field 'prompt' is missing.*columns"):
        util.load_data(util.get_config("smoke", pref_data=str(g)), "pref")


def test_sources_named_wrongly_say_so(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("Human: q Assistant:\n")
    with pytest.raises(util.DataError, match="p.txt: a .txt file holds prompts only"):
        util.load_data(util.get_config("smoke", pref_data=str(txt)), "pref")
    with pytest.raises(FileNotFoundError, match=r"Config.sft_data='nope.jsonl': no such file"):
        util.load_data(util.get_config("smoke", sft_data="nope.jsonl"), "sft")


def test_hub_dataset_ids(monkeypatch):
    import datasets
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"question": "Human: q Assistant:", "pos": " a",
                                            "neg": " b"}])
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(data_files, "hub_reachable", lambda *a, **k: True)
    cfg = util.get_config("smoke", pref_data="hf:someone/prefs",
                          eval_data="someone/prefs:validation",
                          columns={"chosen": "pos", "rejected": "neg"})
    assert util.load_data(cfg, "pref") == [{"prompt": "Human: q Assistant:", "chosen": " a",
                                            "rejected": " b"}]
    assert util.load_data(cfg, "eval")[0]["prompt"] == "Human: q Assistant:"
    assert calls == [("someone/prefs", "train"), ("someone/prefs", "validation")]
    monkeypatch.setattr(data_files, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(ConnectionError, match=r"hf:someone/prefs\[train\] is a hub dataset id and "
                                              "the hub is unreachable.*JSON lines"):
        util.load_data(cfg, "pref")
