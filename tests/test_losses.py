"""The losses as the loops use them, against values and gradients worked out by hand. Each case is chosen so that
a plausible one-line mistake gives another number: which side of the clip is taken for a positive and a negative
advantage, min for max, a missing clip, a flipped sign, chosen and rejected swapped, the IPO target, the mean
over tokens instead of over answers, and a mask applied after an overflow instead of before it."""
import math

import pytest
import torch

import util


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_pairwise_loss_value_gradient_and_order():
    rc = torch.tensor([2.0, 0.5], requires_grad=True)
    rr = torch.tensor([0.0, 1.0])
    loss = util.pairwise_loss(rc, rr)                        # margins +2 and -0.5: not symmetric
    assert loss.item() == pytest.approx((-math.log(sigmoid(2)) - math.log(sigmoid(-0.5))) / 2, abs=1e-6)
    loss.backward()                                          # d/d rc of -log sigmoid(m) = -sigmoid(-m), over 2 pairs
    assert rc.grad.tolist() == pytest.approx([-sigmoid(-2) / 2, -sigmoid(0.5) / 2], abs=1e-6)
    assert util.pairwise_loss(rr, rc.detach()).item() > loss.item() + 0.5        # swapped: a worse loss


def test_ppo_policy_loss_takes_the_pessimistic_side_of_the_clip():
    # tokens: (advantage, ratio) = (+1, 1.5) clipped, (+1, 0.5) not, (-2, 0.5) clipped, (-2, 1.5) not, masked
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 5.0]])
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, ratio = util.ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.6 (clipped), 3.0; the masked one does not count
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.6 + 3.0) / 4, abs=1e-6)
    assert ratio[0, :4].tolist() == pytest.approx([1.5, 0.5, 0.5, 1.5])
    loss.backward()                          # d/d logp of -A r = -A r where unclipped, 0 where the clip holds
    assert new.grad[0].tolist() == pytest.approx([0.0, -0.5 / 4, 0.0, 3.0 / 4, 0.0], abs=1e-6)


def test_ppo_value_loss_keeps_the_larger_error():
    old = torch.zeros(1, 3)
    ret = torch.tensor([[1.0, 1.0, 0.5]])
    values = torch.tensor([[1.0, 0.1, 1.0]], requires_grad=True)
    loss = util.ppo_value_loss(values, old, ret, torch.ones(1, 3), cliprange_value=0.2)
    # token 1: clipped 0.2 errs 0.64 > 0; token 2 inside the clip: 0.81; token 3: 0.25 > clipped (0.2-0.5)^2
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3, abs=1e-6)
    loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5 / 3 * 2 * (0.1 - 1.0), 0.5 / 3 * 2 * 0.5], abs=1e-6)


def test_grpo_loss_by_hand_and_safe_after_eos():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -1e4]])     # after the EOS: a pad scored at -1e4
    ref = torch.tensor([[-1.0, -1.5], [-2.0, 0.0]])       # exp(ref - logp) there would be inf
    loss, kl, ratio = util.grpo_loss(logp, logp.clone(), ref, adv, mask, cliprange=0.2, kl_coef=0.1)
    k3 = math.exp(-0.5) - 1 + 0.5                          # k3 of log(p/q) = 0.5: exp(-0.5) - 1 + 0.5
    first = ((-1 + 0) + (-1 + 0.1 * k3)) / 2               # answer 1: mean over its 2 tokens
    second = 1.0                                           # answer 2: -(-1) * ratio 1, its one token
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)    # then the mean over answers
    assert torch.isfinite(kl).all() and kl[1, 1].item() == 0.0
    assert torch.equal(ratio * mask, mask)


def test_dpo_loss_sign_and_ipo_target():
    lc, lr, rc, rr = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))   # h = 1 - (-1) = 2
    loss, reward_c, reward_r = util.dpo_loss(lc, lr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.2)), abs=1e-6)
    assert (reward_c.item(), reward_r.item()) == pytest.approx((0.1, -0.1))
    swapped, _, _ = util.dpo_loss(lr, lc, rr, rc, beta=0.1)
    assert swapped.item() == pytest.approx(-math.log(sigmoid(-0.2)), abs=1e-6)
    ipo, _, _ = util.dpo_loss(lc, lr, rc, rr, beta=0.1, loss_type="ipo")    # target 1 / (2 beta) = 5
    assert ipo.item() == pytest.approx((2 - 5) ** 2)


def test_sft_step_over_two_processes_averages_to_the_global_token_mean(monkeypatch, micro_dirs,
                                                                       tok, rows):
    """Two processes, each with its share of a batch whose shares hold different numbers of answer
    tokens: the average of their gradients (what DDP takes) is the gradient of the whole batch's
    token mean. A token mean per process, averaged, would weigh the short share's tokens more."""
    import torch
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, max_grad_norm=1e6)
    examples = util.row_examples(tok, rows[:8], cfg)
    shares = [examples[0::2], examples[1::2]]                      # as util.my_share splits them
    tokens = [sum(sum(x != -100 for x in lab[1:]) for _, lab in s) for s in shares]   # answer tokens
    assert tokens[0] != tokens[1]

    def grads(batch):
        model = util.load_causal_lm(micro_dirs.path("actor"))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        util.sft_step(model, model, tok, opt, None, batch, cfg, "cpu", 1)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    whole = grads(examples)

    class TwoProcesses:
        num_processes = 2
    monkeypatch.setattr(util, "accelerator", lambda: TwoProcesses())
    monkeypatch.setattr(util, "global_sum", lambda n: sum(tokens))      # the all-reduce
    averaged = (grads(shares[0]) + grads(shares[1])) / 2
    assert torch.allclose(averaged, whole, atol=1e-6)
