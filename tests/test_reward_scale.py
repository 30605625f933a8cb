"""Issue 17's recipe: the validation split, the reward's fixed scale (and the critic's), the adaptive
KL controller and the annealed PPO learning rate. Each test names the one-line mistake it catches."""
import dataclasses
import json

import pytest
import torch

import util


# ================================================================ the validation split

def _cfg(tmp_path, rows, **kw):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return util.get_config("smoke", pref_data=str(f), sft_data=str(f), prompt_data=str(f),
                           n_train=0, **kw)


def test_validation_split_is_disjoint_complete_and_the_same_for_every_kind(tmp_path):
    rows = [{"prompt": f"Human: q{i} Assistant:", "chosen": " a", "rejected": " b"}
            for i in range(400)]
    cfg = _cfg(tmp_path, rows, val_fraction=0.1)
    train, val = util.load_data(cfg, "pref"), util.load_data(cfg, "pref", split="val")
    tp, vp = {r["prompt"] for r in train}, {r["prompt"] for r in val}
    assert not tp & vp and len(tp | vp) == 400          # no prompt in both, none lost
    assert 20 <= len(val) <= 60                         # about 10 % of 400
    # every stage holds out the same prompts: PPO never samples a validation prompt, SFT never
    # imitates one
    for kind in ("sft", "prompt"):
        assert {r["prompt"] for r in util.load_data(cfg, kind, split="val")} == vp
    # the split depends on the prompt, not on the row order (a shuffled file holds out the same)
    shuffled = _cfg(tmp_path, rows[::-1], val_fraction=0.1)
    assert {r["prompt"] for r in util.load_data(shuffled, "pref", split="val")} == vp


def test_no_validation_split_of_the_test_set_or_when_turned_off(tmp_path):
    rows = [{"prompt": f"Human: q{i} Assistant:", "chosen": " a", "rejected": " b"}
            for i in range(100)]
    assert len(util.load_data(_cfg(tmp_path, rows, val_fraction=0.0), "pref")) == 100
    with pytest.raises(ValueError, match="val_fraction is 0"):
        util.load_data(_cfg(tmp_path, rows, val_fraction=0.0), "pref", split="val")
    with pytest.raises(ValueError, match="test set"):
        util.load_data(util.get_config("smoke"), "eval", split="val")
    with pytest.raises(util.ConfigError, match="val_fraction"):
        util.get_config("smoke", val_fraction=0.9)


def test_shipped_training_file_holds_out_a_validation_split():
    cfg = util.get_config("tiny")
    val = util.load_data(cfg, "pref", split="val")
    train = util.load_data(cfg, "pref")
    assert 200 <= len(val) <= 400 and len(train) + len(val) == 6000
    assert all("setup_sql" in r for r in val)           # the gold metric can be read on them


# ================================================================ the reward's scale

class _Config:
    pass


class _Model:
    """A stand-in for a score model: only its config, where the scale lives."""
    def __init__(self, **kw):
        self.config = _Config()
        self.config.__dict__.update(kw)


def test_scores_are_shifted_scaled_and_clipped():
    raw = torch.tensor([-20.0, -1.0, 2.0, 3.0, 4.0, 30.0])
    m = _Model(reward_offset=2.0, reward_scale=2.0, reward_clip=5.0)
    # (raw - mean) / std: a sign flip, a missing division or a division by the variance all fail
    assert util.normalize_scores(m, raw).tolist() == [-5.0, -1.5, 0.0, 0.5, 1.0, 5.0]
    # the critic's values are not clipped (a value of -11 must be learnable, not stuck at -5)
    assert util.normalize_scores(m, raw, clip=False).tolist() == [-11.0, -1.5, 0.0, 0.5, 1.0, 14.0]
    # an RM saved before the scale existed: the offset alone, nothing clipped
    assert util.normalize_scores(_Model(reward_offset=1.0), raw).tolist() == (raw - 1).tolist()


def test_set_reward_scale_stores_mean_std_and_clip_of_the_sft_answers(monkeypatch):
    raw = [1.0, 2.0, 3.0, 6.0]
    monkeypatch.setattr(util, "score_texts", lambda *a, **k: raw)
    m = _Model()
    got = util.set_reward_scale(m, None, ["p"] * 4, ["a"] * 4, util.get_config("smoke"), "cpu")
    assert got == {"reward_offset": 3.0, "reward_scale": pytest.approx(2.1602469, rel=1e-6),
                   "reward_clip": 5.0}
    z = util.normalize_scores(m, torch.tensor(raw))
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6   # the SFT answers: 0 ± 1
    monkeypatch.setattr(util, "score_texts", lambda *a, **k: [2.0, 2.0])
    assert util.set_reward_scale(m, None, ["p"] * 2, ["a"] * 2, util.get_config("smoke"),
                                 "cpu")["reward_scale"] == 1.0                 # no 0 / 0


def test_the_critic_starts_on_the_rewards_scale(micro_dirs, tok, rows):
    """critic_values applies the RM's shift and scale to the value of the state before each token:
    the value before token t is the head's output at t - 1 (an off-by-one reads the token itself)."""
    critic = util.load_score_model(micro_dirs.path("critic"))
    critic.config.reward_offset, critic.config.reward_scale, critic.config.reward_clip = 0.3, 0.5, 1e-3
    ids = torch.tensor([tok.encode(rows[0]["prompt"] + rows[0]["chosen"])])
    mask, lq = torch.ones_like(ids), 10
    with torch.no_grad():
        raw = util.token_scores(critic, ids, mask)
        values = util.critic_values(critic, ids, mask, lq)
    assert values.shape == (1, ids.shape[1] - lq)
    assert torch.allclose(values, (raw[:, lq - 1:-1] - 0.3) / 0.5, atol=1e-5)   # and no clip


def test_validation_prompts_are_never_trained_on():
    cfg = util.get_config("tiny")
    prompts = util.validation_prompts(cfg)
    assert len(prompts) == 256 and all(util.in_validation(p, cfg.val_fraction) for p in prompts)
    train = {r["prompt"] for r in util.load_data(cfg, "pref")}
    assert not train & set(prompts)                     # the RM never trained on one of them


# ================================================================ KL control

def test_adaptive_kl_moves_towards_the_target_in_proportion_and_clipped():
    # KL 1.5 x the target: +0.2 (clipped from +0.5) x 64 / 640 = +2 %
    assert util.adaptive_kl(0.2, 1.5, 1.0, 64, 640) == pytest.approx(0.2 * 1.02)
    # KL 1.1 x the target: +0.1 x 0.1 = +1 % (a clip at 0.2 before the error, or none, fails one)
    assert util.adaptive_kl(0.2, 1.1, 1.0, 64, 640) == pytest.approx(0.2 * 1.01)
    # below the target the coefficient falls (a flipped sign rises), by at most 20 % x 64 / 640
    assert util.adaptive_kl(0.2, 0.9, 1.0, 64, 640) == pytest.approx(0.2 * 0.99)
    assert util.adaptive_kl(0.2, 0.0, 1.0, 64, 640) == pytest.approx(0.2 * 0.98)
    # a longer horizon moves it less
    assert util.adaptive_kl(0.2, 1.5, 1.0, 64, 6400) == pytest.approx(0.2 * 1.002)


def test_adaptive_kl_holds_a_simulated_kl_near_its_target():
    """A policy whose KL rises by 0.1 nat an iteration, minus what the penalty pulls back: the
    controller must bring it to the target and keep it there."""
    coef, kl = 0.05, 0.0
    for _ in range(200):
        kl = max(0.0, kl + 0.1 - coef * kl)
        coef = util.adaptive_kl(coef, kl, 1.0, 64, 640)
    assert kl == pytest.approx(1.0, rel=0.05)


def test_anneal_lr_falls_linearly_to_zero_for_both_optimizers():
    cfg = util.get_config("smoke", ppo_iterations=4, ppo_lr=1e-4, ppo_vf_lr=1e-3)
    p = torch.nn.Parameter(torch.zeros(1))
    opts = {"actor": torch.optim.AdamW([p], lr=1.0), "critic": torch.optim.AdamW([p], lr=1.0)}
    got = [(util.anneal_lr(opts, cfg, it), opts["critic"].param_groups[0]["lr"]) for it in range(4)]
    assert got == [pytest.approx((1e-4 * f, 1e-3 * f)) for f in (1, 0.75, 0.5, 0.25)]
    fixed = util.get_config("smoke", ppo_iterations=4, ppo_anneal_lr=False)
    assert util.anneal_lr(opts, fixed, 3) == fixed.ppo_lr


def test_ppo_logs_the_learning_rate_and_the_moving_kl_coefficient(micro_dirs, rows, tmp_path):
    import shutil
    for d in ("actor", "critic"):
        shutil.copytree(micro_dirs.path(d), tmp_path / d)
    cfg = util.get_config("smoke", out_dir=str(tmp_path), ppo_iterations=3, rollout_batch_size=8,
                          ppo_minibatch_size=4, ppo_epochs=1, max_response_tokens=8,
                          kl_target=0.5, kl_horizon=8)
    h = util.train_ppo(cfg, "cpu", rows=rows)
    assert [r["lr"] for r in h] == pytest.approx([cfg.ppo_lr * f for f in (1, 2 / 3, 1 / 3)])
    for a, b in zip(h, h[1:]):          # each coefficient is the controller's answer to the KL before
        assert b["kl_coef"] == pytest.approx(util.adaptive_kl(a["kl_coef"], a["kl"], 0.5, 8, 8))


# ================================================================ an ensemble of reward models

def test_ensemble_reward_is_the_mean_minus_penalty_times_the_spread(monkeypatch):
    per_model = {"a": torch.tensor([1.0, 0.0, 2.0]), "b": torch.tensor([3.0, 0.0, -2.0])}
    monkeypatch.setattr(util, "reward_scores", lambda m, ids, mask: per_model[m])
    # the mean: 2, 0, 0; the spread (population std): 1, 0, 2
    assert util.ensemble_scores(["a", "b"], None, None).tolist() == [2.0, 0.0, 0.0]
    assert util.ensemble_scores(["a", "b"], None, None, penalty=0.5).tolist() == [1.5, 0.0, -1.0]
    assert util.ensemble_scores(["a"], None, None, penalty=0.5).tolist() == [1.0, 0.0, 2.0]


def test_an_ensemble_is_trained_scaled_and_used_by_ppo(micro_dirs, rows, tmp_path):
    import shutil
    shutil.copytree(micro_dirs.path("actor"), tmp_path / "actor")
    cfg = util.get_config("smoke", out_dir=str(tmp_path), rm_ensemble=2, ppo_iterations=1,
                          rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=1,
                          max_response_tokens=8)
    out = util.run_stage("rm", cfg)
    assert [m["path"] for m in out["ensemble"]] == [str(tmp_path / "critic_2")]
    first = util.load_score_model(tmp_path / "critic")
    second = util.load_score_model(tmp_path / "critic_2")
    assert second.config.reward_scale > 0 and second.config.reward_clip == cfg.reward_clip
    # another seed: another head (the same weights would be an ensemble of one)
    assert not torch.equal(first.score.weight, second.score.weight)
    tok, models, _ = util.load_ppo_models(cfg, "cpu")
    assert len(models["rm"]) == 2
    h = util.train_ppo(cfg, "cpu", rows=rows)
    assert len(h) == 1
    # PPO's checkpoint knows the ensemble's weights: with one model it is another run, not a resume
    assert {d for d, *_ in util.inputs_fingerprint(cfg)} == {"actor", "critic", "critic_2"}
    one = dataclasses.replace(cfg, rm_ensemble=1)
    assert util.inputs_fingerprint(one) != util.inputs_fingerprint(cfg)
