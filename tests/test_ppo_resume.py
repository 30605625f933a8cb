"""A PPO checkpoint resumes only under the settings it was made with; util.show_source shows what runs."""
import dataclasses
import inspect
import json
import shutil

import util


def _cfg(micro_dirs, tmp_path):
    for d in ("actor", "critic"):
        shutil.copytree(micro_dirs.path(d), tmp_path / d)
    return util.get_config("smoke", out_dir=str(tmp_path), ppo_iterations=2, rollout_batch_size=8,
                           ppo_minibatch_size=4, ppo_epochs=1, save_every=1, max_response_tokens=8)


def test_a_changed_knob_starts_afresh_and_says_which(micro_dirs, rows, tmp_path, capsys):
    cfg = _cfg(micro_dirs, tmp_path)
    assert len(util.train_ppo(cfg, "cpu", rows=rows, stop_after=1)) == 1    # stopped after 1 iteration
    capsys.readouterr()
    small_kl = dataclasses.replace(cfg, kl_coef=0.02)
    fresh = util.train_ppo(small_kl, "cpu", rows=rows, stop_after=1)
    said = capsys.readouterr().out
    assert "kl_coef 0.05 -> 0.02: starting PPO afresh" in said and "resuming" not in said
    assert [h["iteration"] for h in fresh] == [1] and fresh[0]["kl_coef"] == 0.02   # the new one
    state = json.loads((tmp_path / "rlhf" / "state.json").read_text())
    assert state["settings"]["kl_coef"] == 0.02 and state["iteration"] == 1
    # the same settings again: it resumes, and says why
    resumed = util.train_ppo(small_kl, "cpu", rows=rows)
    assert "resuming PPO from iteration 1: same settings and inputs" in capsys.readouterr().out
    assert [h["iteration"] for h in resumed] == [1, 2] and resumed[0] == fresh[0]


def test_what_resumes_and_what_does_not(micro_dirs, rows, tmp_path, capsys):
    cfg = _cfg(micro_dirs, tmp_path)
    util.train_ppo(cfg, "cpu", rows=rows, stop_after=1)
    path = tmp_path / "rlhf"
    # knobs that do not change what PPO computes: saving, evaluation, memory layout, other stages'
    # knobs
    same = dataclasses.replace(cfg, save_every=7, eval_batch_size=3,
                               micro_batch_size=2, dpo_beta=0.5, grpo_lr=1.0, sft_epochs=9)
    assert util.load_ppo_state(path, same, rows) is not None
    capsys.readouterr()
    other = dataclasses.replace(cfg, cliprange=0.1, ppo_epochs=3)
    assert util.load_ppo_state(path, other, rows) is None
    assert "ppo_epochs 1 -> 3, cliprange 0.2 -> 0.1: starting PPO afresh" in capsys.readouterr().out
    # a longer run is another learning-rate schedule (it anneals to 0 at the last iteration)
    assert util.load_ppo_state(path, dataclasses.replace(cfg, ppo_iterations=50), rows) is None
    assert "ppo_iterations 2 -> 50: starting PPO afresh" in capsys.readouterr().out
    assert util.load_ppo_state(path, cfg, rows[::-1]) is None              # other prompts
    assert "other prompts" in capsys.readouterr().out
    state = json.loads((path / "state.json").read_text())
    del state["settings"]                                                  # an older util.py
    (path / "state.json").write_text(json.dumps(state))
    assert util.load_ppo_state(path, cfg, rows) is None
    assert "does not record its settings: starting PPO afresh" in capsys.readouterr().out


def test_show_source_shows_the_function_that_runs(capsys, monkeypatch):
    want = inspect.getsource(util.ppo_iteration)
    util.show_source(util.ppo_iteration)                  # no notebook kernel here: plain text
    assert capsys.readouterr().out == want + "\n"
    import IPython
    import IPython.display
    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())          # as in a notebook
    monkeypatch.setattr(IPython.display, "display", shown.append)
    util.show_source(util.ppo_iteration)
    assert len(shown) == 1 and shown[0].data == f"```python\n{want}```"
    assert capsys.readouterr().out == ""
