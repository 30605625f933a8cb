"""tiny-rlhf: the RLHF pipeline the notebooks share, in the order they run it.

  models        LoRA adapters; the frozen reference policy
  generation    sampling answers; the log-probs of the tokens sampled
  SFT           supervised fine-tuning on demonstrations: the loss, one step, the loop
  reward        the reward model: a scalar head, the pairwise (Bradley-Terry) loss, its training,
                its scale (mean 0, std 1 on the SFT policy's answers), its scores of texts
  PPO           rollout, KL-penalised rewards, GAE, the clipped policy and value losses, the loop
  DPO / GRPO    preference optimisation without a reward model; group-relative RL on rewards
  evaluation    execution accuracy greedy and sampled, RM score, KL to SFT, win rate; the report
  one stage     run_stage: a stage trained, saved and logged without its notebook
  command line  `python util.py sft|rm|ppo|dpo|grpo|report|pack|unpack|make-dataset|...`: main

The losses (pairwise_loss, ppo_policy_loss, ppo_value_loss, dpo_loss, grpo_loss, group_advantages)
are small pure functions that the loops, the notebooks and the tests share.

The plumbing a learner need not read lives in the package rlhf/, in modules named for what they
hold (its __init__.py lists them); none of them imports this file. util re-exports the names the
notebooks use (util.Config, util.get_config, util.load_rows, util.plot_history, ...). Start with
rlhf/config.py: every knob, each with why. Imports run one way: notebooks -> util -> rlhf/
(tests/test_layout.py checks that they form no circle).

torch is imported here at the top; transformers and peft inside the functions that use them. In
Colab the notebooks' first cell runs rlhf.runtime.colab_setup, which pip-installs only what Colab
lacks (today: nothing), before anything imports util: pip must run before torch (and the numpy it
loads) is imported, so rlhf/runtime.py imports neither (tests/test_reliability.py checks it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.archive import check_archive, pack_models, unpack_models
from rlhf.checks import ConfigError, DataError, check_config
from rlhf.config import (PRESETS, ROOT, Config, default_preset, get_config, load_config,
                         resolve_precision)
from rlhf.data_files import (DATA_SOURCES, Rows, check_grpo_reward, data_source, demonstrations,
                             in_validation, leaked_prompts, load_data, load_rows,
                             report_leakage, validation_prompts, with_fields)
from rlhf.encoding import (encode_batch, encode_prompt, encode_prompts, encode_response,
                           fit_rows, left_pad, pair_batch, ranking_batch, ranking_examples,
                           right_pad_batch, rm_batch, row_examples, sft_example, sft_examples)
from rlhf.model_files import (_require, cache_kwarg, check_tokenizer_matches,
                              checkpointing_enable, disable_dropout, is_checkpointing,
                              load_causal_lm, load_score_model, load_tokenizer, output_cache,
                              prepare_base_models, run_in_precision, tiny_opt_config,
                              train_tokenizer)
from rlhf.plotting import expect, plot_history, show_source
from rlhf.runtime import (accelerator, colab_setup, free_memory, get_device, global_sum,
                          hub_reachable, my_share, progress, set_seed, unwrap)
from rlhf.saving import (_json_safe, inputs_fingerprint, load_ppo_state, optimizer_from_tensors,
                         ppo_settings, prompts_digest, save_model, save_ppo_checkpoint,
                         write_json, write_run_record)
from rlhf.sql_data import (FAMILIES, HABIT_RATE, HABITS, dataset_stats, execute_sql,
                           execution_accuracy, execution_match, make_dataset, write_dataset)
from rlhf.stopping import (TrainingStopped, _sigterm_to_interrupt, check_not_stopped,
                           kept_checkpoint, kept_model, stop_cleanly)
from rlhf.training import (backward, batches, check_finite, grad_scaler, make_optimizer,
                           micro_batches, optimizer_step)

# the plumbing's names that notebooks, tests and the CLI reach as util.X without util using them
__all__ = ["check_archive", "Config", "ConfigError", "DataError", "PRESETS", "ROOT", "check_config",
           "default_preset", "get_config", "hub_reachable", "load_config", "DATA_SOURCES",
           "FAMILIES", "HABITS", "HABIT_RATE", "Rows", "TrainingStopped", "_json_safe",
           "_sigterm_to_interrupt", "cache_kwarg", "checkpointing_enable", "colab_setup",
           "data_source", "dataset_stats", "disable_dropout", "encode_batch", "encode_prompt",
           "encode_response", "execution_accuracy", "expect", "free_memory", "get_device",
           "in_validation", "is_checkpointing", "leaked_prompts", "left_pad", "load_rows",
           "make_dataset", "output_cache", "plot_history", "prepare_base_models",
           "report_leakage", "resolve_precision", "rm_batch", "run_in_precision", "save_model",
           "sft_example", "sft_examples", "show_source", "tiny_opt_config", "train_tokenizer",
           "validation_prompts", "write_dataset", "write_json", "write_run_record"]


# ============================================================================ models


def add_lora(model, cfg: Config):
    """With cfg.lora_r > 0, wrap the model in peft LoRA adapters on every linear layer (base weights
    frozen)."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    import warnings
    # the adapters' random initial weights come from the config's seed, not from whatever used the
    # random generator before (a notebook's earlier cells, an earlier run): a resumed run rebuilds
    # the same adapters, and the generator's state outside is left as it was
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        torch.manual_seed(cfg.seed)
        # peft calls a method transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora)


@contextlib.contextmanager
def reference_model(actor, ref):
    """The frozen reference policy: the SFT copy `ref`, or with LoRA (ref=None) the actor itself
    with its adapters switched off, so only one copy of the base weights is held."""
    with torch.no_grad():
        if ref is not None:
            yield ref
        else:
            with actor.disable_adapter():
                yield actor


# ============================================================================ generation


def generate(model, tok, prompts: list[str], cfg: Config, greedy: bool = False,
             temperature: float | None = None):
    """Batched KV-cached generation: returns (query+response ids [B, Lq+Lr], prompt mask, prompt
    length)."""
    ids, mask = encode_prompts(tok, prompts, cfg.max_prompt_tokens)
    device = next(model.parameters()).device
    # greedy, or pure temperature sampling
    kwargs = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=temperature or cfg.temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=cfg.max_response_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, use_cache=True, **kwargs)
    # nothing generated at all: keep one pad column
    if out.shape[1] == ids.shape[1]:
        out = torch.cat([out, torch.full_like(out[:, :1], tok.pad_token_id)], 1)
    return out, mask.to(device), ids.shape[1]


def first_eos_index(responses, eos_id: int):
    """Index of the first EOS in each response; the last index when there is none."""
    is_eos = responses == eos_id
    last = torch.full_like(is_eos[:, 0], responses.shape[1] - 1, dtype=torch.long)
    idx = torch.where(is_eos.any(1), is_eos.int().argmax(1), last)
    return idx.long(), is_eos.any(1)


def response_mask(responses, eos_id: int):
    """1 up to and including the first EOS, 0 after it (those tokens are not part of the answer)."""
    end, _ = first_eos_index(responses, eos_id)
    return (torch.arange(responses.shape[1], device=responses.device)[None] <= end[:, None]).long()


def decode_responses(tok, responses) -> list[str]:
    """Text of each response, cut at its first EOS."""
    mask = response_mask(responses, tok.eos_token_id)
    return [tok.decode([t for t, m in zip(r.tolist(), mk.tolist()) if m and t != tok.eos_token_id],
                       skip_special_tokens=True) for r, mk in zip(responses, mask)]


def sample_answers(model, tok, prompts: list[str], cfg: Config, greedy: bool = False,
                   batch_size: int = 0, desc: str = "generating"):
    """Answers as text for many prompts, in batches, with a progress bar."""
    out = []
    bs = batch_size or cfg.eval_batch_size
    with stop_cleanly(desc, cfg, () if batch_size else ("eval_batch_size",)):
        for i in progress(range(0, len(prompts), bs), desc=desc, leave=False):
            qr, _, lq = generate(model, tok, prompts[i:i + bs], cfg, greedy=greedy)
            out += decode_responses(tok, qr[:, lq:])
    return out


def logprobs_from_logits(logits, tokens, temperature: float = 1.0):
    """log p(token) under softmax(logits / temperature): the same temperature the tokens were
    sampled with."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, query_responses, attention_mask, context_length: int,
                      temperature: float = 1.0):
    """Per-token log-probs of the response part; logits at position t predict token t+1."""
    # the LM head (vocab-wide: the costliest layer per token here) runs only where a response token
    # is predicted, not on the prompt: logits_to_keep keeps the last positions, from the prompt's
    # last token on
    keep = query_responses.shape[1] - context_length + 1
    logits = model(input_ids=query_responses, attention_mask=attention_mask,
                   logits_to_keep=keep).logits[:, :-1]
    return logprobs_from_logits(logits, query_responses[:, context_length:], temperature), logits


# ============================================================================ SFT


def label_logits(model, ids, mask, labels):
    """(logits, predicts): logits at the positions that predict a labelled token only, as one
    (tokens, vocab) tensor, and the (rows, length - 1) mask of those positions. The LM head
    (vocab-wide: the costliest layer per token here) skips the prompt and the pads, most of each
    row."""
    predicts = labels[:, 1:] != -100            # position t predicts token t+1
    # cut the head's input inside an ordinary forward: through an accelerate (DDP) wrapper, which
    # syncs gradients only that way
    head = unwrap(model).get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: (args[0][:, :-1][predicts],))
    try:
        return model(input_ids=ids, attention_mask=mask).logits, predicts
    finally:
        hook.remove()


def answer_tokens(labels):
    """How many answer tokens (labels that are not -100) the rows of a batch hold, in all."""
    return int((labels[:, 1:] != -100).sum())


def sft_loss(model, batch, device):
    """Mean cross-entropy over response tokens, the label of each position being the next token."""
    ids, mask, labels = (t.to(device) for t in batch)
    logits, predicts = label_logits(model, ids, mask, labels)
    return F.cross_entropy(logits.float(), labels[:, 1:][predicts])


def eval_sft_loss(model, examples, pad_id: int, device, batch_size: int = 64) -> float:
    """Held-out SFT loss, token-weighted."""
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = right_pad_batch(examples[i:i + batch_size], pad_id)
            k = answer_tokens(b[2])
            tot, n = tot + float(sft_loss(model, b, device)) * k, n + k
    return tot / n if n else float("nan")      # no held-out answers: no loss to show, not 0


def sft_step(model, wrapped, tok, opt, scaler, batch: list, cfg: Config, device,
             step: int) -> float:
    """One optimizer step of SFT on a batch of examples, in micro-batches; returns its loss."""
    parts = [right_pad_batch(p, tok.pad_token_id) for p in micro_batches(batch, cfg)]
    n_answer = [answer_tokens(labels) for _, _, labels in parts]
    # the answer tokens of the whole batch, over every process (batch is this process's share);
    # DDP averages the processes' gradients, hence the factor num_processes below
    n_total, world = global_sum(sum(n_answer)), accelerator().num_processes
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for b, n in zip(parts, n_answer):
        # each micro-batch's token-mean weighted by its share of the batch's answer tokens: the
        # parts add up to the global batch's token-mean, and so do their gradients
        part = sft_loss(wrapped, b, device) * (n * world / max(n_total, 1))
        check_finite(part, "SFT loss", step)
        backward(part, scaler)
        loss += float(part.detach())
    optimizer_step([(opt, model)], cfg, scaler, "SFT", step)
    return loss


def train_sft(model, tok, train_rows, eval_rows, cfg: Config, device,
              n_logs: int = 25) -> list[dict]:
    """Supervised fine-tuning on prompt -> response demos; returns the loss history (held-out loss
    on up to 200 eval rows, n_logs times)."""
    check_not_stopped(model)
    check_tokenizer_matches(tok, model, cfg)
    train_rows = fit_rows(tok, demonstrations(train_rows, "SFT training rows"), cfg, ("response",),
                          "SFT training rows")
    eval_rows = fit_rows(tok, demonstrations(eval_rows[:200], "SFT held-out rows"), cfg,
                         ("response",), "SFT held-out rows")
    print(f"SFT: {len(train_rows)} training rows used, {len(eval_rows)} held-out rows for the "
          "loss curve")
    ex, ev = row_examples(tok, train_rows, cfg), row_examples(tok, eval_rows, cfg)
    plan = batches(len(ex), cfg.sft_batch_size, cfg.sft_epochs, cfg.seed)
    log_every = max(1, len(plan) // n_logs)
    opt, sched = make_optimizer(model, cfg.sft_lr, len(plan), weight_decay=0.01)
    # DDP only with N processes
    wrapped, scaler = accelerator().prepare(model), grad_scaler(cfg, device)
    history, run = [], []
    bar = progress(plan, desc="SFT")
    with stop_cleanly("SFT", cfg, ("sft_batch_size",), lambda: kept_model(cfg.path("actor")),
                      model):
        for step, idx in enumerate(bar, 1):
            model.train()
            batch = [ex[i] for i in my_share(idx)]
            run.append(sft_step(model, wrapped, tok, opt, scaler, batch, cfg, device, step))
            sched.step()
            if step % log_every == 0 or step == len(plan):
                rec = {"step": step, "epoch": step * cfg.sft_batch_size / len(ex),
                       "train_loss": sum(run) / len(run),
                       "eval_loss": eval_sft_loss(model, ev, tok.pad_token_id, device)}
                history.append(rec)
                run = []
                bar.set_postfix(train=f"{rec['train_loss']:.3f}", eval=f"{rec['eval_loss']:.3f}",
                                refresh=False)
    model.eval()
    return history


# ============================================================================ reward model


def last_token_index(attention_mask):
    """Index of the last real token of each row, for left or right padding (the EOS of the answer).
    """
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos[None] * attention_mask).argmax(1)


def token_scores(model, input_ids, attention_mask, cache=None):
    """The scalar head applied at every position: per-token values for the PPO critic (fp32)."""
    # the model's own output keeps the last position only, so catch the head's full output during an
    # ordinary forward: the call still goes through an accelerate (DDP) wrapper, which syncs
    # gradients only that way
    seen = []
    hook = unwrap(model).score.register_forward_hook(
        lambda module, inputs, output: seen.append(output))
    try:
        extra = {} if cache is None else {cache_kwarg(unwrap(model)): cache}
        model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    finally:
        hook.remove()
    return seen[-1].squeeze(-1).float()


def at_last_token(per_token, attention_mask):
    """Per-token scores read at the last real token of each row (the EOS, not a pad after it)."""
    rows = torch.arange(len(per_token), device=per_token.device)
    return per_token[rows, last_token_index(attention_mask)]


def normalize_scores(model, raw, clip: bool = True):
    """Raw head outputs on the scale set_reward_scale stored in the model's config: the SFT
    policy's answers to validation prompts have mean 0 and std 1, so a kl_coef means the same for
    every reward model; then clipped to +- reward_clip (the critic's values are not clipped)."""
    c = model.config
    s = (raw - getattr(c, "reward_offset", 0.0)) / getattr(c, "reward_scale", 1.0)
    limit = getattr(c, "reward_clip", 0.0)
    return s.clamp(-limit, limit) if clip and limit else s


def reward_scores(model, input_ids, attention_mask, normalized: bool = True):
    """The reward: the head's output read at the last real token, normalised (normalize_scores)."""
    s = at_last_token(token_scores(model, input_ids, attention_mask), attention_mask)
    return normalize_scores(model, s) if normalized else s


def ensemble_scores(rms: list, input_ids, attention_mask, penalty: float = 0.0):
    """The reward of a list of reward models: the mean of their normalised scores, minus penalty
    times their spread (population std): what only some of them like is worth less."""
    s = torch.stack([reward_scores(m, input_ids, attention_mask) for m in rms])
    return s.mean(0) - penalty * s.std(0, correction=0)


def pairwise_loss(r_chosen, r_rejected):
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), averaged."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def mistake_positions(ids_chosen, ids_rejected, mask_chosen, mask_rejected):
    """1 on the rejected tokens from the first one that departs from the chosen answer up to its
    EOS."""
    differs = (ids_chosen != ids_rejected) & ((mask_chosen + mask_rejected) > 0)
    first = differs.int().argmax(1)
    pos = torch.arange(ids_rejected.shape[1], device=ids_rejected.device)[None]
    return ((pos >= first[:, None]) & (mask_rejected > 0)).float()


def shared_prompt_scores(model, prompt_ids, prompt_mask, ids, mask, owner):
    """Per-token scores of answers that share prompts: each prompt runs through the model once and
    its cached keys/values serve all its answers (InstructGPT's trick: K answers cost one prompt,
    not K)."""
    full_mask = torch.cat([prompt_mask[owner], mask], 1)
    if is_checkpointing(unwrap(model)) and unwrap(model).training:
        # gradient checkpointing returns no cache in training: read each prompt again with each of
        # its answers
        ids = torch.cat([prompt_ids[owner], ids], 1)
        return token_scores(model, ids, full_mask)[:, prompt_ids.shape[1]:]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    cache = output_cache(out)
    cache.batch_select_indices(owner)           # one copy of the prompt's keys/values per answer
    return token_scores(model, ids, full_mask, cache=cache)


def reward_loss(model, prompt_ids, prompt_mask, ids, mask, owner, c, r, prefix_weight: float = 0.0):
    """(loss, chosen scores, rejected scores) of one ranking_batch: the pairwise loss of every
    (chosen, rejected) pair, plus prefix_weight times the same loss on each rejected prefix that
    already holds the mistake."""
    # every answer of a prompt (chosen, its rejected ones) in one pass that reads the prompt once
    per_token = shared_prompt_scores(model, prompt_ids, prompt_mask, ids, mask, owner)
    s = at_last_token(per_token, mask)
    rc, rr = s[c], s[r]                         # one (chosen, rejected) pair per rejected answer
    loss = pairwise_loss(rc, rr)
    if prefix_weight > 0:
        # rank every rejected prefix that already contains the mistake below the chosen answer too:
        # the model is told *where* the error is, not only that the answer is worse overall
        after = mistake_positions(ids[c], ids[r], mask[c], mask[r])
        pre = -torch.nn.functional.logsigmoid(rc[:, None] - per_token[r])
        loss = loss + prefix_weight * masked_mean(pre, after)
    return loss, rc.detach(), rr.detach()


def reward_step(model, wrapped, tok, opt, scaler, batch: list, cfg: Config, device,
                step: int) -> tuple[float, float]:
    """One optimizer step of the reward model on a batch of ranking examples, in micro-batches;
    returns (loss, share of pairs ranked right)."""
    parts = micro_batches(batch, cfg)
    n_pairs = [sum(len(ex[1]) - 1 for ex in p) for p in parts]
    opt.zero_grad(set_to_none=True)
    loss, right = 0.0, 0.0
    for p, n in zip(parts, n_pairs):
        tensors = (t.to(device) for t in ranking_batch(p, tok.pad_token_id))
        part, rc, rr = reward_loss(wrapped, *tensors, cfg.rm_prefix_weight)
        # the micro-batch's share of the batch's pairs: exact for the pairwise loss; the prefix
        # term (a mean over mistake positions) is weighted the same way, which is close but not
        # exact
        part = part * (n / sum(n_pairs))
        check_finite(part, "reward loss", step)
        backward(part, scaler)
        loss, right = loss + float(part.detach()), right + float((rc > rr).sum())
    optimizer_step([(opt, model)], cfg, scaler, "reward", step)
    return loss, right / sum(n_pairs)


def score_texts(model, tok, prompts: list[str], answers: list[str], cfg: Config, device,
                normalized=True, batch_size=128):
    """Reward of each (prompt, answer) pair."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            rows = [{"prompt": p, "x": a}
                    for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
            ids, mask = rm_batch(tok, rows, cfg, "x")
            out += reward_scores(model, ids.to(device), mask.to(device), normalized).tolist()
    return out


def score_pairs(model, tok, rows, cfg: Config, device, batch_size: int = 128):
    """(chosen scores, rejected scores), raw, for many rows, no gradient; each prompt is read once.
    """
    one_pair = dataclasses.replace(cfg, rm_max_rejected=1)
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            examples = ranking_examples(tok, rows[i:i + batch_size], one_pair)
            batch = ranking_batch(examples, tok.pad_token_id)
            prompt_ids, prompt_mask, ids, mask, owner, c, r = (t.to(device) for t in batch)
            per_token = shared_prompt_scores(model, prompt_ids, prompt_mask, ids, mask, owner)
            s = at_last_token(per_token, mask)
            chosen += s[c].tolist()
            rejected += s[r].tolist()
    return chosen, rejected


def train_reward(model, tok, train_rows, eval_rows, cfg: Config, device,
                 n_logs: int = 10) -> list[dict]:
    """Pairwise reward-model training; returns loss/accuracy history (train running, held-out on up
    to 200 pairs)."""
    check_not_stopped(model)
    check_tokenizer_matches(tok, model, cfg)
    pair = ("chosen", "rejected")
    train_rows = fit_rows(tok, with_fields(train_rows, pair, "reward-model training pairs"), cfg,
                          pair, "reward-model training pairs",
                          more_rejected=cfg.rm_max_rejected - 1)
    curve_rows = fit_rows(tok, with_fields(eval_rows[:200], pair, "reward-model held-out pairs"),
                          cfg, pair, "reward-model held-out pairs")
    print(f"reward model: {len(train_rows)} training pairs used, {len(curve_rows)} held-out pairs "
          "for the curve")
    if cfg.rm_freeze_backbone:      # train the head only (cheap, less overfitting, weaker)
        for p in getattr(model, model.base_model_prefix).parameters():
            p.requires_grad_(False)
    examples = ranking_examples(tok, train_rows, cfg)      # tokenise once, not once per epoch
    plan = batches(len(train_rows), cfg.rm_batch_size, cfg.rm_epochs, cfg.seed)
    log_every = max(1, len(plan) // n_logs)
    opt, sched = make_optimizer(model, cfg.rm_lr, len(plan))
    # DDP only with N processes
    wrapped, scaler = accelerator().prepare(model), grad_scaler(cfg, device)
    history, run = [], []
    bar = progress(plan, desc="reward model")
    with stop_cleanly("reward model", cfg, ("rm_batch_size",),
                      lambda: kept_model(cfg.path("critic")), model):
        for step, idx in enumerate(bar, 1):
            model.train()
            batch = [examples[i] for i in my_share(idx)]
            run.append(reward_step(model, wrapped, tok, opt, scaler, batch, cfg, device, step))
            sched.step()
            if step % log_every == 0 or step == len(plan):
                c, r = score_pairs(model, tok, curve_rows, cfg, device)
                rec = {"step": step, "train_loss": sum(x for x, _ in run) / len(run),
                       "train_acc": sum(a for _, a in run) / len(run),
                       "eval_acc": sum(a > b for a, b in zip(c, r)) / len(c) if c else float("nan")}
                history.append(rec)
                run = []
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", eval_acc=f"{rec['eval_acc']:.3f}",
                                refresh=False)
    model.eval()
    return history


def set_reward_scale(model, tok, prompts, policy_answers, cfg: Config, device) -> dict:
    """Normalise: store in the model's config the mean and std of the raw scores of the SFT
    policy's answers (to validation prompts: on its own training prompts an RM scores high), and
    the clip; reward_scores applies them. Returns {reward_offset, reward_scale, reward_clip}."""
    raw = torch.tensor(score_texts(model, tok, prompts, policy_answers, cfg, device,
                                   normalized=False))
    std = float(raw.std()) if len(raw) > 1 else 1.0
    model.config.reward_offset = float(raw.mean())
    model.config.reward_scale = std if std > 1e-6 else 1.0     # all equal: shift only
    model.config.reward_clip = cfg.reward_clip
    return {k: getattr(model.config, k) for k in ("reward_offset", "reward_scale", "reward_clip")}


def ensemble_dirs(cfg: Config) -> list[Path]:
    """Where the reward models live: critic/ (the one the critic starts from, the one 4_test
    reports), then critic_2/ ... critic_N/ for an ensemble (Config.rm_ensemble)."""
    return [cfg.path("critic")] + [cfg.path(f"critic_{k}") for k in range(2, cfg.rm_ensemble + 1)]


def train_more_reward_models(cfg: Config, tok, train_rows, eval_rows, prompts, answers,
                             device) -> list[dict]:
    """The ensemble's other members (Config.rm_ensemble - 1), each trained as the first from the
    seed cfg.seed + 1000 k, put on its own fixed scale with the same SFT answers to validation
    prompts and saved to critic_k/; their last history records."""
    start = cfg.path("base_critic") if cfg.critic_hub else cfg.path("actor")
    out = []
    for k, path in enumerate(ensemble_dirs(cfg)[1:], 2):
        member = dataclasses.replace(cfg, seed=cfg.seed + 1000 * k)
        set_seed(member.seed)           # another head and another batch order: other errors
        model = load_score_model(start, device=device, cfg=cfg)
        history = train_reward(model, tok, train_rows, eval_rows, member, device)
        history[-1].update(set_reward_scale(model, tok, prompts, answers, cfg, device))
        if accelerator().is_main_process:   # every process holds the same weights: one writes
            save_model(unwrap(model), tok, path, {"preset": cfg.preset, "seed": member.seed,
                                                  "history": history})
        accelerator().wait_for_everyone()
        out.append({"path": str(path), **history[-1]})
    return out


# ============================================================================ PPO


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over the masked positions: advantages on a common scale batch to batch."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) / (var + 1e-8).sqrt()
    return (out if shift_mean else out + mean) * mask


def kl_per_token(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL estimate from samples of the policy: k1 = log(p/q) (unbiased, can be < 0),
    k3 = q/p - 1 - log(q/p) (unbiased and always >= 0, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def place_rewards(scores, kl, mask, end_index, kl_coef: float):
    """Per-token rewards: -kl_coef * KL on every answer token, plus the RM score on the EOS token
    only (not on a pad after it, and not spread over the answer)."""
    rewards = -kl_coef * kl * mask
    rewards[torch.arange(len(scores), device=scores.device), end_index] += scores
    return rewards


def gae_advantages(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation, backwards over the answer; nothing flows in after EOS."""
    rewards, values = rewards * mask, values * mask
    last, adv = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv.append(last)
    adv = torch.stack(adv[::-1], 1) * mask
    return adv, (adv + values) * mask


@dataclasses.dataclass
class Rollout:
    """One batch of sampled answers with everything PPO needs, computed once before the updates."""
    query_responses: object      # [B, Lq+Lr] prompt (left-padded) + answer (pads after EOS)
    attention_mask: object       # 1 on prompt tokens and answer tokens up to EOS
    context_length: int
    mask: object                 # [B, Lr] answer tokens up to and including EOS
    end_index: object            # [B] index of the EOS (or last token) in the answer
    logprobs: object             # [B, Lr] policy log-probs at the sampling temperature
    ref_logprobs: object         # [B, Lr] frozen SFT log-probs, same temperature
    values: object               # [B, Lr] critic's value of the state before each answer token
    scores: object               # [B] RM score, minus the penalty when there is no EOS
    has_eos: object
    texts: list
    gold: list                   # execution match of each answer (gold metric, never trained on)


def critic_values(critic, query_responses, attention_mask, context_length: int):
    """[B, Lr] the critic's value of the state before each answer token (the head's output at the
    token before it), on the reward's scale: the critic starts as the RM, so its first values are
    the RM's scores of each prefix, shifted and scaled as the rewards are (not clipped)."""
    per_token = token_scores(critic, query_responses, attention_mask)
    return normalize_scores(critic, per_token[:, context_length - 1:-1], clip=False)


def rollout(actor, ref, critic, rm, tok, rows, cfg: Config, timings: dict | None = None) -> Rollout:
    """Sample answers with the policy, then score them with the reference, critic and RM (a list:
    one reward model, or an ensemble)."""
    t0 = time.time()
    qr, prompt_mask, lq = generate(actor, tok, [r["prompt"] for r in rows], cfg)
    t1 = time.time()
    responses = qr[:, lq:]
    mask = response_mask(responses, tok.eos_token_id)
    end, has_eos = first_eos_index(responses, tok.eos_token_id)
    attn = torch.cat([prompt_mask, mask], 1)
    with torch.no_grad():
        logprobs, _ = response_logprobs(actor, qr, attn, lq, cfg.temperature)
        with reference_model(actor, ref) as r:
            ref_logprobs, _ = response_logprobs(r, qr, attn, lq, cfg.temperature)
        values = critic_values(critic, qr, attn, lq)
        # read at the EOS, where the attention mask ends; the mean of an ensemble's scores
        scores = ensemble_scores(rm, qr, attn, cfg.ensemble_penalty)
    # an answer that never stops is penalised
    scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
    texts = decode_responses(tok, responses)
    gold = [execution_match(r["setup_sql"], r["chosen"], a) if "setup_sql" in r else None
            for r, a in zip(rows, texts)]
    if timings is not None:
        timings["generate"] = timings.get("generate", 0) + t1 - t0
        timings["score"] = timings.get("score", 0) + time.time() - t1
    return Rollout(qr, attn, lq, mask.float(), end, logprobs * mask, ref_logprobs * mask,
                   values * mask, scores, has_eos, texts, gold)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO's clipped surrogate, token-mean: (loss, ratio). The ratio pi/pi_old may move at most
    1 +- cliprange in the direction the advantage rewards; past that the clipped term is the larger
    loss and its gradient is 0."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    return masked_mean(losses, mask), ratio


def ppo_value_loss(values, old_values, returns, mask, cliprange_value: float):
    """The critic's clipped squared error, token-mean, halved: a new value may move at most
    cliprange_value from the rollout's value before its error stops counting for it (the larger of
    the two errors is kept)."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_losses(actor, critic, ro: Rollout, idx, advantages, returns, cfg: Config) -> dict:
    """Policy and value losses of the rollout's answers idx under the actor and critic as they are
    now, with what they are made of: pg_loss, vf_loss, ratio, logprobs, logits, values."""
    m, qr, attn = ro.mask[idx], ro.query_responses[idx], ro.attention_mask[idx]
    logprobs, logits = response_logprobs(actor, qr, attn, ro.context_length, cfg.temperature)
    values = critic_values(critic, qr, attn, ro.context_length)
    # the ratio is taken against the rollout's log-probs (pi_old): they stay fixed over the epochs
    pg_loss, ratio = ppo_policy_loss(logprobs, ro.logprobs[idx], advantages[idx], m, cfg.cliprange)
    vf_loss = ppo_value_loss(values, ro.values[idx], returns[idx], m, cfg.cliprange_value)
    return {"pg_loss": pg_loss, "vf_loss": vf_loss, "ratio": ratio, "logprobs": logprobs,
            "logits": logits, "values": values}


def minibatch_stats(out: dict, ro: Rollout, idx, cfg: Config) -> dict:
    """What to watch while updating, token-means over the answers idx (0-dim tensors): the losses,
    how often the clips act, the approximate KL to pi_old and the policy's entropy."""
    m = ro.mask[idx]
    with torch.no_grad():
        p = torch.softmax(out["logits"].float() / cfg.temperature, -1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        log_ratio = (out["logprobs"] - ro.logprobs[idx]) * m
        per_token = {"clipfrac": ((out["ratio"] - 1).abs() > cfg.cliprange).float(),
                     "vf_clipfrac": ((out["values"] - ro.values[idx]).abs()
                                     > cfg.cliprange_value).float(),
                     "approx_kl": 0.5 * log_ratio ** 2, "entropy": entropy}
        return {"pg_loss": out["pg_loss"], "vf_loss": out["vf_loss"],
                **{k: masked_mean(v, m) for k, v in per_token.items()}}


def ppo_update(actor, critic, opt_actor, opt_critic, ro: Rollout, advantages, returns, cfg: Config,
               scaler=None) -> dict:
    """ppo_epochs passes of clipped PPO over shuffled minibatches of a rollout; mean statistics."""
    stats, first = [], 0.0          # first: max |ratio - 1| on the first minibatch, before any step
    for epoch in range(cfg.ppo_epochs):     # several passes on a rollout: the clip keeps them safe
        perm = torch.randperm(len(ro.scores))
        for start in range(0, len(perm), cfg.ppo_minibatch_size):
            mb = perm[start:start + cfg.ppo_minibatch_size]
            n_tokens = ro.mask[mb].sum()
            opt_actor.zero_grad(set_to_none=True)
            opt_critic.zero_grad(set_to_none=True)
            sums = {}
            for part in micro_batches(mb.tolist(), cfg):    # gradients add up over micro-batches
                part = torch.tensor(part)
                out = ppo_losses(actor, critic, ro, part, advantages, returns, cfg)
                share = ro.mask[part].sum() / n_tokens      # token-means add up to the minibatch's
                loss = (out["pg_loss"] + cfg.vf_coef * out["vf_loss"]) * share
                check_finite(loss, "PPO loss", f"epoch {epoch}")
                backward(loss, scaler)
                with torch.no_grad():
                    if epoch == 0 and start == 0:           # no step yet: pi is pi_old, ratio 1
                        dev = float(((out["ratio"] - 1).abs() * ro.mask[part]).max())
                        first = max(first, dev)
                    for k, v in minibatch_stats(out, ro, part, cfg).items():
                        sums[k] = sums.get(k, 0.0) + float(v * share)
            optimizer_step([(opt_actor, actor), (opt_critic, critic)], cfg, scaler, "PPO",
                           f"epoch {epoch}")
            stats.append(sums)
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    out["ratio_first_minibatch_max_dev"] = first      # max |ratio - 1| before any update: must be 0
    return out


def adaptive_kl(kl_coef: float, kl: float, target: float, batch: int, horizon: int):
    """Ziegler et al. (2019)'s controller: KL above the target raises the coefficient, below it
    lowers it, in proportion to the error (clipped to +-20 %, so one noisy batch moves it little)
    and to the episodes seen (batch / horizon)."""
    err = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + err * batch / horizon)


def anneal_lr(opts: dict, cfg: Config, iteration: int) -> float:
    """Set both PPO learning rates for this iteration (0-based): falling linearly from the
    configured ones to 0 at the end, as in cleanRL's ppo.py, so the last updates are small and the
    final policy stays where the run got it. Returns the actor's."""
    frac = 1.0 - iteration / cfg.ppo_iterations if cfg.ppo_anneal_lr else 1.0
    for name, lr in (("actor", cfg.ppo_lr), ("critic", cfg.ppo_vf_lr)):
        for group in opts[name].param_groups:
            group["lr"] = lr * frac
    return cfg.ppo_lr * frac


def ppo_advantages(ro: Rollout, cfg: Config, kl_coef: float) -> tuple:
    """(kl, rewards, advantages, returns) of a rollout: per-token KL to the reference, rewards (the
    KL penalty on every answer token, the RM score on the EOS), GAE advantages whitened over the
    answer tokens, and the returns the critic learns."""
    kl = kl_per_token(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * ro.mask
    rewards = place_rewards(ro.scores, kl, ro.mask, ro.end_index, kl_coef)
    if cfg.whiten_rewards:  # as TRL: the per-token rewards, KL penalty included, to unit spread
        rewards = masked_whiten(rewards, ro.mask, shift_mean=False)     # over answer tokens
    advantages, returns = gae_advantages(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, ro.mask)          # over real answer tokens only
    return kl, rewards, advantages, returns


def ppo_iteration(models: dict, opts: dict, tok, rows, cfg: Config, kl_coef: float) -> dict:
    """One PPO iteration: rollout, rewards, GAE, whitening, clipped updates; its log record."""
    actor, critic, timings = models["actor"], models["critic"], {}
    # 1. rollout: sample answers; then, without gradients, log-probs of actor and reference,
    #    the critic's values and the RM's scores
    ro = rollout(actor, models["ref"], critic, models["rm"], tok, rows, cfg, timings)
    t0 = time.time()
    # 2. rewards (-kl_coef * KL on every answer token, the RM score on the EOS), then GAE:
    #    advantages (whitened) for the actor, returns for the critic
    kl, rewards, advantages, returns = ppo_advantages(ro, cfg, kl_coef)
    # 3. ppo_epochs passes of clipped minibatch updates on this one rollout, actor and critic
    actor.train(), critic.train()       # dropout is 0: train() changes nothing numerically
    stats = ppo_update(actor, critic, opts["actor"], opts["critic"], ro, advantages, returns, cfg,
                       opts.get("scaler"))
    actor.eval(), critic.eval()
    timings["train"] = time.time() - t0
    # 4. the log record: the proxy (RM score), the gold metric (never trained on), the KL it cost
    gold = [g for g in ro.gold if g is not None] or [math.nan]    # no setup_sql: no verdict, not 0
    return {"rm_score": float(ro.scores.mean()), "gold_acc": sum(gold) / max(len(gold), 1),
            "kl": float(kl.sum(1).mean()), "kl_coef": kl_coef,
            "non_score_reward": float((-kl_coef * kl).sum(1).mean()),
            "length": float(ro.mask.sum(1).mean()), "eos_rate": float(ro.has_eos.float().mean()),
            **stats, **{f"time_{k}": v for k, v in timings.items()}, "sample": ro.texts[0]}


def one_process_only(stage: str) -> None:
    """PPO and GRPO sample their own batches: N processes would each run the whole loop and write
    the same folder, so refuse before anything is loaded or written."""
    n = accelerator().num_processes
    if n > 1:
        raise RuntimeError(f"{stage} runs in one process: its rollouts are not split over "
                           f"processes, and this run was started with {n} (torchrun / accelerate "
                           f"launch). Start it as `python util.py {stage.lower()} ...`; SFT, the "
                           f"reward model and DPO do use N processes.")


def load_ppo_models(cfg: Config, device, state: dict | None = None) -> tuple:
    """(tok, models, opts) as PPO starts: actor and critic from SFT and RM, or from the checkpoint
    `state` describes (optimizer states too); frozen reference (SFT) and RM; AdamW for both."""
    from safetensors.torch import load_file
    out = cfg.path("rlhf")
    tok = load_tokenizer(_require(cfg.path("actor")))
    _require(cfg.path("critic"))
    if cfg.lora_r > 0:                  # LoRA: SFT weights + adapters (the checkpoint's on resume)
        from peft import set_peft_model_state_dict
        actor = add_lora(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
        if state:                       # the adapters' weights, from safetensors like every weight
            adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"),
                                device=str(device))
            set_peft_model_state_dict(actor, adapter)
    else:
        actor = load_causal_lm(out if state else cfg.path("actor"), device=device, cfg=cfg)
    models = {"actor": actor,           # the reference is the SFT model, frozen: the KL leash
              "ref": None if cfg.lora_r > 0 else
              load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False),
              # the critic starts from the RM: it already reads answers and scores them
              "critic": load_score_model(out / "critic" if state else cfg.path("critic"),
                                         device=device, cfg=cfg),
              # the reward model(s), frozen: a list, of one or of Config.rm_ensemble
              "rm": [load_score_model(_require(d, "2_critic.ipynb"), device=device,
                                      cfg=cfg).requires_grad_(False) for d in ensemble_dirs(cfg)]}
    for m in [models["actor"], models["ref"], models["critic"], *models["rm"]]:
        if m is not None:               # ref is None with LoRA (the actor with adapters off)
            check_tokenizer_matches(tok, m, cfg)
    opts = {"actor": make_optimizer(models["actor"], cfg.ppo_lr, 1, warmup=0)[0],
            "critic": make_optimizer(models["critic"], cfg.ppo_vf_lr, 1, warmup=0)[0],
            "scaler": grad_scaler(cfg, device)}
    if state:                           # Adam's moments too, or the first resumed steps differ
        tensors = load_file(str(out / "optimizer.safetensors"))
        for k in ("actor", "critic"):
            optimizer_from_tensors(opts[k], tensors, state["optimizer"][k], k)
    return tok, models, opts


def train_ppo(cfg: Config, device, rows=None, stop_after: int | None = None) -> list[dict]:
    """The PPO loop with periodic atomic checkpoints; a re-run with the same settings resumes."""
    one_process_only("PPO")
    out = cfg.path("rlhf")
    tok = load_tokenizer(_require(cfg.path("actor")))
    _require(cfg.path("critic"))
    if rows is None:
        rows = load_data(cfg, "prompt")
    rows = fit_rows(tok, rows, cfg, (), "PPO prompts")
    state = load_ppo_state(out, cfg, rows)
    tok, models, opts = load_ppo_models(cfg, device, state)
    history, kl_coef, start = [], cfg.kl_coef, 0
    if state:
        history, kl_coef, start = state["history"], state["kl_coef"], state["iteration"]
        print(f"resuming PPO from iteration {start}: same settings and inputs (checkpoint in "
              f"{out}; delete that folder to start over)")
    end = cfg.ppo_iterations if stop_after is None else min(cfg.ppo_iterations, start + stop_after)
    bar = progress(range(start, end), desc="PPO", initial=start, total=cfg.ppo_iterations)
    run = {"settings": ppo_settings(cfg), "inputs": inputs_fingerprint(cfg),
           "prompts": prompts_digest(rows)}
    # on a stop the models in memory are dropped: the checkpoint on disk counts, a re-run resumes it
    with stop_cleanly("PPO", cfg, ("rollout_batch_size", "ppo_minibatch_size"),
                      lambda: kept_checkpoint(out)):
        for it in bar:
            set_seed(cfg.seed * 100_003 + it)       # each iteration is reproducible, resumed or not
            batch = [rows[i] for i in torch.randperm(len(rows))[:cfg.rollout_batch_size].tolist()]
            lr = anneal_lr(opts, cfg, it)
            rec = {"iteration": it + 1, "lr": lr,
                   **ppo_iteration(models, opts, tok, batch, cfg, kl_coef)}
            history.append(rec)
            if cfg.kl_target > 0:           # the next iteration's coefficient, from this KL
                kl_coef = adaptive_kl(kl_coef, rec["kl"], cfg.kl_target, cfg.rollout_batch_size,
                                      cfg.kl_horizon)
            bar.set_postfix(score=f"{rec['rm_score']:.2f}", gold=f"{rec['gold_acc']:.2f}",
                            kl=f"{rec['kl']:.2f}", refresh=False)
            if (it + 1) % cfg.save_every == 0 or it + 1 == end:
                state = {**run, "iteration": it + 1, "kl_coef": kl_coef, "history": history}
                save_ppo_checkpoint(out, models, opts, tok, state)
    return history


# ============================================================================ DPO / GRPO


def answer_logprobs(model, ids, mask, labels):
    """log pi(answer | prompt) of each row: the sum of the log-probs of its labelled (answer)
    tokens."""
    logits, predicts = label_logits(model, ids, mask, labels)
    logp = logprobs_from_logits(logits, labels[:, 1:][predicts])
    row = predicts.nonzero()[:, 0]              # the row each labelled token belongs to
    return torch.zeros(len(ids), dtype=logp.dtype, device=logp.device).index_add(0, row, logp)


def dpo_loss(logp_c, logp_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid"):
    """DPO loss and the implicit rewards beta * log(pi / pi_ref) of chosen and rejected answers."""
    # how much more the policy prefers chosen than the reference does
    h = (logp_c - ref_c) - (logp_r - ref_r)
    if loss_type == "sigmoid":                     # DPO: Bradley-Terry on the implicit rewards
        loss = -F.logsigmoid(beta * h)
    # IPO: regress h to 1/(2 beta) instead of pushing it to infinity
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo_loss {loss_type!r}: use 'sigmoid' or 'ipo'")
    return loss.mean(), beta * (logp_c - ref_c).detach(), beta * (logp_r - ref_r).detach()


def chosen_nll(logp_c, labels_c, n_tokens: int | None = None):
    """RPO's SFT term: the chosen answers' negative log-likelihood, a mean over their tokens: over
    n_tokens, the whole batch's chosen tokens when this is one micro-batch of it."""
    # DPO alone may lower the chosen answer's probability too (only the gap to the rejected one
    # counts, "likelihood displacement"); this term holds it up. One token mean over the batch, as
    # in SFT and the RPO paper: every token weighs the same, whatever its answer's length
    return -logp_c.sum() / max(n_tokens or answer_tokens(labels_c), 1)


def dpo_pair_stats(model, ref, tok, rows, cfg: Config, device, batch_size: int = 64) -> dict:
    """On pairs, no gradient: implicit-reward accuracy and margin, and the mean log-ratio
    log pi(y) - log pi_ref(y) (nats, summed over the answer) of the chosen and rejected answers."""
    if not rows:                                # no pairs: nothing measured (not 0)
        return dict.fromkeys(("reward_acc", "margin", "chosen_logratio", "rejected_logratio"),
                             float("nan"))
    acc, margin, chosen, rejected = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            ids, mask, labels = (t.to(device) for t in pair_batch(tok, part, cfg))
            lp = answer_logprobs(model, ids, mask, labels)
            with reference_model(model, ref) as r:
                rlp = answer_logprobs(r, ids, mask, labels)
            k = len(part)
            c, r = lp[:k] - rlp[:k], lp[k:] - rlp[k:]   # log pi - log pi_ref, chosen and rejected
            # the implicit rewards are beta * c and beta * r: right when the chosen one is higher
            acc += (c > r).tolist()
            margin += (cfg.dpo_beta * (c - r)).tolist()
            # a margin can grow while BOTH answers lose probability ("likelihood displacement"):
            # only these two show it
            chosen += c.tolist()
            rejected += r.tolist()
    n = len(acc)
    return {"reward_acc": sum(acc) / n, "margin": sum(margin) / n,
            "chosen_logratio": sum(chosen) / n, "rejected_logratio": sum(rejected) / n}


def dpo_step(model, wrapped, ref, tok, opt, scaler, rows: list[dict], cfg: Config, device,
             step: int) -> list[float]:
    """One optimizer step of DPO on a batch of pairs, in micro-batches; returns [loss, reward
    accuracy, margin, chosen reward, rejected reward]."""
    opt.zero_grad(set_to_none=True)
    loss_sum, pair_stats = 0.0, []
    parts = [(part, pair_batch(tok, part, cfg)) for part in micro_batches(rows, cfg)]
    # the batch's chosen answer tokens: the SFT term is one token mean over all of them
    n_chosen = sum(answer_tokens(b[2][:len(part)]) for part, b in parts)
    for part, batch in parts:
        ids, mask, labels = (t.to(device) for t in batch)
        with reference_model(model, ref) as r:
            ref_lp = answer_logprobs(r, ids, mask, labels)
        lp = answer_logprobs(wrapped, ids, mask, labels)
        k = len(part)
        loss, rc, rr = dpo_loss(lp[:k], lp[k:], ref_lp[:k], ref_lp[k:], cfg.dpo_beta,
                                cfg.dpo_loss)
        loss = loss * (k / len(rows))           # the micro-batch's share of the batch's pairs
        if cfg.dpo_sft_weight > 0:              # RPO: DPO plus the SFT loss on the chosen answers
            loss = loss + cfg.dpo_sft_weight * chosen_nll(lp[:k], labels[:k], n_chosen)
        check_finite(loss, "DPO loss", step)
        backward(loss, scaler)
        loss_sum += float(loss.detach())
        pair_stats.append(torch.stack([(rc > rr).float(), rc - rr, rc, rr]))
    optimizer_step([(opt, model)], cfg, scaler, "DPO", step)
    return [loss_sum, *torch.cat(pair_stats, 1).mean(1).tolist()]


def dpo_sample_stats(model, ref, tok, rows, cfg: Config) -> dict:
    """On prompts, no gradient: execution accuracy of one sampled answer each (the config's
    temperature) and the KL to the reference, estimated on those samples (k1, summed)."""
    if not rows:
        return {"exec_acc_sampled": float("nan"), "kl_to_sft": float("nan")}
    model.eval()
    acc, kl = [], []
    for i in range(0, len(rows), cfg.eval_batch_size):
        part = rows[i:i + cfg.eval_batch_size]
        qr, prompt_mask, lq = generate(model, tok, [r["prompt"] for r in part], cfg)
        mask = response_mask(qr[:, lq:], tok.eos_token_id)
        attn = torch.cat([prompt_mask, mask], 1)
        with torch.no_grad():
            lp, _ = response_logprobs(model, qr, attn, lq, cfg.temperature)
            with reference_model(model, ref) as r:
                rlp, _ = response_logprobs(r, qr, attn, lq, cfg.temperature)
        kl += ((lp - rlp) * mask).sum(1).tolist()
        # DPO never sees its own answers: only running them shows what it now writes
        acc += exec_rewards(part, decode_responses(tok, qr[:, lq:]))
    return {"exec_acc_sampled": sum(acc) / len(acc), "kl_to_sft": sum(kl) / len(kl)}


def train_dpo(model, ref, tok, train_rows, val_rows, cfg: Config, device, n_logs: int = 20,
              n_sampled: int = 64, sample_every: int = 4) -> list[dict]:
    """Direct preference optimisation on (prompt, chosen, rejected) against a frozen reference
    (ref=None: the model's own weights with LoRA adapters off); returns the history: on up to 200
    validation pairs at each of n_logs points, and on n_sampled validation prompts every
    sample_every points, before training and at the end (n_sampled=0: never)."""
    check_not_stopped(model)
    check_tokenizer_matches(tok, model, cfg)
    pair = ("chosen", "rejected")
    train_rows = fit_rows(tok, with_fields(train_rows, pair, "DPO training pairs"), cfg, pair,
                          "DPO training pairs")
    val_rows = with_fields(val_rows[:200], pair, "DPO validation pairs")
    # prompts with the tables and gold SQL to run the sampled answers on
    judged = [r for r in val_rows if "setup_sql" in r][:n_sampled]
    print(f"DPO: {len(train_rows)} training pairs used; {len(val_rows)} validation pairs and "
          f"{len(judged)} validation prompts for the curves")
    plan = batches(len(train_rows), cfg.dpo_batch_size, cfg.dpo_epochs, cfg.seed)
    log_every = max(1, len(plan) // n_logs)

    def val_stats(step: int) -> dict:
        """The curves' validation figures (a point every log_every steps)."""
        model.eval()                            # no dropout in what is measured
        out = {f"val_{k}": v
               for k, v in dpo_pair_stats(model, ref, tok, val_rows, cfg, device).items()}
        if judged and (step // log_every % sample_every == 0 or step == len(plan)):
            out.update({f"val_{k}": v
                        for k, v in dpo_sample_stats(model, ref, tok, judged, cfg).items()})
        return out
    history = [{"step": 0, "epoch": 0.0, **val_stats(0)}]     # the start: the SFT model itself
    opt, sched = make_optimizer(model, cfg.dpo_lr, len(plan))
    # DDP only with N processes
    wrapped, scaler = accelerator().prepare(model), grad_scaler(cfg, device)
    run = []
    bar = progress(plan, desc="DPO")
    with stop_cleanly("DPO", cfg, ("dpo_batch_size",), lambda: kept_model(cfg.path("dpo")), model):
        for step, idx in enumerate(bar, 1):
            model.train()
            rows = [train_rows[i] for i in my_share(idx)]
            run.append(dpo_step(model, wrapped, ref, tok, opt, scaler, rows, cfg, device, step))
            sched.step()
            if step % log_every == 0 or step == len(plan):
                mean = [sum(col) / len(run) for col in zip(*run)]
                rec = {"step": step, "epoch": step * cfg.dpo_batch_size / len(train_rows),
                       "train_loss": mean[0], "train_reward_acc": mean[1], "train_margin": mean[2],
                       "chosen_reward": mean[3], "rejected_reward": mean[4], **val_stats(step)}
                history.append(rec)
                run = []
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}",
                                acc=f"{rec['val_reward_acc']:.3f}", refresh=False)
    model.eval()
    return history


def exec_rewards(rows, texts) -> list[float]:
    """Verifiable reward: 1 when the answer's result in sqlite equals the gold query's result, else
    0."""
    # a row without setup_sql gets 0: the same for its whole group, so GRPO takes no signal from it
    return [float("setup_sql" in r and execution_match(r["setup_sql"], r["chosen"], t))
            for r, t in zip(rows, texts)]


def format_rewards(rows, texts, has_eos) -> list[float]:
    """Format reward: 1 for a single SELECT statement that sqlite runs without error and that ends
    with EOS."""
    # this is GRPO's missing-EOS penalty: an answer cut at max_response_tokens loses the format
    # reward (grpo_format_weight, 0.2 beside an execution reward of 0 or 1), where PPO subtracts
    # missing_eos_penalty (1.0, one std of the RM's scores) from the score
    out = []
    for r, t, eos in zip(rows, texts, has_eos):
        ok = (bool(eos) and "setup_sql" in r and t.strip().upper().startswith("SELECT")
              and ";" not in t)
        out.append(float(ok and execute_sql(r["setup_sql"], t) is not None))
    return out


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """GRPO's advantage: each answer's reward minus its group's mean, over the group's std (a group
    = the answers to one prompt); a group whose answers all score the same gives 0, i.e. no signal.
    """
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cliprange: float,
              kl_coef: float):
    """(loss, per-token KL, ratio) of GRPO: PPO's clipped surrogate with one advantage per answer,
    plus kl_coef times the k3 KL to the reference inside the loss; a mean over each answer's tokens,
    then answers."""
    # the log-probs are masked before anything is exponentiated: after the EOS they score pads, and
    # exp(ref - policy) of such a position can overflow to inf, which a mask applied afterwards
    # turns into NaN
    logprobs, old_logprobs, ref_logprobs = logprobs * mask, old_logprobs * mask, ref_logprobs * mask
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]                     # one advantage for every token of an answer
    pg = -torch.min(ratio * a, ratio.clamp(1 - cliprange, 1 + cliprange) * a)
    # k3 >= 0: a penalty in the loss, not the reward
    kl = kl_per_token(logprobs, ref_logprobs, "k3")
    loss = masked_mean(pg + kl_coef * kl, mask, dim=1).mean()
    return loss, kl, ratio


def grpo_samples(actor, ref, rm, tok, group: list[dict], cfg: Config) -> dict:
    """One answer sampled per row of `group`, its rewards (execution, format, RM if weighted) and,
    without gradients, its log-probs under the policy and the reference."""
    qr, prompt_mask, lq = generate(actor, tok, [r["prompt"] for r in group], cfg)
    responses = qr[:, lq:]
    mask = response_mask(responses, tok.eos_token_id).float()
    _, has_eos = first_eos_index(responses, tok.eos_token_id)
    attn = torch.cat([prompt_mask, mask.long()], 1)
    texts = decode_responses(tok, responses)
    acc = exec_rewards(group, texts)
    fmt = format_rewards(group, texts, has_eos.tolist())
    rewards = torch.tensor(acc) + cfg.grpo_format_weight * torch.tensor(fmt)
    with torch.no_grad():
        old_logprobs, _ = response_logprobs(actor, qr, attn, lq, cfg.temperature)
        with reference_model(actor, ref) as r:
            ref_logprobs, _ = response_logprobs(r, qr, attn, lq, cfg.temperature)
        if rm is not None and cfg.grpo_rm_weight > 0:
            rewards = rewards + cfg.grpo_rm_weight * reward_scores(rm, qr, attn).cpu()
    return {"qr": qr, "attn": attn, "lq": lq, "mask": mask, "has_eos": has_eos, "texts": texts,
            "acc": acc, "fmt": fmt, "rewards": rewards, "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs}


def grpo_update(actor, opt, s: dict, adv, cfg: Config, scaler=None) -> dict:
    """grpo_epochs passes of clipped updates over shuffled minibatches of the samples `s`; the mean
    loss, KL and clip fraction."""
    stats = {k: [] for k in ("loss", "kl", "clipfrac")}
    actor.train()
    for epoch in range(cfg.grpo_epochs):
        perm = torch.randperm(len(s["qr"]))
        for start in range(0, len(s["qr"]), cfg.grpo_minibatch_size):
            mb = perm[start:start + cfg.grpo_minibatch_size]
            opt.zero_grad(set_to_none=True)
            sums = dict.fromkeys(stats, 0.0)
            for part in micro_batches(mb.tolist(), cfg):
                part = torch.tensor(part)
                m = s["mask"][part]
                logprobs, _ = response_logprobs(actor, s["qr"][part], s["attn"][part], s["lq"],
                                                cfg.temperature)
                loss, kl, ratio = grpo_loss(logprobs, s["old_logprobs"][part],
                                            s["ref_logprobs"][part], adv[part], m, cfg.cliprange,
                                            cfg.grpo_kl_coef)
                # answer-means over micro-batches add up to the minibatch's
                share = len(part) / len(mb)
                check_finite(loss, "GRPO loss", epoch)
                backward(loss * share, scaler)
                clipped = ((ratio.detach() - 1).abs() > cfg.cliprange).float()
                sums["loss"] += float(loss.detach()) * share
                sums["kl"] += float(masked_mean(kl.detach(), m, dim=1).mean()) * share
                sums["clipfrac"] += float(masked_mean(clipped, m)) * share
            optimizer_step([(opt, actor)], cfg, scaler, "GRPO", f"epoch {epoch}")
            for k, v in sums.items():
                stats[k].append(v)
    actor.eval()
    return {k: sum(v) / len(v) for k, v in stats.items()}


def grpo_iteration(actor, ref, rm, opt, tok, rows, cfg: Config, scaler=None) -> dict:
    """One GRPO iteration: sample a group per prompt, reward, group-relative advantages, clipped
    updates with a k3 KL penalty to the reference inside the loss; returns its log record."""
    t0 = time.time()
    # each prompt repeated G times, adjacent
    group = [r for r in rows for _ in range(cfg.grpo_group_size)]
    s = grpo_samples(actor, ref, rm, tok, group, cfg)
    rewards, mask, has_eos = s["rewards"], s["mask"], s["has_eos"]
    adv = group_advantages(rewards, cfg.grpo_group_size).to(s["qr"].device)
    t1 = time.time()
    stats = grpo_update(actor, opt, s, adv, cfg, scaler)
    zero_std = float((rewards.view(-1, cfg.grpo_group_size).std(1) == 0).float().mean())
    checked = [i for i, r in enumerate(group) if "setup_sql" in r]    # where gold can be judged
    acc = [s["acc"][i] for i in checked] or [math.nan]
    fmt = [s["fmt"][i] for i in checked] or [math.nan]
    return {"reward": float(rewards.mean()), "gold_acc": sum(acc) / len(acc),
            "format_rate": sum(fmt) / len(fmt), "groups_without_signal": zero_std,
            "length": float(mask.sum(1).mean()), "eos_rate": float(has_eos.float().mean()),
            **stats, "time_generate_score": t1 - t0, "time_train": time.time() - t1,
            "sample": s["texts"][0]}


def train_grpo(cfg: Config, device, rows=None) -> tuple[object, list[dict]]:
    """The GRPO loop from the SFT actor; returns (trained actor, history). Saving is the notebook's
    job."""
    one_process_only("GRPO")
    rows = rows if rows is not None else load_data(cfg, "prompt")
    check_grpo_reward(rows, cfg)                # before anything is loaded: no reward, no learning
    tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
    rows = fit_rows(tok, rows, cfg, (), "GRPO prompts")     # counts (prints) the prompts to be cut
    print(f"GRPO: {len(rows)} prompts, {cfg.grpo_prompts} per iteration")
    actor = add_lora(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
    ref = (None if cfg.lora_r > 0 else
           load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False))
    rm = (load_score_model(_require(cfg.path("critic"), "2_critic.ipynb"), device=device, cfg=cfg)
          if cfg.grpo_rm_weight > 0 else None)
    opt, _ = make_optimizer(actor, cfg.grpo_lr, 1, warmup=0)
    scaler = grad_scaler(cfg, device)
    history = []
    bar = progress(range(cfg.grpo_iterations), desc="GRPO")
    with stop_cleanly("GRPO", cfg, ("grpo_prompts", "grpo_group_size"),
                      lambda: kept_model(cfg.path("grpo")), actor):
        for it in bar:
            set_seed(cfg.seed * 100_003 + it)
            batch = [rows[i] for i in torch.randperm(len(rows))[:cfg.grpo_prompts].tolist()]
            rec = {"iteration": it + 1,
                   **grpo_iteration(actor, ref, rm, opt, tok, batch, cfg, scaler)}
            history.append(rec)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", gold=f"{rec['gold_acc']:.2f}",
                            kl=f"{rec['kl']:.3f}", refresh=False)
    return actor, history


# ============================================================================ evaluation
# measured without gradients: what 4_test reports for every model, and the CLI's report


def evaluate_batch(model, tok, part: list[dict], greedy: list[str], cfg: Config, rm=None,
                   ref=None) -> list[dict]:
    """One sampled answer per row of `part` beside its greedy one: per-row verdicts (None without
    setup_sql), RM score, KL to the reference, length, EOS."""
    qr, pmask, lq = generate(model, tok, [r["prompt"] for r in part], cfg)
    resp = qr[:, lq:]
    mask = response_mask(resp, tok.eos_token_id)
    _, has_eos = first_eos_index(resp, tok.eos_token_id)
    attn = torch.cat([pmask, mask], 1)
    with torch.no_grad():
        kl = torch.zeros(len(part))
        # KL(policy || ref) estimated on the policy's own samples (k1, summed)
        if ref is not None:
            lp, _ = response_logprobs(model, qr, attn, lq, cfg.temperature)
            rlp, _ = response_logprobs(ref, qr, attn, lq, cfg.temperature)
            kl = ((lp - rlp) * mask).sum(1).cpu()
        score = (reward_scores(rm, qr, attn).cpu() if rm is not None
                 else torch.full((len(part),), float("nan")))
    out = []
    for j, (r, text) in enumerate(zip(part, decode_responses(tok, resp))):
        # the gold metric needs the row's tables and gold SQL: else None, not a guess
        judged = "setup_sql" in r and isinstance(r.get("chosen"), str)

        def ok(answer):
            return execution_match(r["setup_sql"], r["chosen"], answer) if judged else None
        out.append({"prompt": r["prompt"], "family": r.get("family", "?"),
                    "gold": (r.get("chosen") or "").strip(),
                    "greedy": greedy[j].strip(), "sampled": text.strip(),
                    "greedy_ok": ok(greedy[j]), "sampled_ok": ok(text),
                    "rm_score": float(score[j]), "kl": float(kl[j]), "length": int(mask[j].sum()),
                    "eos": bool(has_eos[j])})
    return out


def evaluate_policy(model, tok, rows, cfg: Config, rm=None, ref=None,
                    desc: str = "eval") -> tuple[dict, list[dict]]:
    """Execution accuracy greedy and sampled (rows with setup_sql), RM score, KL, length, EOS."""
    prompts = [r["prompt"] for r in rows]
    greedy = sample_answers(model, tok, prompts, cfg, greedy=True, desc=f"{desc} greedy")
    per_row = []
    bs = cfg.eval_batch_size
    with stop_cleanly(desc, cfg, ("eval_batch_size",)):
        for i in progress(range(0, len(rows), bs), desc=f"{desc} sampled", leave=False):
            per_row += evaluate_batch(model, tok, rows[i:i + bs], greedy[i:i + bs], cfg, rm, ref)
    n = len(per_row)
    judged = [r for r in per_row if r["greedy_ok"] is not None]
    summary = {}
    if judged:
        summary["exec_acc_greedy"] = sum(r["greedy_ok"] for r in judged) / len(judged)
        summary["exec_acc_sampled"] = sum(r["sampled_ok"] for r in judged) / len(judged)
    summary.update({"rm_score": sum(r["rm_score"] for r in per_row) / n,
                    "kl_to_sft": sum(r["kl"] for r in per_row) / n,
                    "length": sum(r["length"] for r in per_row) / n,
                    "eos_rate": sum(r["eos"] for r in per_row) / n,
                    "n_prompts": n, "temperature": cfg.temperature})
    if len(judged) < n:
        summary["n_with_setup_sql"] = len(judged)
        print(f"{desc}: execution accuracy on {len(judged)} of {n} prompts (others lack "
              "setup_sql)")
    return summary, per_row


def no_gold_note(judged: int, n: int) -> str:
    """What the evaluation leaves out, and why, when rows have no setup_sql."""
    what = "not measured" if judged == 0 else f"measured on {judged} of {n} prompts only"
    return (f"execution accuracy {what}: it needs 'setup_sql' (the tables the SQL runs on) and "
            "'chosen' (the gold SQL) in the evaluation rows. Measured without them: RM score, KL "
            "to SFT, win rate vs SFT (by the RM), length, EOS rate.")


def per_family_accuracy(per_row: list[dict]) -> dict:
    """Sampled and greedy execution accuracy per question family (of the rows with a verdict)."""
    import pandas as pd
    judged = pd.DataFrame([r for r in per_row if r["greedy_ok"] is not None])
    if judged.empty:
        return {}
    return judged.groupby("family")[["greedy_ok", "sampled_ok"]].mean().round(3).to_dict("index")


def win_rate(scores_a: list[float], scores_b: list[float]) -> float:
    """Share of prompts where a's answer scores higher than b's by the RM (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]
    return sum(wins) / max(len(wins), 1)


# the models the report looks for: its name -> the folder under out_dir
REPORT_MODELS = {"SFT": "actor", "RLHF (PPO)": "rlhf", "DPO": "dpo", "GRPO": "grpo"}


def build_report(cfg: Config, device) -> tuple[dict, dict]:
    """(report, per-row results) of each model present, as 4_test does; writes report.json."""
    tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
    evalset = load_data(cfg, "eval")
    leakage, seen = {}, set()
    for kind in ("sft", "pref", "prompt"):  # each training source once (by default one file)
        if data_source(cfg, kind) not in seen:
            seen.add(data_source(cfg, kind))
            leakage[kind] = report_leakage(load_data(cfg, kind), evalset,
                                                DATA_SOURCES[kind][3])
    has_rm = (cfg.path("critic") / "config.json").exists()
    rm = load_score_model(cfg.path("critic"), device=device, cfg=cfg) if has_rm else None
    ref = load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
    present = {k: d for k, d in REPORT_MODELS.items() if (cfg.path(d) / "config.json").exists()}
    print("models found:", list(present))
    results, rows = {}, {}
    for name, d in present.items():
        set_seed(cfg.seed)
        model = load_causal_lm(cfg.path(d), device=device, cfg=cfg)
        results[name], rows[name] = evaluate_policy(model, tok, evalset, cfg, rm=rm, ref=ref,
                                                         desc=name)
        del model
        free_memory()                  # one evaluated model on the GPU at a time
    for name in results:
        if rm is not None:
            results[name]["win_rate_vs_sft"] = win_rate([r["rm_score"] for r in rows[name]],
                                                             [r["rm_score"] for r in rows["SFT"]])
    not_measured = {}
    judged = sum(r["greedy_ok"] is not None for r in rows["SFT"])
    if judged < len(evalset):
        not_measured["exec_acc"] = no_gold_note(judged, len(evalset))
    if rm is None:
        not_measured["rm_score"] = ("no reward model in critic/ (run 2_critic.ipynb or `python "
                                    "util.py rm`), so no RM score and no win rate")
    report = {"preset": cfg.preset, "n_eval_prompts": len(evalset), "temperature": cfg.temperature,
              "models": results,
              "per_family": {n: per_family_accuracy(r) for n, r in rows.items()},
              "data": {"eval": data_source(cfg, "eval"), "leaked_eval_prompts": leakage},
              "not_measured": not_measured}
    write_json(report, cfg.path("report.json"))
    return report, rows


def print_report(report: dict) -> None:
    """The report's table of models and metrics, then what it left out and why."""
    import pandas as pd
    table = pd.DataFrame(report["models"]).T
    hidden = ["n_prompts", "temperature"]
    if "exec_acc" in report["not_measured"]:    # the note below says it: no column of zeros
        hidden.append("n_with_setup_sql")
    table = table.drop(columns=hidden, errors="ignore")
    print(f"{report['n_eval_prompts']} evaluation prompts ({report['data']['eval']}), "
          f"T={report['temperature']}")
    print(table.round(3).to_string())
    for metric, why in report["not_measured"].items():
        print(f"not shown, {metric}: {why}")


# ============================================================================ one stage
# what `python util.py sft|rm|ppo|dpo|grpo` runs: a stage trained from the models before it,
# saved, and logged in logs/


# the folder under out_dir each stage writes
STAGES = {"sft": "actor", "rm": "critic", "ppo": "rlhf", "dpo": "dpo", "grpo": "grpo"}
# the kind of data (DATA_SOURCES) each stage trains on
STAGE_DATA = {"sft": "sft", "rm": "pref", "ppo": "prompt", "dpo": "pref", "grpo": "prompt"}


def train_stage(stage: str, cfg: Config, device, train, evalset) -> tuple:
    """(model, tokenizer, history) of one stage trained from the models before it; PPO saves its own
    checkpoints and returns (None, None, history)."""
    if stage == "ppo":
        return None, None, train_ppo(cfg, device, train)
    if stage == "sft":
        if not (cfg.path("base_actor") / "config.json").exists() and accelerator().is_main_process:
            prepare_base_models(cfg)
        accelerator().wait_for_everyone()
        tok = load_tokenizer(cfg.path("base_actor"))
        model = load_causal_lm(cfg.path("base_actor"), "0_download.ipynb", device, cfg)
        return model, tok, train_sft(model, tok, train, evalset, cfg, device)
    tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
    if stage == "rm":
        model = load_score_model(cfg.path("base_critic") if cfg.critic_hub else cfg.path("actor"),
                                 "1_actor.ipynb", device, cfg)
        history = train_reward(model, tok, train, evalset, cfg, device)
        prompts = validation_prompts(cfg)
        sft = load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
        answers = sample_answers(sft, tok, prompts, cfg)
        history[-1].update(set_reward_scale(model, tok, prompts, answers, cfg, device))
        if cfg.rm_ensemble > 1:             # critic_2/ ... critic_N/
            history[-1]["ensemble"] = train_more_reward_models(cfg, tok, train, evalset, prompts,
                                                               answers, device)
        return model, tok, history
    if stage == "dpo":
        model = add_lora(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
        ref = (None if cfg.lora_r else
               load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False))
        # its curves on the validation split: eval.json is the test set, never a training signal
        val = load_data(cfg, "pref", split="val")
        return model, tok, train_dpo(model, ref, tok, train, val, cfg, device)
    model, history = train_grpo(cfg, device, train)
    return model, tok, history


def run_stage(stage: str, cfg: Config) -> dict:
    """One stage without its notebook: train, save, leave its record in logs/; its last metrics."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {sorted(STAGES)}")
    check_config(cfg, PRESETS)              # again: a field may have been set after it was made
    device = accelerator().device
    set_seed(cfg.seed)
    kind = STAGE_DATA[stage]
    train = load_data(cfg, kind)
    evalset = load_data(cfg, "eval")
    data = {kind: train.info, "eval": evalset.info,
            "leaked_eval_prompts": report_leakage(train, evalset, DATA_SOURCES[kind][3])}
    t0 = time.time()
    model, tok, history = train_stage(stage, cfg, device, train, evalset)
    seconds = time.time() - t0
    if accelerator().is_main_process:       # every process holds the same weights: one writes them
        if stage != "ppo":                  # PPO wrote its checkpoint (and metrics.json) as it went
            save_model(unwrap(model), tok, cfg.path(STAGES[stage]),
                       {"preset": cfg.preset, "seconds": seconds, "history": history})
        # the exact settings of this run, beside its outputs
        write_json(dataclasses.asdict(cfg), cfg.path(STAGES[stage], "run_config.json"))
        write_run_record(cfg, stage, history, {**data, "seconds": seconds})
    accelerator().wait_for_everyone()
    return {"seconds": seconds, **{k: v for k, v in history[-1].items() if k != "sample"}}


# ============================================================================ command line


def main(argv=None) -> int:
    """`python util.py make-dataset | make-tokenizer | stats`, a stage without its notebook or the
    report: `python util.py sft|rm|ppo|dpo|grpo|report [--config file.json] [--preset NAME]`;
    `python util.py pack [FILE]` / `unpack FILE`: the SFT and reward models in one file, for a room
    that starts at 3_rlhf."""
    try:
        return run(argv)
    # a user's mistake (a missing file or model, a bad config field or data row) is one clear
    # line and exit status 2, not a traceback; RLHF_DEBUG=1 shows the traceback
    except (FileNotFoundError, FileExistsError, DataError, ConfigError, ValueError) as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        print(f"tiny-rlhf: error: {e}\n(RLHF_DEBUG=1 shows where it was raised)", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    """main() without its handling of a user's mistakes."""
    ap = argparse.ArgumentParser(prog="python util.py", description=main.__doc__)
    ap.add_argument("command", choices=["make-dataset", "make-tokenizer", "stats", *STAGES,
                                        "report", "pack", "unpack"])
    ap.add_argument("file", nargs="?", help="pack: the archive to write (default "
                    "<out_dir>/tiny-rlhf-<preset>-models.tar.gz); unpack: the archive to read")
    ap.add_argument("--config", help="JSON file of Config fields (see util.Config), e.g. "
                    "{\"preset\": \"smoke\", \"lora_r\": 8}")
    ap.add_argument("--preset", help="preset to start from (overrides the file's); default "
                    "RLHF_PRESET or auto")
    args = ap.parse_args(argv)
    if args.command in STAGES:
        cfg = load_config(args.config, args.preset)
        summary = run_stage(args.command, cfg)
        if accelerator().is_main_process:
            rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
            resolved = cfg.path(STAGES[args.command], "run_config.json")
            print(json.dumps(_json_safe({"stage": args.command, "config": str(resolved),
                                              "processes": accelerator().num_processes,
                                              "logs": str(cfg.path("logs")), **rounded})))
    elif args.command == "report":
        cfg = load_config(args.config, args.preset)
        report, _ = build_report(cfg, accelerator().device)
        print_report(report)
        print(f"wrote {cfg.path('report.json')}")
    elif args.command == "pack":        # a finished SFT and reward model for a room (rlhf.archive)
        cfg = load_config(args.config, args.preset)
        path = pack_models(cfg, args.file)
        print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB); hand it out, then: python "
              f"util.py unpack {path.name}")
    elif args.command == "unpack":
        if not args.file:
            raise ValueError("unpack needs the archive: python util.py unpack FILE")
        cfg = load_config(args.config, args.preset)
        folders = unpack_models(args.file, cfg)
        print(f"unpacked {', '.join(folders)} into {cfg.out_dir}: start at 3_rlhf.ipynb")
    elif args.command == "make-dataset":
        print(write_dataset())
    elif args.command == "make-tokenizer":
        tok = train_tokenizer(load_rows(ROOT / "dataset" / "train.json"))
        print(f"tokenizer with {len(tok)} tokens written to {ROOT / 'tokenizer'}")
    else:
        for split in ("train", "eval"):
            rows = load_rows(ROOT / "dataset" / f"{split}.json")
            print(split, json.dumps(dataset_stats(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
