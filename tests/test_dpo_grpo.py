"""DPO, GRPO and LoRA: the losses and advantages against hand-computed and brute-force references."""
import copy
import dataclasses
import math
import statistics

import pytest
import torch

import util
from util import evaluate_batch


# ---------------------------------------------------------------- DPO

def test_answer_logprobs_match_a_token_loop(tok, micro_dirs, rows):
    model = util.load_causal_lm(micro_dirs.path("actor"))
    ids, mask, labels = util.pair_batch(tok, rows[:2], micro_dirs)     # chosen 0, chosen 1, rejected 0, rejected 1
    got = util.answer_logprobs(model, ids, mask, labels)
    for b, (r, key) in enumerate([(rows[0], "chosen"), (rows[1], "chosen"), (rows[0], "rejected"), (rows[1], "rejected")]):
        p = util.encode_prompt(tok, r["prompt"])
        a = util.encode_response(tok, r[key])
        logits = model(input_ids=torch.tensor([p + a])).logits[0]      # unpadded, one sequence at a time
        ref = sum(torch.log_softmax(logits[len(p) + t - 1], -1)[a[t]].item() for t in range(len(a)))
        assert got[b].item() == pytest.approx(ref, abs=1e-3)


def test_dpo_and_ipo_losses_by_hand():
    lc, lr, rc, rr = (torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5))   # h = 0.5 - (-0.5) = 1
    loss, reward_c, reward_r = util.dpo_loss(lc, lr, rc, rr, beta=0.5, loss_type="sigmoid")
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))
    assert reward_c.item() == pytest.approx(0.25) and reward_r.item() == pytest.approx(-0.25)
    ipo, _, _ = util.dpo_loss(lc, lr, rc, rr, beta=0.25, loss_type="ipo")    # (1 - 1/(2*0.25))^2 = 1
    assert ipo.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dpo_loss"):
        util.dpo_loss(lc, lr, rc, rr, 0.1, "hinge2")


def test_rpo_term_is_the_chosen_answers_per_token_nll(tok, micro_dirs, rows):
    """chosen_nll against a token loop: -log pi of every chosen answer token, one mean over all of
    them (a mean per answer then over pairs, the old one, or a sum, or the rejected answers, would
    differ: the lengths differ)."""
    model = util.load_causal_lm(micro_dirs.path("actor"))
    part = rows[:3]
    ids, mask, labels = util.pair_batch(tok, part, micro_dirs)
    with torch.no_grad():
        got = util.chosen_nll(util.answer_logprobs(model, ids, mask, labels)[:3], labels[:3])
    every, per_pair = [], []
    for r in part:
        p, a = util.encode_prompt(tok, r["prompt"]), util.encode_response(tok, r["chosen"])
        logits = model(input_ids=torch.tensor([p + a])).logits[0]
        nll = [-torch.log_softmax(logits[len(p) + t - 1], -1)[a[t]].item() for t in range(len(a))]
        every += nll
        per_pair.append(sum(nll) / len(nll))
    assert len({len(util.encode_response(tok, r["chosen"])) for r in part}) > 1     # lengths differ
    assert got.item() == pytest.approx(sum(every) / len(every), abs=1e-4)
    assert abs(got.item() - sum(per_pair) / 3) > 1e-3         # the per-answer mean is another one


def test_rpo_term_is_one_token_mean_over_the_batch_in_micro_batches(tok, micro_dirs, rows):
    """dpo_step in micro-batches of 1 pair gives the loss of the whole batch at once: the SFT
    term's token mean is over the batch's chosen tokens, not a mean of micro-batch means."""
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, dpo_sft_weight=1.0)
    ref = util.load_causal_lm(cfg.path("actor"))
    policy = _perturbed(util.load_causal_lm(cfg.path("actor")))
    part = rows[:4]
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    whole = util.dpo_step(policy, policy, ref, tok, opt, None, part, cfg, "cpu", 1)[0]
    pieces = util.dpo_step(policy, policy, ref, tok, opt, None, part,
                           dataclasses.replace(cfg, micro_batch_size=1), "cpu", 1)[0]
    assert pieces == pytest.approx(whole, abs=1e-5)


def test_dpo_step_adds_the_weighted_rpo_term(tok, micro_dirs, rows):
    """dpo_step's loss = DPO loss + dpo_sft_weight x chosen_nll (a flipped sign or a lost weight
    changes it)."""
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, dpo_sft_weight=0.7)
    ref = util.load_causal_lm(cfg.path("actor"))
    policy = _perturbed(util.load_causal_lm(cfg.path("actor")))
    part = rows[:4]
    ids, mask, labels = util.pair_batch(tok, part, cfg)
    with torch.no_grad():
        lp, rlp = (util.answer_logprobs(m, ids, mask, labels) for m in (policy, ref))
    dpo, _, _ = util.dpo_loss(lp[:4], lp[4:], rlp[:4], rlp[4:], cfg.dpo_beta, cfg.dpo_loss)
    want = dpo + 0.7 * util.chosen_nll(lp[:4], labels[:4])
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    loss = util.dpo_step(policy, policy, ref, tok, opt, None, part, cfg, "cpu", 1)[0]
    assert loss == pytest.approx(want.item(), abs=1e-4) and abs(want - dpo) > 0.5


def test_dpo_starts_at_log2_and_learns(tok, micro_dirs, rows):
    # plain DPO (sigmoid loss, no SFT term): its loss starts at log 2
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, dpo_epochs=6, dpo_batch_size=8, dpo_lr=3e-3,
                          dpo_loss="sigmoid", dpo_sft_weight=0.0)
    actor = util.load_causal_lm(cfg.path("actor"))
    ref = util.load_causal_lm(cfg.path("actor"))
    history = util.train_dpo(actor, ref, tok, rows[:8], rows[8:16], cfg, "cpu", n_logs=6, n_sampled=4,
                             sample_every=2)
    start = history[0]                                                   # step 0: policy == reference
    assert start["step"] == 0 and "train_loss" not in start
    assert start["val_reward_acc"] == 0.0                              # a tie is no right answer
    for key in ("val_margin", "val_chosen_logratio", "val_rejected_logratio", "val_kl_to_sft"):
        assert start[key] == pytest.approx(0.0, abs=1e-5), key
    assert history[1]["train_loss"] == pytest.approx(math.log(2), abs=0.02)
    assert history[-1]["val_margin"] != pytest.approx(0.0, abs=1e-3)
    # sampled figures at steps 0, 2 x log_every, ... and the last
    sampled = [h["step"] for h in history if "val_exec_acc_sampled" in h]
    assert sampled[0] == 0 and sampled[-1] == history[-1]["step"] and 1 < len(sampled) < len(history)
    trained = util.train_dpo(actor, ref, tok, rows[:8], rows[:8], cfg, "cpu", n_logs=6, n_sampled=0)
    assert trained[-1]["val_reward_acc"] >= 0.75 and not any("val_kl_to_sft" in h for h in trained)


def _perturbed(model, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_dpo_pair_stats_are_the_answers_log_ratios(tok, micro_dirs, rows):
    """chosen/rejected log-ratios against answer_logprobs of policy and reference taken apart; a
    swapped half, a sign or a missing reference would change them."""
    cfg = micro_dirs
    ref = util.load_causal_lm(cfg.path("actor"))
    policy = _perturbed(util.load_causal_lm(cfg.path("actor")))
    part = rows[:6]
    stats = util.dpo_pair_stats(policy, ref, tok, part, cfg, "cpu", batch_size=4)   # two batches
    ids, mask, labels = util.pair_batch(tok, part, cfg)
    with torch.no_grad():
        lp, rlp = (util.answer_logprobs(m, ids, mask, labels) for m in (policy, ref))
    c, r = (lp - rlp)[:6], (lp - rlp)[6:]
    assert abs(c.mean() - r.mean()) > 0.1                                  # the test can tell them apart
    assert stats["chosen_logratio"] == pytest.approx(c.mean().item(), abs=1e-4)
    assert stats["rejected_logratio"] == pytest.approx(r.mean().item(), abs=1e-4)
    assert stats["margin"] == pytest.approx(cfg.dpo_beta * (c - r).mean().item(), abs=1e-4)
    assert stats["reward_acc"] == pytest.approx((c > r).float().mean().item())


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_sample_stats_agree_with_the_evaluation(tok, micro_dirs, rows, monkeypatch, lora):
    """The curve's KL and sampled accuracy against evaluate_batch on the same samples (with LoRA:
    the reference is the model with its adapters off, against an explicit copy)."""
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, lora_r=4 if lora else 0, eval_batch_size=4)
    base = util.load_causal_lm(cfg.path("actor"))
    policy = _perturbed(util.add_lora(util.load_causal_lm(cfg.path("actor")), cfg), 0.3 if lora else 0.05)
    part = rows[:6]
    decode, queue = util.decode_responses, []

    def gold_for_every_other(t, resp):     # rows 0, 2, 4 answered with their gold SQL: 3 of 6 right
        done, queue[:] = queue[:len(resp)], queue[len(resp):]
        return [r["chosen"] if part.index(r) % 2 == 0 else x for r, x in zip(done, decode(t, resp))]
    monkeypatch.setattr(util, "decode_responses", gold_for_every_other)
    util.set_seed(5)
    queue[:] = part
    stats = util.dpo_sample_stats(policy, None if lora else base, tok, part, cfg)   # batches 4 + 2
    util.set_seed(5)
    queue[:] = part
    per_row = evaluate_batch(policy, tok, part[:4], [""] * 4, cfg, ref=base)
    per_row += evaluate_batch(policy, tok, part[4:], [""] * 2, cfg, ref=base)
    kl = [r["kl"] for r in per_row]
    assert max(abs(k) for k in kl) > 0.05                                  # the policy is not the reference
    assert stats["kl_to_sft"] == pytest.approx(sum(kl) / 6, abs=1e-4)
    assert stats["exec_acc_sampled"] == sum(r["sampled_ok"] for r in per_row) / 6 >= 0.5


# ---------------------------------------------------------------- GRPO

def test_group_advantages_against_statistics():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.2, 0.2, 0.2, 0.2, 0.2])
    got = util.group_advantages(rewards, group_size=4).tolist()
    for g in range(2):
        grp = rewards[4 * g:4 * g + 4].tolist()
        mean, std = statistics.mean(grp), statistics.stdev(grp)
        for i, r in enumerate(grp):
            assert got[4 * g + i] == pytest.approx((r - mean) / (std + 1e-4), abs=1e-5)
    assert got[4:] == [0.0] * 4                                          # a group that all scores the same: no signal


def test_exec_and_format_rewards(rows):
    r = rows[0]
    texts = [r["chosen"], r["rejected"], " SELECT nonsense FROM nowhere", r["chosen"], " DROP TABLE x"]
    assert util.exec_rewards([r] * 5, texts)[:2] == [1.0, 0.0]
    assert util.format_rewards([r] * 5, texts, [True, True, True, False, True]) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_grpo_runs_and_first_update_starts_from_ratio_one(micro_dirs):
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, grpo_iterations=2, grpo_epochs=1, grpo_minibatch_size=16)
    actor, history = util.train_grpo(cfg, "cpu")
    assert len(history) == 2 and {"reward", "gold_acc", "kl", "groups_without_signal"} <= set(history[0])
    assert history[0]["clipfrac"] == 0.0 and history[0]["kl"] == pytest.approx(0.0, abs=1e-6)   # one minibatch: ratio 1, policy = ref


# ---------------------------------------------------------------- LoRA

def test_lora_reference_is_the_base_and_saves_merged(tok, micro_dirs, rows, tmp_path):
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, lora_r=4, dpo_lr=1e-2, dpo_batch_size=8, dpo_epochs=2)
    base = util.load_causal_lm(cfg.path("actor"))
    actor = util.add_lora(copy.deepcopy(base), cfg)
    trainable = sum(p.numel() for p in actor.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in base.parameters()) / 2
    util.train_dpo(actor, None, tok, rows[:8], rows[:8], cfg, "cpu", n_logs=1)
    ids, mask, _ = util.pair_batch(tok, rows[:2], cfg)
    with torch.no_grad():
        with util.reference_model(actor, None) as ref:
            ref_logits = ref(input_ids=ids, attention_mask=mask).logits
        lora_logits = actor(input_ids=ids, attention_mask=mask).logits
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ref_logits, base_logits, atol=1e-5)           # adapters off = the untouched SFT weights
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)      # adapters on = the trained policy
    util.save_model(actor, tok, tmp_path / "dpo")
    loaded = util.load_causal_lm(tmp_path / "dpo")                     # plain from_pretrained, no peft needed
    assert type(loaded).__name__ == "OPTForCausalLM"
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, lora_logits, atol=1e-4)
    assert hasattr(actor, "disable_adapter")                            # saving merged a copy, not the live model


def test_ppo_with_lora_holds_one_base_copy_and_resumes(micro_dirs, tmp_path):
    import shutil
    out = tmp_path / "m"
    shutil.copytree(micro_dirs.path("actor"), out / "actor")
    shutil.copytree(micro_dirs.path("critic"), out / "critic")
    cfg = util.get_config("smoke", out_dir=str(out), lora_r=4, ppo_iterations=2, save_every=1)
    first = util.train_ppo(cfg, "cpu", stop_after=1)
    assert (out / "rlhf" / "adapter" / "adapter_config.json").exists()
    assert type(util.load_causal_lm(out / "rlhf")).__name__ == "OPTForCausalLM"   # merged: 4_test loads it plainly
    resumed = util.train_ppo(cfg, "cpu")
    assert [h["iteration"] for h in resumed] == [1, 2] and resumed[0] == first[0]
    assert resumed[1]["ratio_first_minibatch_max_dev"] < 1e-6
    # the resumed run went on from the checkpoint's adapters and optimizer: the same second iteration as a run
    # never stopped (the adapters' initial weights come from the config's seed, not from the generator's state)
    torch.manual_seed(123)
    whole = tmp_path / "w"
    for d in ("actor", "critic"):
        shutil.copytree(micro_dirs.path(d), whole / d)
    straight = util.train_ppo(util.get_config("smoke", out_dir=str(whole), lora_r=4, ppo_iterations=2), "cpu")
    same = lambda rec: {k: v for k, v in rec.items() if not k.startswith("time_")}
    assert same(resumed[1]) == same(straight[1])
    assert util.load_ppo_state(out / "rlhf", util.get_config("smoke", out_dir=str(out))) is None   # full FT: afresh
