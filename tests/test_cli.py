"""Headless runs: config files, the resolved config beside the outputs, and two processes under torchrun."""
import json
import os
import subprocess
import sys

import pytest

import util

ROOT = util.ROOT


def test_load_config_from_file_and_dict(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "smoke", "lora_r": 8, "dpo_beta": 0.3}))
    cfg = util.load_config(f)
    assert (cfg.preset, cfg.lora_r, cfg.dpo_beta, cfg.d_model) == ("smoke", 8, 0.3, 32)
    assert util.load_config({"grpo_group_size": 4}, preset="tiny").grpo_group_size == 4
    f.write_text(json.dumps({"preset": "smoke", "dpo_betta": 0.3}))
    with pytest.raises(ValueError, match="dpo_betta"):
        util.load_config(f)
    f.write_text('{"preset": "smoke",\n "lora_r": }')
    with pytest.raises(util.DataError, match="c.json: line 2"):
        util.load_config(f)


def _run(args, out, env_extra=None, timeout=300):
    env = {**os.environ, "RLHF_OUT": str(out), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def test_sft_stage_one_and_two_processes_same_result_shape(tmp_path):
    conf = tmp_path / "smoke.json"
    conf.write_text(json.dumps({"preset": "smoke"}))
    one = _run([sys.executable, "util.py", "sft", "--config", str(conf)], tmp_path / "one")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = _run([torchrun, "--nproc_per_node", "2", "util.py", "sft", "--config", str(conf)], tmp_path / "two",
               {"ACCELERATE_USE_CPU": "1"})
    assert (one["processes"], two["processes"]) == (1, 2)
    assert set(one) == set(two)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.02)   # same global batch, split in two
    resolved = json.loads((tmp_path / "two" / "actor" / "run_config.json").read_text())
    assert resolved["preset"] == "smoke" and resolved["out_dir"] == str(tmp_path / "two")
    assert util.load_causal_lm(tmp_path / "two" / "actor").config.num_hidden_layers == 1


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_ppo_and_grpo_under_torchrun_refuse_before_writing(tmp_path, micro_dirs, stage):
    """Two processes would each run the whole RL loop and write the same folder: they stop at once, saying why."""
    import shutil
    for d in ("actor", "critic"):
        shutil.copytree(micro_dirs.path(d), tmp_path / d)
    conf = tmp_path / "smoke.json"
    conf.write_text(json.dumps({"preset": "smoke"}))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "RLHF_OUT": str(tmp_path), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "util.py", stage, "--config", str(conf)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "runs in one process" in p.stderr and "started with 2" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["actor", "critic", "smoke.json"]   # nothing written


def test_every_command_runs_in_order_from_the_command_line(tmp_path):
    """`python util.py <stage>` for each stage, in the notebooks' order, then the report: what a user
    without notebooks types (a stage that stops taking a model the one before wrote breaks here)."""
    conf = tmp_path / "smoke.json"
    conf.write_text(json.dumps({"preset": "smoke"}))
    out = tmp_path / "out"
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        last = _run([sys.executable, "util.py", stage, "--config", str(conf)], out)
        assert last["stage"] == stage and (out / util.STAGES[stage]).is_dir()
    env = {**os.environ, "RLHF_OUT": str(out), "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "util.py", "report", "--config", str(conf)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and (out / "report.json").exists(), p.stderr[-2000:]
    assert {"SFT", "RLHF (PPO)", "DPO", "GRPO"} <= set(json.loads((out / "report.json").read_text())["models"])


@pytest.mark.parametrize("args, says", [
    (["rm", "--preset", "smoke"], "actor has no model: run 1_actor.ipynb first"),
    (["sft", "--config", "no-such-file.json"], "No such file or directory: 'no-such-file.json'"),
    (["sft", "--config", "{bad}"], "unknown config field(s) ['lr']"),
    (["sftt"], "invalid choice: 'sftt'"),
    ([], "the following arguments are required: command"),
])
def test_a_users_mistake_is_one_clear_message_and_exit_2(tmp_path, args, says):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preset": "smoke", "lr": 1}))
    args = [str(bad) if a == "{bad}" else a for a in args]
    env = {**os.environ, "RLHF_OUT": str(tmp_path / "empty"), "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "util.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
