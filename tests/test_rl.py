"""The RL math against brute-force references, and the model plumbing around it."""
import json
import math

import pytest
import torch

import util


# ---------------------------------------------------------------- SFT: labels and EOS

def test_label_masking_and_eos(tok, rows):
    r = rows[0]
    ids, labels = util.sft_example(tok, r["prompt"], r["response"], 112, 40)
    n_prompt = len(util.encode_prompt(tok, r["prompt"]))
    assert labels[:n_prompt] == [-100] * n_prompt                      # no loss on the prompt
    assert labels[n_prompt:] == ids[n_prompt:]                          # loss on every response token
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id   # the model learns to stop
    ids2, mask, lab = util.right_pad_batch([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert (lab[1, 5:] == -100).all() and (mask[1, 5:] == 0).all() and (ids2[1, 5:] == tok.pad_token_id).all()


def test_batched_tokenising_and_padding_equal_one_row_at_a_time(tok, rows):
    prompts, answers = [r["prompt"] for r in rows[:20]], [r["chosen"] for r in rows[:20]]
    one_by_one = []
    for p, a in zip(prompts, answers):                                 # reference: one tokenizer call per text
        pi = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        ai = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        one_by_one.append((pi[-30:] + ai[:9], [-100] * len(pi[-30:]) + ai[:9]))
    assert util.sft_examples(tok, prompts, answers, 30, 9) == one_by_one
    ids, mask, labels = util.right_pad_batch(one_by_one, tok.pad_token_id)
    left_ids, left_mask = util.left_pad([x for x, _ in one_by_one], tok.pad_token_id)
    for i, (x, y) in enumerate(one_by_one):
        n, pad = len(x), ids.shape[1] - len(x)
        assert ids[i, :n].tolist() == x and labels[i, :n].tolist() == y and mask[i].tolist() == [1] * n + [0] * pad
        assert ids[i, n:].tolist() == [tok.pad_token_id] * pad and labels[i, n:].tolist() == [-100] * pad
        assert left_ids[i].tolist() == [tok.pad_token_id] * pad + x and left_mask[i].tolist() == [0] * pad + [1] * n


def test_sft_loss_counts_only_response_tokens(tok, micro_dirs, rows):
    model = util.load_causal_lm(micro_dirs.path("actor"))
    ex = [util.sft_example(tok, r["prompt"], r["response"], 112, 40) for r in rows[:3]]
    ids, mask, labels = util.right_pad_batch(ex, tok.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    ref, n = 0.0, 0
    for b in range(len(ex)):                                           # brute force: loop over tokens
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                ref -= torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                n += 1
    assert util.sft_loss(model, (ids, mask, labels), "cpu").item() == pytest.approx(ref / n, rel=1e-4)


def test_label_logits_give_the_full_heads_loss_and_gradients(tok, micro_dirs, rows):
    model = util.load_causal_lm(micro_dirs.path("actor"))
    ids, mask, labels = util.right_pad_batch([util.sft_example(tok, r["prompt"], r["response"], 112, 40)
                                              for r in rows[:4]], tok.pad_token_id)
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss      # transformers: every position
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = util.sft_loss(model, (ids, mask, labels), "cpu")
    ours.backward()
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    assert len(util.label_logits(model, ids, mask, labels)[0]) == int((labels != -100).sum()) < ids.numel() / 2
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-6), n
    assert model(input_ids=ids, attention_mask=mask).logits.shape[:2] == ids.shape     # the hook is gone


# ---------------------------------------------------------------- reward model

def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert util.last_token_index(right).tolist() == [2, 4]
    assert util.last_token_index(left).tolist() == [4, 4]


def test_reward_score_same_under_left_and_right_padding(tok, micro_dirs, rows):
    rm = util.load_score_model(micro_dirs.path("critic"))
    cfg = micro_dirs
    pair = [{"prompt": rows[0]["prompt"], "x": rows[0]["chosen"]}, {"prompt": rows[1]["prompt"], "x": " SELECT"}]
    ids_r, mask_r = util.rm_batch(tok, pair, cfg, "x")
    seqs = [ids_r[i, :int(mask_r[i].sum())].tolist() for i in range(2)]
    ids_l, mask_l = util.left_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        right = util.reward_scores(rm, ids_r, mask_r)
        left = util.reward_scores(rm, ids_l, mask_l)
        single = torch.cat([util.reward_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    assert torch.allclose(right, single, atol=1e-5) and torch.allclose(left, single, atol=1e-5)
    assert seqs[0][-1] == tok.eos_token_id                               # the score is read on the EOS
    # the normalisation offset is subtracted
    rm.config.reward_offset = 0.5
    with torch.no_grad():
        assert torch.allclose(util.reward_scores(rm, ids_r, mask_r), right - 0.5, atol=1e-6)


def test_shared_prompt_scores_equal_full_forward(tok, micro_dirs, rows):
    rm = util.load_score_model(micro_dirs.path("critic"))
    part = [dict(rows[0], more_rejected=[" SELECT", " SELECT name FROM x"]), dict(rows[1], more_rejected=[]),
            {k: v for k, v in rows[2].items() if k != "more_rejected"}]                # user data without the field
    cfg = util.get_config("smoke", rm_max_rejected=8)
    p_ids, p_mask, ids, mask, owner, c, r = util.ranking_batch(util.ranking_examples(tok, part, cfg), tok.pad_token_id)
    # answers: row 0 chosen, rejected, 2 more; row 1 chosen, rejected; row 2 chosen, rejected
    assert owner.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert c.tolist() == [0, 0, 0, 4, 6] and r.tolist() == [1, 2, 3, 5, 7]
    texts = [a for row in part for a in [row["chosen"], row["rejected"], *row.get("more_rejected", [])]]
    full_ids, full_mask = util.rm_batch(tok, [{"prompt": part[o]["prompt"], "x": t} for o, t in zip(owner.tolist(), texts)],
                                        cfg, "x")
    with torch.no_grad():
        full = util.reward_scores(rm, full_ids, full_mask, normalized=False)
        shared = util.at_last_token(util.shared_prompt_scores(rm, p_ids, p_mask, ids, mask, owner), mask)
    assert torch.allclose(shared, full, atol=1e-5)                     # the prompt read once gives the same scores
    # the default rm_max_rejected=1 keeps only each row's own rejected answer
    capped = util.ranking_batch(util.ranking_examples(tok, part, micro_dirs), tok.pad_token_id)
    assert capped[4].tolist() == [0, 0, 1, 1, 2, 2]


def test_mistake_positions():
    pad = 0
    chosen = torch.tensor([[5, 6, 7, 2, pad], [5, 6, 7, 8, 2]])
    rejected = torch.tensor([[5, 6, 9, 9, 2], [5, 6, 7, 2, pad]])      # a wrong token; a dropped condition
    m = util.mistake_positions(chosen, rejected, (chosen != pad).long(), (rejected != pad).long())
    assert m.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]]


def test_pairwise_loss_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = 0.31326, -log sigmoid(-1) = 1.31326
    assert util.pairwise_loss(rc, rr).item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)


# ---------------------------------------------------------------- PPO math

def test_response_mask_and_first_eos():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 1, 1], [5, 2, 7, 2, 1], [5, 6, 7, 8, 9]])
    assert util.response_mask(resp, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    end, has = util.first_eos_index(resp, eos)
    assert end.tolist() == [2, 1, 4] and has.tolist() == [True, True, False]


def test_reward_on_eos_token_only():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1.]])
    kl = torch.full((2, 5), 0.5) * mask
    rewards = util.place_rewards(torch.tensor([3.0, -1.0]), kl, mask, torch.tensor([2, 4]), kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.05, 2.95, 0, 0], [-0.05, -0.05, -0.05, -0.05, -1.05]])
    assert torch.allclose(rewards, expected)


def test_kl_estimators():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    lp, lq = p.log(), q.log()
    k1 = util.kl_per_token(lp, lq, "k1")
    k3 = util.kl_per_token(lp, lq, "k3")
    assert torch.allclose(k1, lp - lq)
    assert torch.allclose(k3, q / p - 1 - (q / p).log())
    assert (k3 >= 0).all()
    assert float((p * k1).sum()) == pytest.approx(true_kl, abs=1e-6)   # both unbiased under p
    assert float((p * k3).sum()) == pytest.approx(true_kl, abs=1e-6)
    with pytest.raises(ValueError):
        util.kl_per_token(lp, lq, "k9")


def brute_force_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            a = 0.0
            for l in range(t, n):
                v_next = values[b, l + 1] if l + 1 < n else 0.0
                a += (gamma * lam) ** (l - t) * (rewards[b, l] + gamma * v_next - values[b, l])
            adv[b, t] = a
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_brute_force(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0.]])
    adv, ret = util.gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = brute_force_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)
    assert (adv[mask == 0] == 0).all()                  # nothing after EOS


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0.]])
    w = util.masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    ref = (vals - vals.mean()) / vals.var(unbiased=False).sqrt()
    assert torch.allclose(w[mask.bool()], ref, atol=1e-4)
    assert (w[mask == 0] == 0).all()
    assert torch.allclose(util.masked_whiten(x, mask, shift_mean=False)[mask.bool()], ref + vals.mean(), atol=1e-4)


# ---------------------------------------------------------------- generation and log-probs

def test_logprobs_use_the_sampling_temperature(tok, micro_dirs, rows):
    model = util.load_causal_lm(micro_dirs.path("actor"))
    ids, mask = util.encode_prompts(tok, [r["prompt"] for r in rows[:4]], 112)
    T = 0.7
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                         max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    lq = ids.shape[1]
    resp = out.sequences[:, lq:]
    gen_logp = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    rmask = util.response_mask(resp, tok.eos_token_id)
    attn = torch.cat([mask, rmask], 1)
    with torch.no_grad():
        ours, _ = util.response_logprobs(model, out.sequences, attn, lq, T)
        wrong_t, _ = util.response_logprobs(model, out.sequences, attn, lq, 1.0)
    m = rmask.bool()
    assert torch.allclose(ours[m], gen_logp[m], atol=1e-4)             # same distribution as the sampler
    assert not torch.allclose(wrong_t[m], gen_logp[m], atol=1e-3)


def test_left_padding_gives_same_logits_as_no_padding(tok, micro_dirs, rows):
    model = util.load_causal_lm(micro_dirs.path("actor"))
    prompts = [rows[0]["prompt"], rows[1]["prompt"] + " extra words here"]
    ids, mask = util.encode_prompts(tok, prompts, 112)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        alone = torch.stack([model(input_ids=torch.tensor([util.encode_prompt(tok, p)])).logits[0, -1] for p in prompts])
    assert torch.allclose(batched, alone, atol=1e-4)


# ---------------------------------------------------------------- PPO loop: ratio, checkpoints, resume

def _ppo_cfg(micro_dirs, tmp_path, **kw):
    import shutil
    for d in ("actor", "critic"):
        shutil.copytree(micro_dirs.path(d), tmp_path / d)
    return util.get_config("smoke", out_dir=str(tmp_path), ppo_iterations=3, rollout_batch_size=8,
                           ppo_minibatch_size=4, ppo_epochs=2, save_every=1, max_response_tokens=8, **kw)


def test_ratio_is_one_on_first_minibatch_and_clip_acts(micro_dirs, rows, tmp_path):
    cfg = _ppo_cfg(micro_dirs, tmp_path, ppo_lr=1e-2)
    hist = util.train_ppo(cfg, "cpu", rows=rows)
    for h in hist:
        assert h["ratio_first_minibatch_max_dev"] < 1e-6
        for k in ("rm_score", "gold_acc", "kl", "entropy", "clipfrac", "approx_kl", "pg_loss", "vf_loss",
                  "length", "eos_rate", "time_generate", "time_score", "time_train"):
            assert math.isfinite(h[k]), k
    assert max(h["clipfrac"] for h in hist) > 0                          # several epochs: the clip acts


def test_resume_from_checkpoint_matches_uninterrupted_run(micro_dirs, rows, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    full = util.train_ppo(_ppo_cfg(micro_dirs, a), "cpu", rows=rows)
    cfg_b = _ppo_cfg(micro_dirs, b)
    first = util.train_ppo(cfg_b, "cpu", rows=rows, stop_after=1)       # "interrupted" after one iteration
    assert len(first) == 1 and json.loads((b / "rlhf" / "state.json").read_text())["iteration"] == 1
    resumed = util.train_ppo(cfg_b, "cpu", rows=rows)
    assert len(resumed) == 3
    for x, y in zip(full, resumed):
        for k in ("rm_score", "kl", "pg_loss", "vf_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k
    assert not any(p.name.endswith((".tmp", ".old")) for p in b.iterdir())   # no half-written leftovers
    model = util.load_causal_lm(b / "rlhf")                               # loads with plain from_pretrained
    assert model is not None
    # a retrained SFT model makes the checkpoint stale: PPO starts afresh instead of resuming
    util.save_model(util.load_causal_lm(b / "actor"), None, b / "actor")
    assert util.load_ppo_state(b / "rlhf", cfg_b) is None
