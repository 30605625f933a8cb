"""PPO's and GRPO's update steps against references worked out independently: the signs and weights
that join the policy and value losses, which side of GRPO's clip is taken, and micro-batches."""
import copy

import pytest
import torch

import util

LQ, LR = 4, 6                                   # prompt and answer lengths of the hand-made rollout


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradients it is asked to step with (after the clip)."""

    def __init__(self, params, lr):
        super().__init__(list(params), lr=lr)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _models(micro_dirs):
    actor = util.load_causal_lm(micro_dirs.path("actor"))
    critic = util.load_score_model(micro_dirs.path("critic"))
    return actor, critic


def _rollout(actor, critic, tok, lengths):
    """A rollout made by hand: random answers of the given lengths (pads after), pi_old and old
    values moved off the current ones so both clips act on some tokens, mixed-sign advantages."""
    g = torch.Generator().manual_seed(0)
    B = len(lengths)
    qr = torch.randint(4, len(tok), (B, LQ + LR), generator=g)
    mask = (torch.arange(LR)[None] < torch.tensor(lengths)[:, None]).float()
    qr[:, LQ:][mask == 0] = tok.pad_token_id
    attn = torch.cat([torch.ones(B, LQ, dtype=torch.long), mask.long()], 1)
    with torch.no_grad():
        logprobs, _ = util.response_logprobs(actor, qr, attn, LQ, 0.7)
        values = util.critic_values(critic, qr, attn, LQ)
    old_logprobs = (logprobs + torch.empty(B, LR).uniform_(-0.6, 0.6, generator=g)) * mask
    old_values = (values + torch.empty(B, LR).uniform_(-0.5, 0.5, generator=g)) * mask
    ro = util.Rollout(qr, attn, LQ, mask, torch.tensor(lengths) - 1, old_logprobs,
                      old_logprobs.clone(), old_values, torch.zeros(B), torch.ones(B, dtype=bool),
                      [""] * B, [None] * B)
    advantages = torch.randn(B, LR, generator=g) * mask
    returns = (old_values + torch.randn(B, LR, generator=g)) * mask
    return ro, advantages, returns


def _cfg(**kw):
    return util.get_config("smoke", rollout_batch_size=5, ppo_minibatch_size=5, ppo_epochs=1,
                           max_grad_norm=1e6, temperature=0.7, **kw)


def test_ppo_update_adds_the_policy_loss_and_vf_coef_times_the_value_loss(micro_dirs, tok):
    """Catches a flipped sign or a lost vf_coef where ppo_update joins the two losses."""
    actor, critic = _models(micro_dirs)
    ro, adv, ret = _rollout(actor, critic, tok, [6, 2, 4, 1, 5])
    cfg = _cfg(vf_coef=0.3, cliprange=0.2, cliprange_value=0.2)
    # reference: the hand-written PPO objective, with autograd, on the models as they are now
    m = ro.mask
    logits = actor(input_ids=ro.query_responses, attention_mask=ro.attention_mask).logits
    logp = torch.log_softmax(logits[:, LQ - 1:-1] / 0.7, -1).gather(
        -1, ro.query_responses[:, LQ:, None])[..., 0]
    r = torch.exp((logp - ro.logprobs) * m)
    pg = (-torch.min(adv * r, adv * r.clamp(0.8, 1.2)) * m).sum() / m.sum()
    v = util.critic_values(critic, ro.query_responses, ro.attention_mask, LQ)
    v_clip = ro.values + (v - ro.values).clamp(-0.2, 0.2)
    vf = 0.5 * (torch.max((v - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / m.sum()
    clipped = ((r - 1).abs() > 0.2)[m.bool()]
    assert clipped.any() and not clipped.all()                        # the clip acts on some tokens
    want_a = torch.autograd.grad(pg, list(actor.parameters()), allow_unused=True)
    want_c = torch.autograd.grad(0.3 * vf, list(critic.parameters()), allow_unused=True)
    opt_a, opt_c = RecordingSGD(actor.parameters(), 0.1), RecordingSGD(critic.parameters(), 0.1)
    stats = util.ppo_update(actor, critic, opt_a, opt_c, ro, adv, ret, cfg)
    assert stats["pg_loss"] == pytest.approx(pg.item(), rel=1e-4, abs=1e-6)
    assert stats["vf_loss"] == pytest.approx(vf.item(), rel=1e-4, abs=1e-6)
    for got, want in ((opt_a.grads[0], want_a), (opt_c.grads[0], want_c)):
        for g, w in zip(got, want):
            w = torch.zeros_like(g) if w is None else w
            assert torch.allclose(g, w, rtol=1e-3, atol=1e-6), (g.norm(), w.norm())
    assert sum(float(w.norm()) for w in want_c if w is not None) > 1e-3     # not a vacuous check


def test_grpo_loss_takes_the_pessimistic_side_of_the_clip():
    """Catches min swapped for max, or the clip taken on the wrong side for A > 0 or A < 0."""
    eps = 0.2
    ratios = [[1.5, 0.6, 1.1, 9.0], [1.5, 0.6, 4.0, 4.0]]            # 9.0 / 4.0: masked tokens
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, -2.0, -1.0]])
    logp = (old + torch.tensor(ratios).log()).requires_grad_(True)
    loss, _, ratio = util.grpo_loss(logp, old, old, adv, mask, eps, kl_coef=0.0)
    loss.backward()
    # brute force, token by token: -min(r A, clip(r) A); its d/d logp is -A r where the unclipped
    # term is the smaller, 0 where the clipped (constant) one is; a mean over each answer's tokens,
    # then over the answers
    ref, grad = 0.0, torch.zeros(2, 4)
    for b in range(2):
        n = int(mask[b].sum())
        a = float(adv[b])
        for t in range(n):
            x = ratios[b][t]
            unclipped, clipped = x * a, min(max(x, 1 - eps), 1 + eps) * a
            ref += -min(unclipped, clipped) / n / 2
            grad[b, t] = (-a * x if unclipped <= clipped else 0.0) / n / 2
    # A=+2: r=1.5 -> -2.4 (clipped), r=0.6 -> -1.2, r=1.1 -> -2.2; A=-1: r=1.5 -> 1.5, r=0.6 -> 0.8
    assert ref == pytest.approx(((-2.4 - 1.2 - 2.2) / 3 + (1.5 + 0.8) / 2) / 2)
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(logp.grad, grad, atol=1e-5), logp.grad
    assert torch.allclose(ratio * mask, torch.tensor(ratios) * mask, atol=1e-5)


def test_ppo_micro_batches_give_the_whole_minibatch_gradients(micro_dirs, tok):
    """Catches micro-batches weighted equally or by rows instead of by their answer tokens."""
    actor, critic = _models(micro_dirs)
    ro, adv, ret = _rollout(actor, critic, tok, [6, 1, 4, 2, 5])      # unequal answer lengths
    out = {}
    for micro in (0, 2):                                              # whole, and 2 + 2 + 1 rows
        a, c = copy.deepcopy(actor), copy.deepcopy(critic)
        opt_a, opt_c = RecordingSGD(a.parameters(), 0.5), RecordingSGD(c.parameters(), 0.5)
        torch.manual_seed(0)                                          # the same shuffle
        stats = util.ppo_update(a, c, opt_a, opt_c, ro, adv, ret, _cfg(micro_batch_size=micro))
        out[micro] = stats, opt_a.grads[0] + opt_c.grads[0], list(a.parameters()) + list(
            c.parameters())
    (s0, g0, p0), (s2, g2, p2) = out[0], out[2]
    for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy"):
        assert s2[k] == pytest.approx(s0[k], rel=1e-4, abs=1e-6), k
    assert sum(float(g.norm()) for g in g0) > 1e-2                        # a real update
    for x, y in zip(g0, g2):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-6), (x.norm(), y.norm())
    for x, y in zip(p0, p2):                                          # the same weights after it
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_whiten_rewards_whitens_the_per_token_rewards_kl_included_as_trl():
    """whiten_rewards scales the rewards PPO's GAE reads, KL penalty and score together, to unit
    spread over the answer tokens, keeping their mean (TRL's masked_whiten(shift_mean=False)).
    The old version whitened only the scores: its KL tokens kept -kl_coef * KL exactly."""
    g = torch.Generator().manual_seed(3)
    B, L = 4, 6
    mask = (torch.arange(L)[None] < torch.tensor([6, 4, 5, 2])[:, None]).float()
    logprobs = torch.randn(B, L, generator=g) * mask
    ref = (logprobs + 0.3 * torch.randn(B, L, generator=g)) * mask
    ro = util.Rollout(None, None, 0, mask, mask.sum(1).long() - 1, logprobs, ref,
                      torch.zeros(B, L), torch.tensor([1.5, -0.5, 2.0, 0.0]),
                      torch.ones(B, dtype=bool), [""] * B, [None] * B)
    kl_coef = 0.5
    plain = util.ppo_advantages(ro, _cfg(), kl_coef)[1]
    white = util.ppo_advantages(ro, _cfg(whiten_rewards=True), kl_coef)[1]
    m = mask.bool()
    mean, std = plain[m].mean(), plain[m].std(unbiased=False)
    assert torch.allclose(white[m], (plain[m] - mean) / std + mean, atol=1e-5)
    assert float(white[m].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert float(white[m].mean()) == pytest.approx(float(mean), abs=1e-5)
    assert (white[~m] == 0).all()
    kl_only = m.clone()
    kl_only[torch.arange(B), ro.end_index] = False      # the tokens with no score on them
    assert not torch.allclose(white[kl_only], plain[kl_only])   # the KL penalty is whitened too
