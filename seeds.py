"""`make seeds`: the whole pipeline (every notebook, in make run's order) once per seed, then a
table of mean, spread and worst per model. One run is not a result: the seed changes the tiny base
model, SFT's batches, the reward model, PPO's rollouts, DPO and GRPO.

    python seeds.py                      # seeds 0 1 2, tiny preset, docs/seeds.json + README table
    python seeds.py --seeds 3 4 --json docs/other.json --no-readme
    python seeds.py --collect            # only re-read model/seeds/<seed>/ and write the table

Each seed runs the notebooks with papermill into model/seeds/<seed>/ (RLHF_SEED, RLHF_OUT): the
executed copies land in model/seeds/<seed>/notebooks/, the committed notebooks stay as they are.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ["0_download", "1_actor", "2_critic", "3_rlhf", "5_dpo", "6_grpo", "4_test"]
METRICS = ["exec_acc_greedy", "exec_acc_sampled", "kl"]
# issue 17's targets for PPO, checked on every seed (tiny preset, 600 held-out prompts)
TARGETS = {"sampled_gain_over_sft": 0.15, "sampled": 0.85, "greedy": 0.90, "spread": 0.05,
           "kl_tolerance": 0.30}
# issue 23's for DPO: its gain over SFT, no family lost, the same on every seed, close to SFT
DPO_TARGETS = {"gain_over_sft": 0.15, "family_drop": 0.05, "spread": 0.05, "kl": 2.0,
               "rm_acc": 0.90}
README_START, README_END = "<!-- seeds: written by seeds.py -->", "<!-- /seeds -->"


def run_seed(seed: int, out: Path, preset: str, fields: dict | None = None) -> float:
    """Every notebook for one seed, outputs under `out`, Config `fields` changed (RLHF_CONFIG);
    returns the wall time in seconds."""
    env = {**os.environ, "RLHF_SEED": str(seed), "RLHF_OUT": str(out), "RLHF_PRESET": preset,
           "RLHF_TEXT_PROGRESS": "1", "RLHF_CONFIG": json.dumps(fields or {})}
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for nb in NOTEBOOKS:
        print(f">>> seed {seed}: {nb}.ipynb", flush=True)
        subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", "-k", "python3",
                        f"{nb}.ipynb", str(out / "notebooks" / f"{nb}.ipynb")],
                       cwd=ROOT, env=env, check=True)
    return time.time() - t0


def collect(out: Path) -> dict:
    """{model: {exec_acc_greedy, exec_acc_sampled, kl, family_sampled}} of one seed's report, the
    RM's held-out pairwise accuracy as RM.rm_acc and PPO's KL target and last training KL."""
    report = json.loads((out / "report.json").read_text())
    res = {name: {"exec_acc_greedy": m.get("exec_acc_greedy"),
                  "exec_acc_sampled": m.get("exec_acc_sampled"), "kl": m["kl_to_sft"]}
           for name, m in report["models"].items()}
    for name, families in report.get("per_family", {}).items():
        if name in res:                 # sampled accuracy per query family
            res[name]["family_sampled"] = {f: v["sampled_ok"] for f, v in families.items()}
    critic = out / "critic" / "metrics.json"
    if critic.exists():
        res["RM"] = {"rm_acc": json.loads(critic.read_text()).get("eval_pairwise_acc")}
    # PPO's checkpoint state.json holds its history and the settings it ran with (a notebook run
    # writes no run_config.json)
    ppo_state = out / "rlhf" / "state.json"
    if "RLHF (PPO)" in res and ppo_state.exists():
        state = json.loads(ppo_state.read_text())
        last = state["history"][-5:]    # the rollouts' KL, mean of the last 5 iterations
        res["RLHF (PPO)"]["train_kl_last5"] = sum(h["kl"] for h in last) / len(last)
        res["RLHF (PPO)"]["kl_target"] = state["settings"].get("kl_target")
    return res


def summary(per_seed: dict) -> dict:
    """{model: {metric: {mean, sd, min, max}}} over seeds."""
    out = {}
    models = dict.fromkeys(m for res in per_seed.values() for m in res)
    for model in models:
        for metric in [*METRICS, "rm_acc"]:
            vals = [res[model][metric] for res in per_seed.values()
                    if model in res and res[model].get(metric) is not None]
            if vals:
                out.setdefault(model, {})[metric] = {
                    "mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1
                    else 0.0, "min": min(vals), "max": max(vals)}
    return out


def check_targets(per_seed: dict) -> list[str]:
    """Issue 17's PPO targets, then issue 23's DPO ones, one line per check, 'ok' or 'MISSED'."""
    lines, sampled = [], []
    for seed, res in per_seed.items():
        ppo, sft = res.get("RLHF (PPO)"), res.get("SFT")
        if not ppo or not sft or ppo["exec_acc_sampled"] is None:
            continue
        sampled.append(ppo["exec_acc_sampled"])
        checks = [("sampled >= SFT sampled + 0.15",
                   ppo["exec_acc_sampled"] >= sft["exec_acc_sampled"] + 0.15),
                  ("sampled >= 0.85", ppo["exec_acc_sampled"] >= TARGETS["sampled"]),
                  ("greedy >= 0.90", ppo["exec_acc_greedy"] >= TARGETS["greedy"])]
        if ppo.get("kl_target"):
            # the final policy's KL on the 600 held-out prompts; the rollouts' KL of the last
            # iterations (batches of 64, before their updates) is shown beside it, it is noisier
            target = ppo["kl_target"]
            dev = ppo["kl"] / target - 1
            checks.append((f"held-out KL {ppo['kl']:.2f} within 30% of target {target:g} "
                           f"({dev:+.0%}; rollouts, last 5 iterations: "
                           f"{ppo['train_kl_last5']:.2f}, "
                           f"{ppo['train_kl_last5'] / target - 1:+.0%})",
                           abs(dev) <= TARGETS["kl_tolerance"]))
        for what, ok in checks:
            lines.append(f"seed {seed}: PPO {what}: {'ok' if ok else 'MISSED'}")
    if len(sampled) > 1:
        spread = max(sampled) - min(sampled)
        lines.append(f"PPO sampled spread {spread:.3f} <= 0.05: "
                     f"{'ok' if spread <= TARGETS['spread'] else 'MISSED'}")
    return lines + check_dpo_targets(per_seed)


def check_dpo_targets(per_seed: dict) -> list[str]:
    """Issue 23's DPO targets (and the RM's pairwise accuracy), one line per check."""
    t, lines, sampled = DPO_TARGETS, [], []
    for seed, res in per_seed.items():
        dpo, sft = res.get("DPO"), res.get("SFT")
        if not dpo or not sft or dpo["exec_acc_sampled"] is None:
            continue
        sampled.append(dpo["exec_acc_sampled"])
        drops = {f: sft["family_sampled"][f] - a
                 for f, a in dpo.get("family_sampled", {}).items()
                 if f in sft.get("family_sampled", {})}
        worst = max(drops, key=drops.get, default=None)
        checks = [("DPO", f"sampled {dpo['exec_acc_sampled']:.3f} >= SFT sampled "
                          f"{sft['exec_acc_sampled']:.3f} + 0.15",
                   dpo["exec_acc_sampled"] >= sft["exec_acc_sampled"] + t["gain_over_sft"]),
                  ("DPO", f"greedy {dpo['exec_acc_greedy']:.3f} >= SFT greedy "
                          f"{sft['exec_acc_greedy']:.3f} + 0.15",
                   dpo["exec_acc_greedy"] >= sft["exec_acc_greedy"] + t["gain_over_sft"]),
                  ("DPO", f"KL {dpo['kl']:.2f} <= 2", dpo["kl"] <= t["kl"])]
        if worst is not None:
            checks.append(("DPO", f"no family more than 0.05 below SFT sampled (largest fall: "
                                  f"{worst} {drops[worst]:+.3f})",
                           drops[worst] <= t["family_drop"]))
        else:
            checks.append(("DPO", "no family more than 0.05 below SFT sampled (no per-family "
                                  "figures)", False))
        rm = res.get("RM", {}).get("rm_acc")
        if rm is not None:
            checks.append(("RM", f"held-out pairwise accuracy {rm:.3f} >= 0.90", rm >= t["rm_acc"]))
        for who, what, ok in checks:
            lines.append(f"seed {seed}: {who} {what}: {'ok' if ok else 'MISSED'}")
    if len(sampled) > 1:
        spread = max(sampled) - min(sampled)
        lines.append(f"DPO sampled spread {spread:.3f} <= 0.05: "
                     f"{'ok' if spread <= t['spread'] else 'MISSED'}")
    return lines


def table(per_seed: dict, preset: str, n_prompts: int, fields: dict | None = None) -> str:
    """The markdown table of mean ± sd and min per model over the seeds."""
    s = summary(per_seed)
    changed = "".join(f", `{k}={v}`" for k, v in (fields or {}).items())
    head = (f"{len(per_seed)} seeds ({', '.join(map(str, per_seed))}), `{preset}` preset{changed}, "
            f"{n_prompts} held-out prompts; mean ± sd (min)\n\n"
            "| model | exec. accuracy, greedy | exec. accuracy, sampled | KL to SFT (nats) |\n"
            "|---|---|---|---|\n")

    def cell(model, metric):
        v = s.get(model, {}).get(metric)
        return f"{v['mean']:.3f} ± {v['sd']:.3f} ({v['min']:.3f})" if v else "–"
    rows = [f"| {m} | {cell(m, 'exec_acc_greedy')} | {cell(m, 'exec_acc_sampled')} | "
            f"{cell(m, 'kl')} |" for m in s if m != "RM"]
    rm = s.get("RM", {}).get("rm_acc")
    foot = (f"\n\nReward model, held-out pairwise accuracy: {rm['mean']:.3f} ± {rm['sd']:.3f} "
            f"(min {rm['min']:.3f})." if rm else "")
    return head + "\n".join(rows) + foot


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    """Put the table between the seeds markers of the README (added at the end when missing)."""
    md = readme.read_text()
    block = f"{README_START}\n{text}\n{README_END}"
    if README_START in md and README_END in md:
        before, rest = md.split(README_START, 1)
        md = before + block + rest.split(README_END, 1)[1]
    else:
        md = md.rstrip() + "\n\n" + block + "\n"
    readme.write_text(md)


def main(argv=None) -> int:
    """Run (or only collect) the seeds, write the JSON and the README table, print the targets."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default=str(ROOT / "model" / "seeds"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "seeds.json"))
    ap.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    ap.add_argument("--collect", action="store_true", help="do not run, read what is there")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                    help="Config fields for every seed, e.g. --set rm_ensemble=3 kl_target=0.5")
    args = ap.parse_args(argv)
    fields = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        out = Path(args.out) / str(seed)
        if not args.collect:
            seconds[seed] = run_seed(seed, out, args.preset, fields)
        per_seed[seed] = collect(out)
    # {seed: {model: {metric: value}}}; the table, the targets and the times go beside it (.md)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(per_seed, indent=1) + "\n")
    first = json.loads((Path(args.out) / str(args.seeds[0]) / "report.json").read_text())
    text = table(per_seed, args.preset, first["n_eval_prompts"], fields)
    targets = check_targets(per_seed)
    times = ", ".join(f"seed {s}: {t / 60:.1f} min" for s, t in seconds.items())
    head = "\n\nTargets (PPO: issue 17; DPO and the RM: issue 23):\n\n"
    path.with_suffix(".md").write_text(text + head +
                                       "\n".join(f"- {t}" for t in targets) +
                                       (f"\n\nWall time per seed: {times}\n" if times else "\n"))
    print(text, "\n".join(targets), times, sep="\n")
    if not args.no_readme:
        write_readme(text)
    print("wrote", path, "and", path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
