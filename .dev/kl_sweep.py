"""How Config.kl_target was chosen: PPO from one SFT model and reward model at several KL targets,
each policy measured on the VALIDATION split (training prompts no stage trained on, with their gold
SQL), never on eval.json, the test set.

    python util.py sft --config c.json && python util.py rm --config c.json   # the start
    python .dev/kl_sweep.py --base <its out_dir> --targets 0.5 1 2 --json docs/kl_sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import util  # noqa: E402


def main(argv=None) -> int:
    """PPO at each target (fresh folder, the same SFT and RM), then validation accuracy."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="out_dir holding actor/ and critic/")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--kl-coef", type=float, help="the coefficient the controller starts from")
    ap.add_argument("--json", default=str(ROOT / "docs" / "kl_sweep.json"))
    args = ap.parse_args(argv)
    base = Path(args.base)
    results = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    for target in args.targets:
        out = base / "sweep" / f"kl_target_{target:g}"
        more = {} if args.kl_coef is None else {"kl_coef": args.kl_coef}
        cfg = util.get_config(args.preset, out_dir=str(out), kl_target=target, **more)
        for d in ("actor", "critic"):
            if not cfg.path(d).exists():
                cfg.path(d).parent.mkdir(parents=True, exist_ok=True)
                cfg.path(d).symlink_to((base / d).resolve(), target_is_directory=True)
        util.set_seed(cfg.seed)
        t0 = time.time()
        history = util.train_ppo(cfg, "cpu")
        seconds = time.time() - t0
        tok = util.load_tokenizer(cfg.path("actor"))
        val = util.load_data(cfg, "pref", split="val")
        rm = util.load_score_model(cfg.path("critic"), cfg=cfg)
        ref = util.load_causal_lm(cfg.path("actor"), cfg=cfg)
        util.set_seed(cfg.seed)
        summary, _ = util.evaluate_policy(util.load_causal_lm(cfg.path("rlhf"), cfg=cfg), tok, val,
                                          cfg, rm=rm, ref=ref, desc=f"target {target:g}")
        last = history[-5:]
        results[f"{target:g}"] = {
            "validation": {k: summary[k] for k in ("exec_acc_greedy", "exec_acc_sampled",
                                                   "rm_score", "kl_to_sft")},
            "n_validation_prompts": len(val), "train_kl_last5": sum(h["kl"] for h in last) / 5,
            "kl_coef_last": history[-1]["kl_coef"], "seconds": seconds}
        print(json.dumps({target: results[f"{target:g}"]}))
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
