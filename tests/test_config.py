"""Every Config field is checked when the Config is made: types, ranges, allowed names, and the
fields that limit each other; the message names the field and what is allowed."""
import dataclasses
import json

import pytest

import util


@pytest.mark.parametrize("overrides, message", [
    ({"temperature": 0}, r"Config.temperature=0: must be > 0"),
    ({"sft_lr": "2e-3"}, r"Config.sft_lr='2e-3': is a string: write a number"),
    ({"ppo_epochs": 1.5}, r"Config.ppo_epochs=1.5: must be a whole number"),
    ({"rm_batch_size": 0}, r"Config.rm_batch_size=0: must be >= 1"),
    ({"micro_batch_size": -1}, r"Config.micro_batch_size=-1: must be >= 0"),
    ({"cliprange": 1.5}, r"Config.cliprange=1.5: must be in \(0, 1\)"),
    ({"lam": 1.2}, r"Config.lam=1.2: must be in \[0, 1\]"),
    ({"dpo_lr": float("nan")}, r"Config.dpo_lr=nan: must be finite"),
    ({"grpo_group_size": 1}, r"Config.grpo_group_size=1: must be >= 2"),
    ({"kl_estimator": "k2"}, r"Config.kl_estimator='k2': choose one of \('k1', 'k3'\)"),
    ({"dpo_loss": "hinge"}, r"Config.dpo_loss='hinge': choose one of \('sigmoid', 'ipo'\)"),
    ({"precision": "half"},
     r"Config.precision='half': choose one of \('auto', 'fp32', 'bf16', 'fp16'\)"),
    ({"gradient_checkpointing": 1}, r"Config.gradient_checkpointing=1: must be true or false"),
    ({"whiten_rewards": "yes"}, r"Config.whiten_rewards='yes': must be true or false"),
    ({"sft_data": 3}, r"Config.sft_data=3: must be a string"),
    ({"columns": {"prompt": 3}}, r"Config.columns=\{'prompt': 3\}: keys must be among"),
    ({"columns": {"question": "q"}}, r"Config.columns=.*not \['question'\]"),
    ({"ppo_minibatch_size": 16}, r"Config.ppo_minibatch_size=16: must be <= rollout_batch_size=8"),
    ({"grpo_minibatch_size": 17},
     r"Config.grpo_minibatch_size=17: must be <= grpo_prompts \* grpo_group_size = 16"),
    ({"d_model": 33}, r"Config.d_model=33: must be a multiple of n_heads=2"),
])
def test_bad_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(util.ConfigError, match=message):
        util.get_config("smoke", **overrides)


def test_settings_are_checked_however_the_config_is_made(tmp_path):
    for preset in util.PRESETS:
        util.get_config(preset)                            # every preset passes
    assert util.get_config("smoke", ppo_epochs=2.0).ppo_epochs == 2 and \
        isinstance(util.get_config("smoke", ppo_epochs=2.0).ppo_epochs, int)       # JSON's 2.0 is 2
    with pytest.raises(util.ConfigError, match="Config.temperature=-1"):
        dataclasses.replace(util.get_config("smoke"), temperature=-1)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "smoke", "rollout_batch_size": "8", "dpo_beta": 0}))
    with pytest.raises(util.ConfigError) as e:
        util.load_config(f)
    assert "Config.rollout_batch_size='8'" in str(e.value)      # every problem, not the first only
    assert "Config.dpo_beta=0: must be > 0" in str(e.value)
    cfg = util.get_config("smoke", out_dir=str(tmp_path / "out"))
    cfg.kl_coef = -0.1                          # set after creation: run_stage checks again first
    with pytest.raises(util.ConfigError, match="Config.kl_coef=-0.1"):
        util.run_stage("sft", cfg)
    assert not (tmp_path / "out").exists()


def test_rlhf_config_sets_fields_for_every_notebook(monkeypatch):
    """`make seeds --set ...` reaches the notebooks through RLHF_CONFIG: preset < it < overrides."""
    monkeypatch.setenv("RLHF_CONFIG", '{"rm_ensemble": 3, "n_train": 7}')
    cfg = util.get_config("smoke", n_train=9)
    assert cfg.rm_ensemble == 3 and cfg.n_train == 9
    monkeypatch.setenv("RLHF_CONFIG", '{"rm_ensembl": 3}')
    with pytest.raises(util.ConfigError, match=r"RLHF_CONFIG: unknown Config field\(s\) \['rm_ensembl'\]"):
        util.get_config("smoke")
    monkeypatch.setenv("RLHF_CONFIG", "rm_ensemble=3")
    with pytest.raises(util.ConfigError, match="not a JSON object"):
        util.get_config("smoke")
    monkeypatch.setenv("RLHF_CONFIG", '{"rm_ensemble": 0}')
    with pytest.raises(util.ConfigError, match="rm_ensemble"):
        util.get_config("smoke")
