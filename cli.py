"""The command line: `python util.py make-dataset | make-tokenizer | stats`, a stage without its
notebook (util.run_stage), or the report of every model present. util.py's `__main__` and
util.main call main() here."""
from __future__ import annotations

import json

import util


# the models the report looks for: its name -> the folder under out_dir
REPORT_MODELS = {"SFT": "actor", "RLHF (PPO)": "rlhf", "DPO": "dpo", "GRPO": "grpo"}


def build_report(cfg: util.Config, device) -> tuple[dict, dict]:
    """(report, per-row results) of each model present, as 4_test does; writes report.json."""
    tok = util.load_tokenizer(util._require(cfg.path("actor"), "1_actor.ipynb"))
    evalset = util.load_data(cfg, "eval")
    leakage, seen = {}, set()
    for kind in ("sft", "pref", "prompt"):  # each training source once (by default one file)
        if util.data_source(cfg, kind) not in seen:
            seen.add(util.data_source(cfg, kind))
            leakage[kind] = util.report_leakage(util.load_data(cfg, kind), evalset,
                                                util.DATA_SOURCES[kind][3])
    has_rm = (cfg.path("critic") / "config.json").exists()
    rm = util.load_score_model(cfg.path("critic"), device=device, cfg=cfg) if has_rm else None
    ref = util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
    present = {k: d for k, d in REPORT_MODELS.items() if (cfg.path(d) / "config.json").exists()}
    print("models found:", list(present))
    results, rows = {}, {}
    for name, d in present.items():
        util.set_seed(cfg.seed)
        model = util.load_causal_lm(cfg.path(d), device=device, cfg=cfg)
        results[name], rows[name] = util.evaluate_policy(model, tok, evalset, cfg, rm=rm, ref=ref,
                                                         desc=name)
        del model
        util.free_memory()                  # one evaluated model on the GPU at a time
    for name in results:
        if rm is not None:
            results[name]["win_rate_vs_sft"] = util.win_rate([r["rm_score"] for r in rows[name]],
                                                             [r["rm_score"] for r in rows["SFT"]])
    not_measured = {}
    judged = sum(r["greedy_ok"] is not None for r in rows["SFT"])
    if judged < len(evalset):
        not_measured["exec_acc"] = util.no_gold_note(judged, len(evalset))
    if rm is None:
        not_measured["rm_score"] = ("no reward model in critic/ (run 2_critic.ipynb or `python "
                                    "util.py rm`), so no RM score and no win rate")
    report = {"preset": cfg.preset, "n_eval_prompts": len(evalset), "temperature": cfg.temperature,
              "models": results,
              "per_family": {n: util.per_family_accuracy(r) for n, r in rows.items()},
              "data": {"eval": util.data_source(cfg, "eval"), "leaked_eval_prompts": leakage},
              "not_measured": not_measured}
    util.write_json(report, cfg.path("report.json"))
    return report, rows


def print_report(report: dict) -> None:
    """The report's table of models and metrics, then what it left out and why."""
    import pandas as pd
    table = pd.DataFrame(report["models"]).T
    hidden = ["n_prompts", "temperature"]
    if "exec_acc" in report["not_measured"]:    # the note below says it: no column of zeros
        hidden.append("n_with_setup_sql")
    table = table.drop(columns=hidden, errors="ignore")
    print(f"{report['n_eval_prompts']} evaluation prompts ({report['data']['eval']}), "
          f"T={report['temperature']}")
    print(table.round(3).to_string())
    for metric, why in report["not_measured"].items():
        print(f"not shown, {metric}: {why}")


def main(argv=None) -> int:
    """`python util.py make-dataset | make-tokenizer | stats`, a stage without its notebook or the
    report: `python util.py sft|rm|ppo|dpo|grpo|report [--config file.json] [--preset NAME]`."""
    import os
    import sys
    try:
        return run(argv)
    # a user's mistake (a missing file or model, a bad config field or data row) is one clear
    # line and exit status 2, not a traceback; RLHF_DEBUG=1 shows the traceback
    except (FileNotFoundError, util.DataError, util.ConfigError, ValueError) as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        print(f"tiny-rlhf: error: {e}\n(RLHF_DEBUG=1 shows where it was raised)", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    """main() without its handling of a user's mistakes."""
    import argparse
    ap = argparse.ArgumentParser(prog="python util.py", description=main.__doc__)
    ap.add_argument("command",
                    choices=["make-dataset", "make-tokenizer", "stats", *util.STAGES, "report"])
    ap.add_argument("--config", help="JSON file of Config fields (see util.Config), e.g. "
                    "{\"preset\": \"smoke\", \"lora_r\": 8}")
    ap.add_argument("--preset", help="preset to start from (overrides the file's); default "
                    "RLHF_PRESET or auto")
    args = ap.parse_args(argv)
    if args.command in util.STAGES:
        cfg = util.load_config(args.config, args.preset)
        summary = util.run_stage(args.command, cfg)
        if util.accelerator().is_main_process:
            rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
            resolved = cfg.path(util.STAGES[args.command], "run_config.json")
            print(json.dumps(util._json_safe({"stage": args.command, "config": str(resolved),
                                              "processes": util.accelerator().num_processes,
                                              "logs": str(cfg.path("logs")), **rounded})))
    elif args.command == "report":
        cfg = util.load_config(args.config, args.preset)
        report, _ = build_report(cfg, util.accelerator().device)
        print_report(report)
        print(f"wrote {cfg.path('report.json')}")
    elif args.command == "make-dataset":
        print(util.write_dataset())
    elif args.command == "make-tokenizer":
        tok = util.train_tokenizer(util.load_rows(util.ROOT / "dataset" / "train.json"))
        print(f"tokenizer with {len(tok)} tokens written to {util.ROOT / 'tokenizer'}")
    else:
        for split in ("train", "eval"):
            rows = util.load_rows(util.ROOT / "dataset" / f"{split}.json")
            print(split, json.dumps(util.dataset_stats(rows)))
    return 0
