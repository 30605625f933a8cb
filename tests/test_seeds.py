"""seeds.py (`make seeds`): what it reads from each seed's run, its table and the PPO targets."""
import json

import pytest

import seeds


def _seed_dir(path, sft, ppo, kl, rm_acc=0.9, target=1.0, last=(1, 1, 1, 1, 2)):
    models = {"SFT": {"exec_acc_greedy": sft[0], "exec_acc_sampled": sft[1], "kl_to_sft": 0.0},
              "RLHF (PPO)": {"exec_acc_greedy": ppo[0], "exec_acc_sampled": ppo[1],
                             "kl_to_sft": kl}}
    (path / "critic").mkdir(parents=True)
    (path / "rlhf").mkdir()
    (path / "report.json").write_text(json.dumps({"models": models, "n_eval_prompts": 600}))
    (path / "critic" / "metrics.json").write_text(json.dumps({"eval_pairwise_acc": rm_acc}))
    hist = [{"kl": k} for k in (9, 9, *last)]       # the controller's KL: the last 5 rollouts
    (path / "rlhf" / "state.json").write_text(json.dumps({"settings": {"kl_target": target},
                                                          "history": hist}))
    return path


@pytest.fixture
def three(tmp_path):
    return {0: seeds.collect(_seed_dir(tmp_path / "0", (0.70, 0.70), (0.95, 0.90), 1.1)),
            1: seeds.collect(_seed_dir(tmp_path / "1", (0.70, 0.74), (0.91, 0.88), 1.4,
                                       last=(1.4,) * 5)),
            2: seeds.collect(_seed_dir(tmp_path / "2", (0.60, 0.60), (0.89, 0.84), 0.6, 0.8,
                                       last=(0.6,) * 5))}


def test_collect_reads_the_report_the_rm_and_ppo(three):
    assert three[0]["RLHF (PPO)"] == {"exec_acc_greedy": 0.95, "exec_acc_sampled": 0.90,
                                      "kl": 1.1, "train_kl_last5": pytest.approx(1.2),
                                      "kl_target": 1.0}
    assert three[2]["RM"] == {"rm_acc": 0.8}


def test_summary_is_mean_sd_min_max_over_seeds(three):
    s = seeds.summary(three)["RLHF (PPO)"]["exec_acc_sampled"]
    assert s["mean"] == pytest.approx(0.8733333) and s["min"] == 0.84 and s["max"] == 0.90
    assert s["sd"] == pytest.approx(0.0305505, rel=1e-5)          # the sample sd (n - 1)
    table = seeds.table(three, "tiny", 600)
    assert "| RLHF (PPO) | 0.917 ± 0.031 (0.890) | 0.873 ± 0.031 (0.840) |" in table
    assert "held-out pairwise accuracy: 0.867 ± 0.058 (min 0.800)" in table


def test_targets_are_checked_on_every_seed(three):
    lines = seeds.check_targets(three)
    # seed 0 meets all; seed 1: +0.14 over SFT, KL +40 %; seed 2: sampled 0.84, greedy 0.89, KL -40 %
    missed = [line for line in lines if line.endswith("MISSED")]
    assert missed == [
        "seed 1: PPO sampled >= SFT sampled + 0.15: MISSED",
        "seed 1: PPO held-out KL 1.40 within 30% of target 1 (+40%; rollouts, last 5 iterations: "
        "1.40, +40%): MISSED",
        "seed 2: PPO sampled >= 0.85: MISSED",
        "seed 2: PPO greedy >= 0.90: MISSED",
        "seed 2: PPO held-out KL 0.60 within 30% of target 1 (-40%; rollouts, last 5 iterations: "
        "0.60, -40%): MISSED",
        "PPO sampled spread 0.060 <= 0.05: MISSED"]
    assert ("seed 0: PPO held-out KL 1.10 within 30% of target 1 (+10%; rollouts, last 5 "
            "iterations: 1.20, +20%): ok") in lines


def test_readme_table_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n")
    seeds.write_readme("table one", readme)
    seeds.write_readme("table two", readme)
    text = readme.read_text()
    assert text.count(seeds.README_START) == 1 and "table two" in text and "table one" not in text
    assert text.startswith("# x\n\nbefore\n")


def _with_dpo(path, sft_family, dpo, dpo_family, kl):
    """A seed's report with SFT and DPO per family (the report.json 4_test writes)."""
    report = json.loads((path / "report.json").read_text())
    report["models"]["DPO"] = {"exec_acc_greedy": dpo[0], "exec_acc_sampled": dpo[1], "kl_to_sft": kl}
    report["per_family"] = {"SFT": {f: {"greedy_ok": a, "sampled_ok": a} for f, a in sft_family.items()},
                            "DPO": {f: {"greedy_ok": a, "sampled_ok": a} for f, a in dpo_family.items()}}
    (path / "report.json").write_text(json.dumps(report))
    return seeds.collect(path)


def test_dpo_targets_are_checked_on_every_seed(tmp_path):
    fam = {"count": 1.0, "and": 0.2}
    per_seed = {
        # all met: +0.20 / +0.25 over SFT, KL 1.5, count unchanged
        0: _with_dpo(_seed_dir(tmp_path / "0", (0.70, 0.72), (0.95, 0.90), 1.0), fam,
                     (0.95, 0.92), {"count": 1.0, "and": 0.9}, 1.5),
        # +0.14 sampled, greedy +0.15 exactly, KL 2.5, count 0.06 below SFT, RM 0.89
        1: _with_dpo(_seed_dir(tmp_path / "1", (0.70, 0.72), (0.95, 0.90), 1.0, rm_acc=0.89), fam,
                     (0.85, 0.86), {"count": 0.94, "and": 0.9}, 2.5),
    }
    lines = seeds.check_dpo_targets(per_seed)
    assert [line for line in lines if line.endswith("MISSED")] == [
        "seed 1: DPO sampled 0.860 >= SFT sampled 0.720 + 0.15: MISSED",
        "seed 1: DPO KL 2.50 <= 2: MISSED",
        "seed 1: DPO no family more than 0.05 below SFT sampled (largest fall: count +0.060): MISSED",
        "seed 1: RM held-out pairwise accuracy 0.890 >= 0.90: MISSED",
        "DPO sampled spread 0.060 <= 0.05: MISSED"]
    assert "seed 1: DPO greedy 0.850 >= SFT greedy 0.700 + 0.15: ok" in lines
    assert "seed 0: DPO no family more than 0.05 below SFT sampled (largest fall: count +0.000): ok" in lines
    assert per_seed[0]["DPO"]["family_sampled"] == {"count": 1.0, "and": 0.9}
    assert set(seeds.check_dpo_targets(per_seed)) <= set(seeds.check_targets(per_seed))


@pytest.mark.slow
def test_make_seeds_runs_the_pipeline_for_a_seed_and_writes_its_table(tmp_path):
    """`make seeds`'s command itself, on the smoke preset for one seed: every notebook, the JSON,
    the table and the targets (the README left alone)."""
    import subprocess
    import sys
    out, js = tmp_path / "seeds", tmp_path / "seeds.json"
    p = subprocess.run([sys.executable, "seeds.py", "--preset", "smoke", "--seeds", "7",
                        "--out", str(out), "--json", str(js), "--no-readme"],
                       cwd=seeds.ROOT, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    per_seed = json.loads(js.read_text())
    assert set(per_seed["7"]) == {"SFT", "RLHF (PPO)", "DPO", "GRPO", "RM"}
    assert per_seed["7"]["RLHF (PPO)"]["kl_target"] == 0.8
    assert all((out / "7" / "notebooks" / f"{nb}.ipynb").is_file() for nb in seeds.NOTEBOOKS)
    md = js.with_suffix(".md").read_text()
    assert md.startswith("1 seeds (7), `smoke` preset, 16 held-out prompts"), md[:300]
    assert "seed 7: PPO sampled >= 0.85:" in md and "Wall time per seed: seed 7:" in md
