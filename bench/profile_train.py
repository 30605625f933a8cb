"""Where SFT's and the reward model's time goes, ours and TRL's, on the bench's own slice of work.

    bench/.venv/bin/python bench/profile_train.py        # after `make bench` (uses its starting points)

Runs each bench worker (bench.w_sft_ours, w_sft_trl, w_rm_ours, w_rm_trl: the same half epoch, same batches in the
same order) once more, in this process, ours then TRL, under torch.profiler, and splits its wall time:
  * phases: preparing the data (tokenising and filtering the rows, util.fit_rows / util.sft_examples /
    util.ranking_examples), the held-out check inside util's training loop, and the training steps;
  * the self CPU time of the torch ops by group (the same groups as profile_ppo.py), over the whole worker.
Writes bench/profile_train.md and bench/profile_train.json. The profiler's per-op cost slows TRL's workers more
than ours (its RM worker most: 38.6 s profiled vs 24 s in the bench): compare op times and shares here, and take
the rates from bench/results.md, measured without it.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
from profile_ppo import forget_earlier_garbage, group_ops  # noqa: E402

START = BENCH / "out" / "start"
SPEC = bench.SPECS["full"]
PREPARE = ("fit_rows", "sft_examples", "ranking_examples")     # util functions that tokenise and filter rows
HELD_OUT = ("eval_sft_loss", "score_pairs")                   # util functions of the held-out check


def timed(phases: dict, state: dict, name: str, fn):
    """fn, adding its wall time to phases[name] when called at the top level, before the quality check."""
    def wrapper(*a, **k):
        if state["depth"] or state["after"]:
            return fn(*a, **k)
        state["depth"] += 1
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            state["depth"] -= 1
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def after_training(state: dict, fn):
    """fn, marking that the worker's timed part is over (what runs from here is not counted)."""
    def wrapper(*a, **k):
        state["after"] = True
        return fn(*a, **k)
    return wrapper


def run(task: str, side: str) -> dict:
    """One bench worker under the profiler, its phases timed."""
    import util
    from torch.profiler import ProfilerActivity, profile
    phases, state = {}, {"depth": 0, "after": False}
    # each name in util and in the module that holds it (encoding, evaluation), whose own functions
    # call it from there
    holders = [(m, n) for n in PREPARE + HELD_OUT
               for m in {util, sys.modules[getattr(util, n).__module__]}]
    patched = {(m, n): getattr(m, n) for m, n in holders}
    patched.update({(bench, n): getattr(bench, n) for n in ("sft_quality", "rm_quality")})
    for m, n in holders:
        setattr(m, n, timed(phases, state, n, patched[(m, n)]))
    for n in ("sft_quality", "rm_quality"):       # the worker's quality check, after its timed part: not counted
        setattr(bench, n, after_training(state, patched[(bench, n)]))
    forget_earlier_garbage()
    try:
        with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU]) as prof:
            res = bench.WORKERS[(task, side)](SPEC, 0, Path(tmp), START)
    finally:
        for (mod, n), f in patched.items():
            setattr(mod, n, f)
    seconds = res["seconds"]
    prepare = sum(phases.get(n, 0.0) for n in PREPARE)
    held_out = sum(phases.get(n, 0.0) for n in HELD_OUT)
    ops = group_ops(prof)
    events = prof.key_averages()
    return {"task": task, "side": side, "seconds": seconds, "quality": res["quality"],
            "phases_s": {"prepare data (tokenise, filter)": prepare, "held-out check in the loop": held_out,
                         "training steps (and the rest)": seconds - prepare - held_out},
            "op_groups": ops, "op_self_total_s": sum(e.self_cpu_time_total for e in events) / 1e6,
            "top_ops": events.table(sort_by="self_cpu_time_total", row_limit=12)}


def main() -> int:
    bench.quiet()
    if not (START / "critic").exists():
        print("run `make bench` first (it trains the starting points into bench/out/start)")
        return 1
    res = {f"{t}_{s}": run(t, s) for t in ("sft", "rm") for s in ("ours", "trl")}
    Path(BENCH / "profile_train.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "top_ops"} for k, v in res.items()}, indent=1))
    lines = ["# Where SFT's and the reward model's time goes (bench slice: half an epoch, 94 steps of 32 rows)", "",
             "Each bench worker once more under torch.profiler (`bench/profile_train.py`); seconds as the worker "
             "times them (tokenising included, the quality check after training not). The profiler's per-op cost "
             "slows TRL's workers more than ours: compare op times and shares here; the rates are in results.md.", ""]
    for task, title in (("sft", "SFT vs SFTTrainer"), ("rm", "Reward model vs RewardTrainer")):
        o, t = res[f"{task}_ours"], res[f"{task}_trl"]
        lines += [f"## {title}", "", "| | ours | TRL |", "|---|---|---|",
                  f"| worker seconds | {o['seconds']:.1f} | {t['seconds']:.1f} |"]
        for p in o["phases_s"]:
            lines.append(f"| {p} | {o['phases_s'][p]:.1f} | {t['phases_s'][p]:.1f} |")
        lines.append(f"| self CPU time in torch ops (whole worker, quality check included) | "
                     f"{o['op_self_total_s']:.1f} | {t['op_self_total_s']:.1f} |")
        for g in o["op_groups"]:
            lines.append(f"| {g} (self CPU) | {o['op_groups'][g]['s']:.1f} s | {t['op_groups'][g]['s']:.1f} s |")
        lines += ["", f"Quality: ours {o['quality']}, TRL {t['quality']}.", ""]
    for k, v in res.items():
        lines += [f"### Top ops, {k}", "", "```", v["top_ops"], "```", ""]
    Path(BENCH / "profile_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:60]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
