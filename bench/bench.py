"""`make bench`: tiny-rlhf side by side with TRL on the same machine, the same work, the same models and data.

    python bench/bench.py              # the full benchmark (tiny preset): bench/results.json, results.md, results.png
    python bench/bench.py --quick      # a smoke version (smoke preset, 2 rounds): checks the harness end to end

Every measurement runs in a fresh subprocess (`python bench/bench.py worker TASK SIDE ...`) of the pair's virtual
environment, which holds both our util.py's dependencies and TRL; our side and TRL's side are interleaved round by
round, and the figures are medians over rounds. Starting points (base model, SFT actor, reward model, the SFT
policy's held-out accuracy) are trained once by `worker setup` and cached under bench/out/start/.

Floors (`worker sft|rm|ppo floor`, in the same rounds): the same arithmetic as a bare PyTorch loop, so that
TRL's time / floor bounds the speed-up any implementation of that arithmetic could reach.

Each pair (see PAIRS below) runs both its sides in one environment: bench/.venv (trl 1.12, the last with
PPOTrainer) for SFT, RM and PPO; bench/.venv116 (trl 1.16) for DPO and GRPO. A pair whose util.py function does
not exist is listed in results.json under "skipped" with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

# ============================================================================ what is measured

# The slice of work each side does per round. Identical for both sides; rates are reported per unit of work.
SPECS = {
    "full": dict(preset="tiny", rounds=3, sft_epochs=0.5, rm_epochs=0.5, ppo_batches=12, dpo_epochs=0.5,
                 grpo_batches=12, n_eval=600, gen_repeats=12, out="out", results="results"),
    "quick": dict(preset="smoke", rounds=2, sft_epochs=1.0, rm_epochs=1.0, ppo_batches=2, dpo_epochs=1.0,
                  grpo_batches=2, n_eval=16, gen_repeats=2, out="out-quick", results="results-quick"),
}


@dataclasses.dataclass
class Pair:
    """One comparison: our function against a TRL trainer, both run by `worker <name> ours|trl`."""
    name: str
    ours: str                  # what runs on our side
    trl: str                   # the TRL trainer it is compared with
    unit: str                  # unit of work the time is reported per
    needs: str = ""            # util.py function that must exist (hooks for stages not written yet)
    venv: str = ".venv"        # bench/<venv>/bin/python runs both sides (TRL >= 1.13 dropped PPOTrainer)

    def python(self) -> str:
        """The interpreter of this pair's environment (the orchestrator's own for bench/.venv)."""
        if self.venv == ".venv":
            return sys.executable
        py = BENCH / self.venv / "bin" / "python"
        if not py.exists():
            raise SystemExit(f"{py} is missing: `make bench-env-116` creates it (`make bench` does too)")
        return str(py)


PAIRS = [
    Pair("sft", "util.train_sft", "trl.SFTTrainer", "epoch"),
    Pair("rm", "util.train_reward", "trl.RewardTrainer", "epoch"),
    Pair("ppo", "util.train_ppo", "trl.experimental.ppo.PPOTrainer", "rollout batch"),
    # trl 1.16 in its own environment, bench/.venv116 (`make bench-env-116`, bench/requirements-trl116.txt)
    Pair("dpo", "util.train_dpo", "trl.DPOTrainer (1.16)", "epoch", needs="train_dpo", venv=".venv116"),
    Pair("grpo", "util.train_grpo", "trl.GRPOTrainer (1.16)", "rollout batch", needs="train_grpo", venv=".venv116"),
]

# ============================================================================ worker side (runs in a subprocess)


def rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_cfg(spec: dict, seed: int, out_dir):
    import util
    # TRL's PPOTrainer has a fixed KL coefficient and (as set up here) a constant learning rate: ours
    # runs the same, without the KL controller and the annealing, so the pair stays matched
    return util.get_config(spec["preset"], seed=seed, out_dir=str(out_dir), n_eval=spec["n_eval"],
                           kl_target=0.0, ppo_anneal_lr=False)


def load_data(cfg):
    import util
    train = util.load_rows(Path(cfg.data_dir, "train.json"), limit=cfg.n_train)
    ev = util.load_rows(Path(cfg.data_dir, "eval.json"), limit=cfg.n_eval)
    return train, ev


def quiet() -> None:
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)


def sft_quality(model, tok, ev, cfg) -> dict:
    import util
    ex = util.row_examples(tok, ev, cfg)
    return {"heldout_loss": util.eval_sft_loss(model, ex, tok.pad_token_id, "cpu")}


def rm_quality(model, tok, ev, cfg) -> dict:
    import util
    c, r = util.score_pairs(model, tok, ev, cfg, "cpu")
    return {"heldout_pair_acc": sum(a > b for a, b in zip(c, r)) / len(c)}


def policy_quality(policy, tok, ev, cfg, start: Path, seed: int) -> dict:
    """Held-out execution accuracy (sqlite), RM score and KL of the trained policy; gains over the SFT start."""
    import util
    rm = util.load_score_model(start / "critic")
    ref = util.load_causal_lm(start / "actor")
    util.set_seed(seed)
    summary, _ = util.evaluate_policy(policy, tok, ev, cfg, rm=rm, ref=ref, desc="bench")
    base = json.loads((start / "sft_eval.json").read_text()).get(str(seed))
    if base is None:                        # a seed the set-up did not evaluate (more rounds than the spec's)
        util.set_seed(seed)
        base, _ = util.evaluate_policy(ref, tok, ev, cfg, rm=rm, desc="sft")
    keep = ("exec_acc_greedy", "exec_acc_sampled", "rm_score", "kl_to_sft", "eos_rate", "length")
    out = {k: summary[k] for k in keep}
    out["gold_gain_sampled"] = summary["exec_acc_sampled"] - base["exec_acc_sampled"]
    out["gold_gain_greedy"] = summary["exec_acc_greedy"] - base["exec_acc_greedy"]
    out["rm_gain"] = summary["rm_score"] - base["rm_score"]
    return out


def ppo_prompt_rows(rows, cfg, n_batches: int, per_batch: int = 0) -> list[dict]:
    """The prompts util.train_ppo (and util.train_grpo, per_batch=cfg.grpo_prompts) draws in its first n_batches
    iterations (same seeds), in order."""
    import torch
    import util
    out = []
    for it in range(n_batches):
        util.set_seed(cfg.seed * 100_003 + it)
        out += [rows[i] for i in torch.randperm(len(rows))[:per_batch or cfg.rollout_batch_size].tolist()]
    return out


# ---------------------------------------------------------------------------- setup: the shared starting points


def w_setup(spec, seed, work, start: Path) -> dict:
    """Base model, SFT actor and reward model trained once by our pipeline with the preset's full settings; the SFT
    policy's held-out accuracy for each round's seed (the baseline of the PPO gold gain)."""
    import util
    cfg = make_cfg(spec, 0, start)
    train, ev = load_data(cfg)
    t0 = time.perf_counter()
    util.prepare_base_models(cfg)
    tok = util.load_tokenizer(cfg.path("base_actor"))
    actor = util.load_causal_lm(cfg.path("base_actor"))
    util.set_seed(cfg.seed)
    util.train_sft(actor, tok, train, ev, cfg, "cpu", n_logs=1)
    util.save_model(actor, tok, cfg.path("actor"))
    util.set_seed(cfg.seed)
    rm = util.load_score_model(cfg.path("actor"))
    util.train_reward(rm, tok, train, ev, cfg, "cpu", n_logs=1)
    prompts = util.validation_prompts(cfg)
    util.set_reward_scale(rm, tok, prompts, util.sample_answers(actor, tok, prompts, cfg), cfg, "cpu")
    util.save_model(rm, tok, cfg.path("critic"))
    sft_eval = {}
    for s in range(spec["rounds"]):
        util.set_seed(s)
        summary, _ = util.evaluate_policy(actor, tok, ev, cfg, rm=rm, desc="sft")
        sft_eval[str(s)] = summary
    util.write_json(sft_eval, start / "sft_eval.json")
    return {"seconds": time.perf_counter() - t0, "sft_start": sft_eval["0"],
            "rm_start_pair_acc": rm_quality(rm, tok, ev, cfg)["heldout_pair_acc"]}


# ---------------------------------------------------------------------------- SFT


def sft_setup(spec, seed, work, start: Path):
    """(cfg with the bench's SFT slice, train rows, held-out rows, tokenizer, base model): every SFT worker's start."""
    import util
    cfg = make_cfg(spec, seed, work)
    cfg.sft_epochs = spec["sft_epochs"]
    train, ev = load_data(cfg)
    return cfg, train, ev, util.load_tokenizer(start / "base_actor"), util.load_causal_lm(start / "base_actor")


def w_sft_ours(spec, seed, work, start: Path) -> dict:
    import util
    cfg, train, ev, tok, model = sft_setup(spec, seed, work, start)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    util.train_sft(model, tok, train, ev, cfg, "cpu", n_logs=1)          # one held-out curve point, at the end
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    steps = len(util.batches(len(train), cfg.sft_batch_size, cfg.sft_epochs, cfg.seed))
    return {"seconds": dt, "units": cfg.sft_epochs, "steps": steps, "rss_start_mb": rss0, "peak_rss_mb": peak,
            "quality": sft_quality(model, tok, ev, cfg)}


def w_sft_trl(spec, seed, work, start: Path) -> dict:
    import util
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    cfg, train, ev, tok, model = sft_setup(spec, seed, work, start)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    # identical token ids and labels (prompt masked with -100), identical batches in identical order
    ex = util.row_examples(tok, train, cfg)
    plan = util.batches(len(ex), cfg.sft_batch_size, cfg.sft_epochs, cfg.seed)
    order = [i for b in plan for i in b]
    ds = Dataset.from_dict({"input_ids": [ex[i][0] for i in order], "labels": [ex[i][1] for i in order]})
    opt, sched = util.make_optimizer(model, cfg.sft_lr, len(plan), weight_decay=0.01)   # the same AdamW + schedule
    args = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cfg.sft_batch_size, num_train_epochs=1,
                     train_sampling_strategy="sequential", max_length=None, max_grad_norm=cfg.max_grad_norm,
                     gradient_checkpointing=False, bf16=False, loss_type="nll", seed=cfg.seed, data_seed=cfg.seed,
                     logging_steps=max(1, len(plan) // 4), report_to="none", save_strategy="no", disable_tqdm=True,
                     use_cpu=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, optimizers=(opt, sched))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    model.eval()
    return {"seconds": t2 - t0, "seconds_train_call": t2 - t1, "seconds_init": t1 - t0,
            "units": cfg.sft_epochs, "steps": trainer.state.global_step, "rss_start_mb": rss0,
            "peak_rss_mb": peak, "quality": sft_quality(model, tok, ev, cfg)}


# ---------------------------------------------------------------------------- reward model


def rm_setup(spec, seed, work, start: Path, **overrides):
    """(cfg with the bench's RM slice and overrides, train rows, held-out rows, tokenizer, a fresh score model on
    the SFT actor): every RM worker's start."""
    import util
    cfg = make_cfg(spec, seed, work)
    cfg.rm_epochs = spec["rm_epochs"]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    train, ev = load_data(cfg)
    tok = util.load_tokenizer(start / "actor")
    util.set_seed(seed)                     # the fresh score head is drawn from the RNG: same draw on both sides
    return cfg, train, ev, tok, util.load_score_model(start / "actor")


def w_rm_ours(spec, seed, work, start: Path, prefix: bool = False) -> dict:
    import util
    # without prefix: TRL's objective (the pairwise loss at the EOS only) and TRL's pairs (each row's own rejected
    # answer, not more_rejected)
    cfg, train, ev, tok, model = rm_setup(spec, seed, work, start,
                                          **({} if prefix else {"rm_prefix_weight": 0.0, "rm_max_rejected": 1}))
    rss0 = rss_mb()
    t0 = time.perf_counter()
    util.train_reward(model, tok, train, ev, cfg, "cpu", n_logs=1)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    steps = len(util.batches(len(train), cfg.rm_batch_size, cfg.rm_epochs, cfg.seed))
    return {"seconds": dt, "units": cfg.rm_epochs, "steps": steps, "rss_start_mb": rss0, "peak_rss_mb": peak,
            "quality": rm_quality(model, tok, ev, cfg)}


def w_rm_ours_prefix(spec, seed, work, start: Path) -> dict:
    """Our default recipe (pairwise loss + rejected-prefix term): not TRL's objective, shown for reference."""
    return w_rm_ours(spec, seed, work, start, prefix=True)


def w_rm_trl(spec, seed, work, start: Path) -> dict:
    import util
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    cfg, train, ev, tok, model = rm_setup(spec, seed, work, start)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    chosen, rejected = ([ids for ids, _ in util.row_examples(tok, train, cfg, k)] for k in ("chosen", "rejected"))
    plan = util.batches(len(train), cfg.rm_batch_size, cfg.rm_epochs, cfg.seed)
    order = [i for b in plan for i in b]
    ds = Dataset.from_dict({"chosen_ids": [chosen[i] for i in order], "rejected_ids": [rejected[i] for i in order]})
    opt, sched = util.make_optimizer(model, cfg.rm_lr, len(plan))
    args = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cfg.rm_batch_size, num_train_epochs=1,
                        train_sampling_strategy="sequential", max_length=None, max_grad_norm=cfg.max_grad_norm,
                        gradient_checkpointing=False, bf16=False, seed=cfg.seed, data_seed=cfg.seed,
                        logging_steps=max(1, len(plan) // 4), report_to="none", save_strategy="no", disable_tqdm=True,
                        use_cpu=True, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, optimizers=(opt, sched))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    model.eval()
    return {"seconds": t2 - t0, "seconds_train_call": t2 - t1, "seconds_init": t1 - t0,
            "units": cfg.rm_epochs, "steps": trainer.state.global_step, "rss_start_mb": rss0,
            "peak_rss_mb": peak, "quality": rm_quality(model, tok, ev, cfg)}


# ---------------------------------------------------------------------------- PPO


def w_ppo_ours(spec, seed, work, start: Path) -> dict:
    import util
    cfg = make_cfg(spec, seed, work)
    cfg.ppo_iterations = spec["ppo_batches"]
    cfg.save_every = 10**9                  # one checkpoint, at the end (train_ppo always writes the last one)
    for d in ("actor", "critic"):
        (work / d).symlink_to(start / d, target_is_directory=True)
    train, ev = load_data(cfg)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    history = util.train_ppo(cfg, "cpu", rows=train)           # loads the four models, trains, saves
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    tok = util.load_tokenizer(start / "actor")
    policy = util.load_causal_lm(cfg.path("rlhf"))
    phases = {k: sum(h[f"time_{k}"] for h in history) for k in ("generate", "score", "train")}
    return {"seconds": dt, "units": cfg.ppo_iterations, "episodes": cfg.ppo_iterations * cfg.rollout_batch_size,
            "rss_start_mb": rss0, "peak_rss_mb": peak, "phases_s": phases,
            "train_curve": {k: [h[k] for h in history] for k in ("rm_score", "kl", "gold_acc")},
            "quality": policy_quality(policy, tok, ev, cfg, start, seed)}


class OffsetScore:
    """Wraps a score head so TRL reads what util reads: the RM's reward as util.reward_scores gives it
    (util.normalize_scores: shifted, scaled, clipped), the critic's values as util.critic_values (not
    clipped)."""

    def __new__(cls, model, clip: bool = True):
        import torch
        import util
        head = model.score

        class _Normalized(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.head = head

            def forward(self, x):
                return util.normalize_scores(model, self.head(x), clip=clip)
        return _Normalized()


def w_ppo_trl(spec, seed, work, start: Path) -> dict:
    import torch
    import util
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    cfg = make_cfg(spec, seed, work)
    cfg.ppo_iterations = spec["ppo_batches"]
    train, ev = load_data(cfg)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    tok = util.load_tokenizer(start / "actor")
    tok.padding_side = "left"                                   # TRL's collator pads the prompts; generation wants left
    policy = util.load_causal_lm(start / "actor")
    ref = util.load_causal_lm(start / "actor").requires_grad_(False)
    value = util.load_score_model(start / "critic")             # critic initialised from the RM, as ours
    rm = util.load_score_model(start / "critic").requires_grad_(False)
    rm.score = OffsetScore(rm)
    value.score = OffsetScore(value, clip=False)
    prompts = ppo_prompt_rows(train, cfg, cfg.ppo_iterations)  # the same prompts our train_ppo draws
    ds = Dataset.from_dict({"input_ids": [util.encode_prompt(tok, r["prompt"])[-cfg.max_prompt_tokens:] for r in prompts]})
    # the same optimiser as ours: AdamW betas (0.9, 0.95), no weight decay, policy lr and critic lr, constant
    opt = torch.optim.AdamW([{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.ppo_lr},
                             {"params": [p for p in value.parameters() if p.requires_grad], "lr": cfg.ppo_vf_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = PPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cfg.rollout_batch_size,
                     gradient_accumulation_steps=1, num_mini_batches=cfg.rollout_batch_size // cfg.ppo_minibatch_size,
                     num_ppo_epochs=cfg.ppo_epochs, total_episodes=cfg.ppo_iterations * cfg.rollout_batch_size,
                     local_rollout_forward_batch_size=cfg.rollout_batch_size, response_length=cfg.max_response_tokens,
                     stop_token="eos", temperature=cfg.temperature, missing_eos_penalty=cfg.missing_eos_penalty,
                     kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, cliprange=cfg.cliprange, vf_coef=cfg.vf_coef,
                     cliprange_value=cfg.cliprange_value, gamma=cfg.gamma, lam=cfg.lam,
                     whiten_rewards=cfg.whiten_rewards, num_sample_generations=0, seed=cfg.seed,
                     gradient_checkpointing=False, bf16=False, report_to="none", save_strategy="no",
                     disable_tqdm=True, logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=value, eval_dataset=ds.select(range(8)), optimizers=(opt, sched))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    policy.eval()
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    return {"seconds": t2 - t0, "seconds_train_call": t2 - t1, "seconds_init": t1 - t0,
            "units": cfg.ppo_iterations, "episodes": cfg.ppo_iterations * cfg.rollout_batch_size,
            "rss_start_mb": rss0, "peak_rss_mb": peak,
            "train_curve": {"rm_score": [h["objective/scores"] for h in logs], "kl": [h["objective/kl"] for h in logs]},
            "quality": policy_quality(policy, tok, ev, cfg, start, seed)}


# ---------------------------------------------------------------------------- floors: the arithmetic alone
# What the same arithmetic costs as a bare PyTorch loop: batches tokenised and padded before the clock starts, then
# forward, loss, backward, clip, AdamW step, and nothing else (no checks, no logging, no held-out curve, no data
# preparation). No eager PyTorch implementation of the same arithmetic on this machine can be faster than its floor
# (torch.compile did not help here: bench/README.md), so TRL's time / floor is the highest speed-up over TRL that is possible
# without changing the work.


def floor_result(dt: float, units: float, steps: int, rss0: float, **extra) -> dict:
    """A floor worker's result, in the shape summarise() reads (no quality: the floor trains nothing to keep)."""
    return {"seconds": dt, "units": units, "steps": steps, "rss_start_mb": rss0, "peak_rss_mb": peak_rss_mb(),
            "quality": {}, **extra}


def bare_steps(model, batches: list, loss_fn, opt, sched) -> float:
    """Seconds for one optimizer step per batch: loss_fn(model, batch), backward, clip at norm 1.0, step."""
    import torch
    model.train()
    t0 = time.perf_counter()
    for b in batches:
        loss = loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def w_sft_floor(spec, seed, work, start: Path) -> dict:
    """The SFT slice's steps as a bare loop: the same batches, util.sft_loss (the cross-entropy over the answer tokens,
    the LM head run at those positions only: our arithmetic)."""
    import util
    cfg, train, _, tok, model = sft_setup(spec, seed, work, start)
    rows = util.fit_rows(tok, train, cfg, ("response",), "SFT training rows")
    ex = util.row_examples(tok, rows, cfg)
    plan = util.batches(len(ex), cfg.sft_batch_size, cfg.sft_epochs, cfg.seed)
    batches = [util.right_pad_batch([ex[i] for i in idx], tok.pad_token_id) for idx in plan]
    opt, sched = util.make_optimizer(model, cfg.sft_lr, len(plan), weight_decay=0.01)
    rss0 = rss_mb()
    dt = bare_steps(model, batches, lambda m, b: util.sft_loss(m, b, "cpu"), opt, sched)
    return floor_result(dt, cfg.sft_epochs, len(plan), rss0)


def w_rm_floor(spec, seed, work, start: Path, full: bool = False) -> dict:
    """The RM slice's steps as a bare loop, pairwise loss at the EOS: our arithmetic (each prompt read once,
    util.shared_prompt_scores) or, full=True, TRL's (chosen and rejected as two full sequences, one batch)."""
    import util
    cfg, train, _, tok, model = rm_setup(spec, seed, work, start, rm_max_rejected=1)
    rows = util.fit_rows(tok, train, cfg, ("chosen", "rejected"), "reward-model training pairs")
    ex = util.ranking_examples(tok, rows, cfg)
    plan = util.batches(len(rows), cfg.rm_batch_size, cfg.rm_epochs, cfg.seed)
    if full:
        batches = [util.right_pad_batch([(ex[i][0] + a, ex[i][0] + a) for i in idx for a in ex[i][1]],
                                        tok.pad_token_id)[:2] for idx in plan]

        def loss_fn(m, b):
            s = util.reward_scores(m, b[0], b[1], normalized=False)
            return util.pairwise_loss(s[0::2], s[1::2])           # rows: chosen, rejected, chosen, rejected, ...
    else:
        batches = [util.ranking_batch([ex[i] for i in idx], tok.pad_token_id) for idx in plan]

        def loss_fn(m, b):
            prompt_ids, prompt_mask, ids, mask, owner, c, r = b
            s = util.at_last_token(util.shared_prompt_scores(m, prompt_ids, prompt_mask, ids, mask, owner), mask)
            return util.pairwise_loss(s[c], s[r])
    opt, sched = util.make_optimizer(model, cfg.rm_lr, len(plan))
    rss0 = rss_mb()
    dt = bare_steps(model, batches, loss_fn, opt, sched)
    tokens = sum(int(t.numel()) for b in batches for t in (b[:1] if full else (b[0], b[2])))
    return floor_result(dt, cfg.rm_epochs, len(plan), rss0, padded_tokens=tokens)


def w_rm_floor_full(spec, seed, work, start: Path) -> dict:
    return w_rm_floor(spec, seed, work, start, full=True)


def w_ppo_floor(spec, seed, work, start: Path) -> dict:
    """The PPO slice's rollout batches as bare loops: model.generate (KV cache) on the pre-encoded prompts, three no-grad
    passes (reference log-probs, values, reward: TRL's count, one fewer than ours), then ppo_epochs x minibatches
    of actor and critic forward, a clipped-ratio + value loss, one backward, two clips, two AdamW steps. No masks,
    whitening, GAE, KL, decoding, sqlite or logging: cheaper than either side's iteration."""
    import torch
    import util
    cfg = make_cfg(spec, seed, work)
    train, _ = load_data(cfg)
    tok = util.load_tokenizer(start / "actor")
    actor, ref = util.load_causal_lm(start / "actor"), util.load_causal_lm(start / "actor")
    critic, rm = util.load_score_model(start / "critic"), util.load_score_model(start / "critic")
    opt_a = torch.optim.AdamW(actor.parameters(), lr=cfg.ppo_lr, betas=(0.9, 0.95), weight_decay=0.0)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.ppo_vf_lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows = ppo_prompt_rows(train, cfg, spec["ppo_batches"])
    n = cfg.rollout_batch_size
    encoded = [util.encode_prompts(tok, [r["prompt"] for r in rows[i:i + n]], cfg.max_prompt_tokens)
               for i in range(0, len(rows), n)]
    for m in (actor, ref, critic, rm):
        m.eval()                               # dropout is off in these models; eval() only for generate's sake
    util.set_seed(seed)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    for ids, mask in encoded:
        lq = ids.shape[1]
        with torch.no_grad():
            qr = actor.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_response_tokens,
                                do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
            attn = (qr != tok.pad_token_id).long()
            attn[:, :lq] = mask
            old_lp, _ = util.response_logprobs(ref, qr, attn, lq, cfg.temperature)    # TRL's generate gives the actor's
            values = util.token_scores(critic, qr, attn)[:, lq - 1:-1]
            util.reward_scores(rm, qr, attn)
        adv, ret = torch.randn_like(old_lp), torch.randn_like(values)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n)
            for s in range(0, n, cfg.ppo_minibatch_size):
                mb = perm[s:s + cfg.ppo_minibatch_size]
                lp, _ = util.response_logprobs(actor, qr[mb], attn[mb], lq, cfg.temperature)
                v = util.token_scores(critic, qr[mb], attn[mb])[:, lq - 1:-1]
                ratio = torch.exp(lp - old_lp[mb])
                pg = torch.max(-adv[mb] * ratio, -adv[mb] * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)).mean()
                loss = pg + cfg.vf_coef * 0.5 * ((v - ret[mb]) ** 2).mean()
                opt_a.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                opt_a.step()
                opt_c.step()
    dt = time.perf_counter() - t0
    return floor_result(dt, len(encoded), len(encoded), rss0, episodes=len(rows))


# ---------------------------------------------------------------------------- DPO (trl 1.16, bench/.venv116)


def dpo_quality(policy, tok, ev, cfg, start: Path, seed: int) -> dict:
    """The policy's held-out quality (policy_quality) plus DPO's implicit-reward accuracy on the held-out pairs."""
    import util
    ref = util.load_causal_lm(start / "actor")
    stats = util.dpo_pair_stats(policy, ref, tok, ev, cfg, "cpu")
    return {**policy_quality(policy, tok, ev, cfg, start, seed), "implicit_reward_acc": stats["reward_acc"],
            "implicit_margin": stats["margin"]}


def w_dpo_ours(spec, seed, work, start: Path) -> dict:
    import util
    cfg = make_cfg(spec, seed, work)
    cfg.dpo_epochs = spec["dpo_epochs"]
    # plain DPO on both sides (DPOTrainer's loss_type="sigmoid"): TRL's IPO averages the log-ratios
    # per token where ours sums them, and its RPO term is not ours
    cfg.dpo_loss, cfg.dpo_sft_weight = "sigmoid", 0.0
    train, ev = load_data(cfg)
    tok = util.load_tokenizer(start / "actor")
    model = util.load_causal_lm(start / "actor")
    ref = util.load_causal_lm(start / "actor").requires_grad_(False)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    # one check on 200 pairs at the end, no sampled curve: the work DPOTrainer does in the timed part
    util.train_dpo(model, ref, tok, train, ev, cfg, "cpu", n_logs=1, n_sampled=0)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    n = len(util.fit_rows(tok, train, cfg, ("chosen", "rejected")))
    steps = len(util.batches(n, cfg.dpo_batch_size, cfg.dpo_epochs, cfg.seed))
    return {"seconds": dt, "units": cfg.dpo_epochs, "steps": steps, "rss_start_mb": rss0, "peak_rss_mb": peak,
            "quality": dpo_quality(model, tok, ev, cfg, start, seed)}


def w_dpo_trl(spec, seed, work, start: Path) -> dict:
    import util
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    cfg = make_cfg(spec, seed, work)
    cfg.dpo_epochs = spec["dpo_epochs"]
    # plain DPO on both sides (DPOTrainer's loss_type="sigmoid"): TRL's IPO averages the log-ratios
    # per token where ours sums them, and its RPO term is not ours
    cfg.dpo_loss, cfg.dpo_sft_weight = "sigmoid", 0.0
    train, ev = load_data(cfg)
    tok = util.load_tokenizer(start / "actor")
    model = util.load_causal_lm(start / "actor")
    ref = util.load_causal_lm(start / "actor").requires_grad_(False)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    # the pairs train_dpo keeps, in the batches and order it draws; TRL tokenises the text itself, and with the BOS
    # written in front of the prompt its ids are ours (checked below)
    rows = util.fit_rows(tok, train, cfg, ("chosen", "rejected"), "DPO training pairs")
    plan = util.batches(len(rows), cfg.dpo_batch_size, cfg.dpo_epochs, cfg.seed)
    order = [rows[i] for b in plan for i in b]
    ds = Dataset.from_dict({"prompt": [tok.bos_token + r["prompt"] for r in order],
                            "chosen": [r["chosen"] for r in order], "rejected": [r["rejected"] for r in order]})
    opt, sched = util.make_optimizer(model, cfg.dpo_lr, len(plan))       # the same AdamW + schedule as train_dpo
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cfg.dpo_batch_size, num_train_epochs=1,
                     train_sampling_strategy="sequential", max_length=None, max_grad_norm=cfg.max_grad_norm,
                     beta=cfg.dpo_beta, loss_type=[cfg.dpo_loss], precompute_ref_log_probs=False,
                     gradient_checkpointing=False, bf16=False, seed=cfg.seed, data_seed=cfg.seed,
                     logging_steps=max(1, len(plan) // 4), report_to="none", save_strategy="no", disable_tqdm=True,
                     use_cpu=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                         optimizers=(opt, sched))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    model.eval()
    d = trainer.train_dataset
    same = all(p == util.encode_prompt(tok, r["prompt"])[-cfg.max_prompt_tokens:]
               and c == util.encode_response(tok, r["chosen"]) and x == util.encode_response(tok, r["rejected"])
               for p, c, x, r in zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"], order, strict=True))
    return {"seconds": t2 - t0, "seconds_train_call": t2 - t1, "seconds_init": t1 - t0,
            "units": cfg.dpo_epochs, "steps": trainer.state.global_step, "rss_start_mb": rss0,
            "peak_rss_mb": peak, "same_token_ids": same, "quality": dpo_quality(model, tok, ev, cfg, start, seed)}


# ---------------------------------------------------------------------------- GRPO (trl 1.16, bench/.venv116)


def w_grpo_ours(spec, seed, work, start: Path) -> dict:
    import util
    cfg = make_cfg(spec, seed, work)
    cfg.grpo_iterations = spec["grpo_batches"]
    (work / "actor").symlink_to(start / "actor", target_is_directory=True)
    train, ev = load_data(cfg)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    policy, history = util.train_grpo(cfg, "cpu", rows=train)        # loads the actor and the reference, trains
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    tok = util.load_tokenizer(start / "actor")
    phases = {k: sum(h[f"time_{k}"] for h in history) for k in ("generate_score", "train")}
    return {"seconds": dt, "units": cfg.grpo_iterations,
            "episodes": cfg.grpo_iterations * cfg.grpo_prompts * cfg.grpo_group_size,
            "rss_start_mb": rss0, "peak_rss_mb": peak, "phases_s": phases,
            "train_curve": {k: [h[k] for h in history] for k in ("reward", "gold_acc", "kl")},
            "quality": policy_quality(policy, tok, ev, cfg, start, seed)}


def grpo_reward_funcs(tok, cfg):
    """util's GRPO rewards as TRL reward functions (TRL passes the dataset's columns as keyword arguments), with
    the weights train_grpo gives them: execution 1, format cfg.grpo_format_weight."""
    import util

    def execution(completions, setup_sql, chosen, **kw):
        return util.exec_rewards([{"setup_sql": s, "chosen": c} for s, c in zip(setup_sql, chosen)], completions)

    def format_(completions, completion_ids, setup_sql, **kw):
        # TRL cuts each completion after its first EOS and keeps the EOS: it ended with EOS iff the last id is one
        has_eos = [bool(ids) and ids[-1] == tok.eos_token_id for ids in completion_ids]
        return util.format_rewards([{"setup_sql": s} for s in setup_sql], completions, has_eos)
    return [execution, format_], [1.0, cfg.grpo_format_weight]


def w_grpo_trl(spec, seed, work, start: Path) -> dict:
    import torch
    import util
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    cfg = make_cfg(spec, seed, work)
    cfg.grpo_iterations = spec["grpo_batches"]
    train, ev = load_data(cfg)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    tok = util.load_tokenizer(start / "actor")
    policy = util.load_causal_lm(start / "actor")     # TRL loads the reference itself, from the same directory
    rows = ppo_prompt_rows(train, cfg, cfg.grpo_iterations, cfg.grpo_prompts)    # the prompts train_grpo draws
    # the prompt as text with the BOS written in front: TRL's tokenisation then gives util.encode_prompt's ids
    ds = Dataset.from_dict({"prompt": [tok.bos_token + r["prompt"] for r in rows],
                            "setup_sql": [r["setup_sql"] for r in rows], "chosen": [r["chosen"] for r in rows]})
    group = cfg.grpo_prompts * cfg.grpo_group_size
    assert group % cfg.grpo_minibatch_size == 0, "TRL needs the group batch to split into whole minibatches"
    # the same optimiser as train_grpo: AdamW betas (0.9, 0.95), no weight decay, constant learning rate
    opt, _ = util.make_optimizer(policy, cfg.grpo_lr, 1, warmup=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    funcs, weights = grpo_reward_funcs(tok, cfg)
    args = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cfg.grpo_minibatch_size,
                      gradient_accumulation_steps=1, steps_per_generation=group // cfg.grpo_minibatch_size,
                      num_generations=cfg.grpo_group_size, num_iterations=cfg.grpo_epochs, num_train_epochs=1,
                      shuffle_dataset=False, max_completion_length=cfg.max_response_tokens,
                      temperature=cfg.temperature, top_k=0, top_p=1.0, beta=cfg.grpo_kl_coef, epsilon=cfg.cliprange,
                      loss_type="grpo", scale_rewards="group", reward_weights=weights,
                      mask_truncated_completions=False, max_grad_norm=cfg.max_grad_norm, disable_dropout=True,
                      gradient_checkpointing=False, bf16=False, seed=cfg.seed, data_seed=cfg.seed,
                      logging_steps=group // cfg.grpo_minibatch_size * cfg.grpo_epochs, report_to="none",
                      save_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tok,
                          optimizers=(opt, sched))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    policy.eval()
    steps = trainer.state.global_step
    assert steps == cfg.grpo_iterations * group // cfg.grpo_minibatch_size * cfg.grpo_epochs, steps
    same = all(tok(text=p)["input_ids"] == util.encode_prompt(tok, r["prompt"]) for p, r in zip(ds["prompt"], rows))
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"seconds": t2 - t0, "seconds_train_call": t2 - t1, "seconds_init": t1 - t0,
            "units": cfg.grpo_iterations, "episodes": cfg.grpo_iterations * group, "steps": steps,
            "rss_start_mb": rss0, "peak_rss_mb": peak, "same_token_ids": same,
            "train_curve": {"reward": [h["reward"] for h in logs], "kl": [h.get("kl") for h in logs]},
            "quality": policy_quality(policy, tok, ev, cfg, start, seed)}


# ---------------------------------------------------------------------------- rollout generation throughput


def w_gen(spec, seed, work, start: Path) -> dict:
    """Tokens/s of the same rollout batch through: bare model.generate (KV cache, pre-encoded ids), util.generate
    (what util.rollout calls: encode + pad + generate), util.rollout in full (generate + 4 scoring passes + decode +
    sqlite), and TRL PPO's batch_generation (generate with per-step scores kept). Same seed before each call."""
    import torch
    import util
    from transformers import GenerationConfig
    from trl.experimental.ppo.ppo_trainer import batch_generation
    from trl.experimental.utils import get_reward
    cfg = make_cfg(spec, seed, work)
    train, _ = load_data(cfg)
    rows = ppo_prompt_rows(train, cfg, 1)
    prompts = [r["prompt"] for r in rows]
    tok = util.load_tokenizer(start / "actor")
    actor = util.load_causal_lm(start / "actor")
    ref = util.load_causal_lm(start / "actor")
    critic, rm = util.load_score_model(start / "critic"), util.load_score_model(start / "critic")
    ids, mask = util.encode_prompts(tok, prompts, cfg.max_prompt_tokens)
    lq = ids.shape[1]
    sample = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)

    def n_tokens(responses):
        return int(util.response_mask(responses, tok.eos_token_id).sum())

    def bare():
        with torch.no_grad():
            out = actor.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_response_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True, **sample)
        return out[:, lq:]

    def ours_generate():
        qr, _, l = util.generate(actor, tok, prompts, cfg)
        return qr[:, l:]

    timings = {}

    def ours_rollout():
        ro = util.rollout(actor, ref, critic, [rm], tok, rows, cfg, timings)   # a list: one RM, or an ensemble
        return ro.query_responses[:, ro.context_length:]

    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_response_tokens, temperature=cfg.temperature + 1e-7, top_k=0,
                               top_p=1.0, do_sample=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def trl_generate():
        qr, _ = batch_generation(actor, ids, len(prompts), tok.pad_token_id, gen_cfg)
        return qr[:, lq:]

    variants = {"bare_generate": bare, "ours_generate": ours_generate, "ours_rollout": ours_rollout,
                "trl_generate": trl_generate}
    times = {k: [] for k in variants}
    tokens = {k: [] for k in variants}
    outputs = {}
    names = list(variants)
    enc_times = []
    for rep in range(spec["gen_repeats"] + 1):            # repetition 0 warms up and is not counted
        if rep == 1:
            timings.clear()                                # rollout phases: counted repetitions only
        t0 = time.perf_counter()
        util.encode_prompts(tok, prompts, cfg.max_prompt_tokens)   # the only work util.generate adds to bare
        if rep:
            enc_times.append(time.perf_counter() - t0)
        for k in names[rep % len(names):] + names[:rep % len(names)]:   # rotate the order
            torch.manual_seed(seed * 7919 + rep)
            t0 = time.perf_counter()
            resp = variants[k]()
            dt = time.perf_counter() - t0
            if rep:
                times[k].append(dt)
                tokens[k].append(n_tokens(resp))
            outputs.setdefault(rep, {})[k] = resp
    same = all(torch.equal(o["bare_generate"], o["ours_generate"]) for o in outputs.values())
    # equivalence check: TRL's get_reward reads the same raw score as util.reward_scores
    qr = torch.cat([ids, outputs[1]["bare_generate"]], 1)
    resp = qr[:, lq:]
    attn = torch.cat([mask, util.response_mask(resp, tok.eos_token_id)], 1)
    with torch.no_grad():
        ours_score = util.reward_scores(rm, qr, attn, normalized=False)
        post = torch.where(attn[:, lq:].bool(), resp, tok.pad_token_id)
        _, trl_score, _ = get_reward(rm, torch.cat([ids, post], 1), tok.pad_token_id, lq)
    n_calls = spec["gen_repeats"]
    res = {k: {"seconds_median": statistics.median(times[k]), "tokens_median": statistics.median(tokens[k]),
               "tokens_per_s": statistics.median(t / s for t, s in zip(tokens[k], times[k]))} for k in variants}
    return {"batch": len(prompts), "max_new_tokens": cfg.max_response_tokens, "repeats": n_calls, "variants": res,
            "ours_equals_bare_tokens": same, "encode_prompts_s_median": statistics.median(enc_times),
            "rollout_phases_s_per_call": {k: v / n_calls for k, v in timings.items()},
            "rm_score_max_abs_diff_trl_vs_ours": float((ours_score - trl_score).abs().max()),
            "peak_rss_mb": peak_rss_mb()}


WORKERS = {("setup", "ours"): w_setup, ("sft", "ours"): w_sft_ours, ("sft", "trl"): w_sft_trl,
           ("rm", "ours"): w_rm_ours, ("rm", "ours_prefix"): w_rm_ours_prefix, ("rm", "trl"): w_rm_trl,
           ("ppo", "ours"): w_ppo_ours, ("ppo", "trl"): w_ppo_trl, ("dpo", "ours"): w_dpo_ours,
           ("dpo", "trl"): w_dpo_trl, ("grpo", "ours"): w_grpo_ours, ("grpo", "trl"): w_grpo_trl,
           ("gen", "ours"): w_gen, ("sft", "floor"): w_sft_floor, ("rm", "floor"): w_rm_floor,
           ("rm", "floor_full"): w_rm_floor_full, ("ppo", "floor"): w_ppo_floor}


def worker_main(a) -> int:
    import tempfile
    quiet()
    import torch
    import transformers
    import trl
    spec = SPECS[a.spec]
    start = BENCH / spec["out"] / "start"
    with tempfile.TemporaryDirectory(prefix=f"bench-{a.task}-{a.side}-") as tmp:
        fn = WORKERS[(a.task, a.side)]
        if a.profile:                       # where the time goes: cProfile of the whole worker, top functions
            import cProfile
            import io
            import pstats
            prof = cProfile.Profile()
            res = prof.runcall(fn, spec, a.seed, Path(tmp), start)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
            Path(a.profile).write_text(buf.getvalue())
        else:
            res = fn(spec, a.seed, Path(tmp), start)
    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                       "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    Path(a.result).write_text(json.dumps(res, indent=1))
    return 0


# ============================================================================ orchestrator


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1), "os": platform.platform(),
            "gpu": "none (CPU only)"}


def run_worker(task: str, side: str, seed: int, spec_name: str, logs: Path, tag: str, python=None) -> dict:
    """Run one measurement in a fresh subprocess; returns its JSON plus the child's own peak RSS from wait4."""
    out = logs / f"{tag}.json"
    log = logs / f"{tag}.log"
    env = {**os.environ, "TQDM_DISABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "RLHF_PRESET": "",
           "PYTHONWARNINGS": "ignore"}
    env.pop("RLHF_OUT", None)
    cmd = [python or sys.executable, str(Path(__file__)), "worker", task, side, "--seed", str(seed),
           "--spec", spec_name, "--result", str(out)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"worker {task} {side} failed (exit {p.returncode}); see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-25:]))
    res = json.loads(out.read_text())
    res["process_wall_s"] = wall
    res["process_peak_rss_mb"] = ru.ru_maxrss / 1024
    return res


def start_fingerprint(spec: dict) -> str:
    """Starting points are reused only if util.py, rlhf/, the data and the tokenizer are unchanged."""
    h = hashlib.sha256(json.dumps({k: spec[k] for k in ("preset", "rounds", "n_eval")}, sort_keys=True).encode())
    for p in [ROOT / "util.py", *sorted((ROOT / "rlhf").glob("*.py")), ROOT / "dataset" / "train.json", ROOT / "dataset" / "eval.json",
              ROOT / "tokenizer" / "tokenizer.json"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs: list[dict], unit_key="units") -> dict:
    """Medians over rounds of time per unit, peak RSS and every quality field."""
    per_unit = [r["seconds"] / r[unit_key] for r in runs]
    out = {"rounds": len(runs), "seconds_median": median([r["seconds"] for r in runs]),
           "seconds_per_unit_median": median(per_unit), "seconds_per_unit_all": per_unit,
           "peak_rss_mb_median": median([r["peak_rss_mb"] for r in runs]),
           "rss_start_mb_median": median([r["rss_start_mb"] for r in runs]),
           "quality_median": {k: median([r["quality"][k] for r in runs]) for k in runs[0]["quality"]}}
    if "seconds_train_call" in runs[0]:
        out["seconds_train_call_median"] = median([r["seconds_train_call"] for r in runs])
        out["seconds_init_median"] = median([r["seconds_init"] for r in runs])
    if "episodes" in runs[0]:
        out["episodes_per_s_median"] = median([r["episodes"] / r["seconds"] for r in runs])
    if "phases_s" in runs[0]:
        out["phases_s_median"] = {k: median([r["phases_s"][k] for r in runs]) for k in runs[0]["phases_s"]}
    return out


def ceiling(p: dict, name: str):
    """TRL's time / the floor's: the highest speed-up over TRL that the same arithmetic allows (None: no floor)."""
    x = p.get(name, {})
    if "floor" not in x:
        return None
    return x["trl"]["seconds_per_unit_median"] / x["floor"]["seconds_per_unit_median"]


def evaluate_targets(res: dict) -> dict:
    """The issue's targets, each with the figures it was judged on (and, when a floor ran, the ceiling)."""
    t = {}
    p = res["pairs"]
    if "sft" in p:
        o, r = p["sft"]["ours"], p["sft"]["trl"]
        sp = r["seconds_per_unit_median"] / o["seconds_per_unit_median"]
        lo, lt = o["quality_median"]["heldout_loss"], r["quality_median"]["heldout_loss"]
        t["sft_1.5x_at_equal_quality"] = {"speedup": sp, "ours_heldout_loss": lo, "trl_heldout_loss": lt,
                                          "met": sp >= 1.5 and lo <= lt * 1.01,
                                          "rule": "TRL s/epoch / ours >= 1.5 and our held-out loss within 1 % of TRL's"}
    if "rm" in p:
        o, r = p["rm"]["ours"], p["rm"]["trl"]
        sp = r["seconds_per_unit_median"] / o["seconds_per_unit_median"]
        ao, at = o["quality_median"]["heldout_pair_acc"], r["quality_median"]["heldout_pair_acc"]
        t["rm_1.5x_at_equal_quality"] = {"speedup": sp, "ours_pair_acc": ao, "trl_pair_acc": at,
                                         "met": sp >= 1.5 and ao >= at - 0.01,
                                         "rule": "TRL s/epoch / ours >= 1.5 and our pairwise accuracy >= TRL's - 0.01"}
    if "ppo" in p:
        o, r = p["ppo"]["ours"], p["ppo"]["trl"]
        sp = o["episodes_per_s_median"] / r["episodes_per_s_median"]
        go, gt = o["quality_median"]["gold_gain_sampled"], r["quality_median"]["gold_gain_sampled"]
        t["ppo_2x_with_equal_or_better_gold_gain"] = {
            "speedup": sp, "ours_gold_gain": go, "trl_gold_gain": gt, "met": sp >= 2 and go >= gt - 0.02,
            "rule": "our episodes/s / TRL's >= 2 and our held-out sampled exec-accuracy gain >= TRL's - 0.02 "
                    "(0.02 ~ one standard error of a difference of two accuracies on 600 prompts)"}
    for key, name in (("sft_1.5x_at_equal_quality", "sft"), ("rm_1.5x_at_equal_quality", "rm"),
                      ("ppo_2x_with_equal_or_better_gold_gain", "ppo")):
        c = ceiling(p, name)
        if key in t and c is not None:
            t[key]["ceiling_trl_over_floor"] = c
    if "gen" in res:
        v = res["gen"]["variants"]
        ov = v["bare_generate"]["tokens_per_s"] / v["ours_generate"]["tokens_per_s"] - 1
        t["rollout_generation_overhead_le_10pct"] = {"overhead": ov, "met": ov <= 0.10,
                                                     "rule": "bare generate tokens/s / util.generate tokens/s - 1 <= 0.10"}
    return t


# What could not be made identical (listed next to the table in results.md and bench/README.md).
NOT_IDENTICAL = [
    "PPO: TRL's PPOTrainer clips no gradients; ours clips the actor's and the critic's at norm 1.0 each.",
    "PPO: TRL adds the RM score on the token after the EOS (when there is room), ours on the EOS itself.",
    "PPO: TRL takes the rollout log-probs from generate's scores; ours recomputes them with a forward pass "
    "(one more pass per rollout, so the ratio is exactly 1 before the first update).",
    "PPO: the same prompts (those util.train_ppo draws with its seeds), but TRL's DataLoader(shuffle=True) groups "
    "them into different batches, and the sampled answers differ (different random streams).",
    "PPO: TRL whitens advantages with the unbiased variance, ours with the biased one; TRL adds 1e-7 to the "
    "temperature. One AdamW with two parameter groups on TRL's side (its API), two AdamW on ours: the same update.",
    "SFT, PPO, DPO, GRPO: ours runs the LM head (a 1111-wide output per token) only at the positions that predict an "
    "answer token (util.label_logits, logits_to_keep), about a fifth of each padded row; TRL's SFTTrainer and "
    "PPOTrainer run it at every position (DPOTrainer and GRPOTrainer use their own fused, chunked head). The same "
    "loss and gradients (unit test); less arithmetic.",
    "SFT/RM: ours includes its own tokenisation and one held-out check (200 rows) at the end of training; TRL's time "
    "includes building its dataset from our token ids and the trainer's set-up. TRL computes its per-step "
    "metrics (entropy, token accuracy / reward stats) as it does by default.",
    "RM: our default recipe adds a rejected-prefix ranking term (rm_prefix_weight=1), which TRL does not have, so the "
    "pair runs ours with rm_prefix_weight=0 (and, as by default, rm_max_rejected=1: each row's own rejected answer "
    "only), and our default recipe is shown in an extra row. "
    "Ours reads each prompt once for its chosen and rejected answers (shared keys/values); TRL runs both "
    "full sequences.",
    "Made identical on purpose (TRL's defaults differ): our AdamW and LR schedule objects are passed to the TRL "
    "trainers; fp32 (TRL defaults to bf16), no gradient checkpointing (TRL defaults to it), the plain NLL loss "
    "(SFTTrainer defaults to a chunked one), TRL's sampler set to sequential over our batch order.",
    "DPO: the same pairs (those util.fit_rows keeps), batches and order, β, sigmoid loss, AdamW + schedule objects, "
    "gradient clipping and frozen SFT reference on both sides; TRL tokenises the text itself (the prompt with the BOS "
    "written in front) and gets our token ids (checked every run). Ours' time includes fit_rows and one held-out "
    "check (200 pairs) at the end; TRL's includes its tokenisation and set-up. TRL computes the log-probs through "
    "its fused, chunked LM head (no full logits tensor) and logs its per-step metrics (entropy, logits, token "
    "accuracy). With dpo_loss='ipo' (not benchmarked) TRL would average the log-ratios per token, ours sums them.",
    "GRPO: the same prompts per iteration (those util.train_grpo draws; TRL's shuffle_dataset off), group size, "
    "minibatch, 2 passes per group (TRL num_iterations), clip range, k3 KL in the loss (TRL beta = grpo_kl_coef), "
    "per-answer mean loss (TRL loss_type='grpo'), advantages (r - group mean) / (unbiased group std + 1e-4), "
    "temperature and the same reward functions (util.exec_rewards + grpo_format_weight × util.format_rewards, passed "
    "as reward_funcs); but the sampled answers differ (different random streams), so the updates do too.",
    "GRPO: ours reshuffles the group into new minibatches for its second pass; TRL shuffles once per group and "
    "reuses the same minibatches in the same order. TRL computes per-token entropy in every loss pass and the "
    "log-probs through its fused LM head; it loads its own reference copy from the SFT directory (GRPOTrainer "
    "takes no ref_model), as train_grpo does. Both times include loading the models; TRL's also its set-up.",
    "GRPO: TRL does not cut prompts, ours keeps their last max_prompt_tokens (112) tokens: the same here, the "
    "longest prompt is 41 tokens. Ours never steps its LR schedule (constant lr); TRL gets the same AdamW with a "
    "constant schedule. Made identical on purpose: TRL's loss_type (default 'dapo'), beta (default 0), dropout off "
    "(its default leaves it on), fp32, no gradient checkpointing.",
]


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def trl_versions(res: dict) -> str:
    """'1.12.0 for SFT, RM, PPO and 1.16.0 for DPO, GRPO': the TRL each pair ran with."""
    by = {}
    for n, v in res.get("pair_versions", {}).items():
        by.setdefault(v["trl"], []).append(n.upper())
    return " and ".join(f"{v} for {', '.join(ns)}" for v, ns in by.items()) or res["versions"]["trl"]


def write_markdown(res: dict, path: Path) -> str:
    m, spec = res["machine"], res["spec"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['gpu']}; torch "
             f"{res['versions']['torch']}, transformers {res['versions']['transformers']}, trl {trl_versions(res)} "
             f"(both sides of a pair in one venv); {spec['rounds']} rounds, ours and TRL interleaved, medians; "
             f"`make bench` wall time {res['total_wall_s'] / 60:.1f} min.", "",
             "| stage | slice (identical both sides) | ours: time / unit | TRL: time / unit | speed-up | "
             "ours: peak RSS | TRL: peak RSS | quality (held-out) ours | TRL |",
             "|---|---|---|---|---|---|---|---|---|"]
    p = res["pairs"]
    if "sft" in p:
        o, r = p["sft"]["ours"], p["sft"]["trl"]
        lines.append(f"| SFT vs `SFTTrainer` | {spec['sft_epochs']} epoch ({res['steps']['sft']} steps of "
                     f"{res['cfg']['sft_batch_size']}) | {fmt(o['seconds_per_unit_median'], 1)} s/epoch | "
                     f"{fmt(r['seconds_per_unit_median'], 1)} s/epoch | "
                     f"**{r['seconds_per_unit_median'] / o['seconds_per_unit_median']:.2f}×** | "
                     f"{o['peak_rss_mb_median']:.0f} MiB | {r['peak_rss_mb_median']:.0f} MiB | loss "
                     f"{fmt(o['quality_median']['heldout_loss'], 4)} | {fmt(r['quality_median']['heldout_loss'], 4)} |")
    if "rm" in p:
        o, r = p["rm"]["ours"], p["rm"]["trl"]
        lines.append(f"| reward model vs `RewardTrainer` | {spec['rm_epochs']} epoch ({res['steps']['rm']} steps of "
                     f"{res['cfg']['rm_batch_size']} pairs) | {fmt(o['seconds_per_unit_median'], 1)} s/epoch | "
                     f"{fmt(r['seconds_per_unit_median'], 1)} s/epoch | "
                     f"**{r['seconds_per_unit_median'] / o['seconds_per_unit_median']:.2f}×** | "
                     f"{o['peak_rss_mb_median']:.0f} MiB | {r['peak_rss_mb_median']:.0f} MiB | pair acc. "
                     f"{fmt(o['quality_median']['heldout_pair_acc'], 3)} | "
                     f"{fmt(r['quality_median']['heldout_pair_acc'], 3)} |")
        if "ours_prefix" in p["rm"]:
            x = p["rm"]["ours_prefix"]
            lines.append(f"| (ours, default recipe: + prefix loss) | same | {fmt(x['seconds_per_unit_median'], 1)} "
                         f"s/epoch | | | {x['peak_rss_mb_median']:.0f} MiB | | pair acc. "
                         f"{fmt(x['quality_median']['heldout_pair_acc'], 3)} | |")
    if "ppo" in p:
        o, r = p["ppo"]["ours"], p["ppo"]["trl"]
        qo, qr = o["quality_median"], r["quality_median"]
        lines.append(f"| PPO vs `PPOTrainer` (1.12) | {spec['ppo_batches']} rollout batches of "
                     f"{res['cfg']['rollout_batch_size']} ({spec['ppo_batches'] * res['cfg']['rollout_batch_size']} "
                     f"episodes) | {fmt(o['seconds_per_unit_median'], 2)} s/batch ({fmt(o['episodes_per_s_median'], 1)} "
                     f"episodes/s) | {fmt(r['seconds_per_unit_median'], 2)} s/batch "
                     f"({fmt(r['episodes_per_s_median'], 1)} episodes/s) | "
                     f"**{o['episodes_per_s_median'] / r['episodes_per_s_median']:.2f}×** | "
                     f"{o['peak_rss_mb_median']:.0f} MiB | {r['peak_rss_mb_median']:.0f} MiB | gold gain "
                     f"{qo['gold_gain_sampled']:+.3f} (exec. acc. {qo['exec_acc_sampled']:.3f}, KL {qo['kl_to_sft']:.2f})"
                     f" | {qr['gold_gain_sampled']:+.3f} ({qr['exec_acc_sampled']:.3f}, KL {qr['kl_to_sft']:.2f}) |")
    if "dpo" in p:
        o, r = p["dpo"]["ours"], p["dpo"]["trl"]
        qo, qr = o["quality_median"], r["quality_median"]
        lines.append(f"| DPO vs `DPOTrainer` (1.16) | {spec['dpo_epochs']} epoch ({res['steps']['dpo']} steps of "
                     f"{res['cfg']['dpo_batch_size']} pairs) | {fmt(o['seconds_per_unit_median'], 1)} s/epoch | "
                     f"{fmt(r['seconds_per_unit_median'], 1)} s/epoch | "
                     f"**{r['seconds_per_unit_median'] / o['seconds_per_unit_median']:.2f}×** | "
                     f"{o['peak_rss_mb_median']:.0f} MiB | {r['peak_rss_mb_median']:.0f} MiB | exec. acc. greedy "
                     f"{qo['exec_acc_greedy']:.3f} ({qo['gold_gain_greedy']:+.3f}), implicit-reward acc. "
                     f"{qo['implicit_reward_acc']:.3f} | {qr['exec_acc_greedy']:.3f} ({qr['gold_gain_greedy']:+.3f}), "
                     f"{qr['implicit_reward_acc']:.3f} |")
    if "grpo" in p:
        o, r = p["grpo"]["ours"], p["grpo"]["trl"]
        qo, qr = o["quality_median"], r["quality_median"]
        c = res["cfg"]
        lines.append(f"| GRPO vs `GRPOTrainer` (1.16) | {spec['grpo_batches']} iterations of {c['grpo_prompts']} "
                     f"prompts × {c['grpo_group_size']} answers "
                     f"({spec['grpo_batches'] * c['grpo_prompts'] * c['grpo_group_size']} completions) | "
                     f"{fmt(o['seconds_per_unit_median'], 2)} s/iteration | {fmt(r['seconds_per_unit_median'], 2)} "
                     f"s/iteration | **{r['seconds_per_unit_median'] / o['seconds_per_unit_median']:.2f}×** | "
                     f"{o['peak_rss_mb_median']:.0f} MiB | {r['peak_rss_mb_median']:.0f} MiB | exec. acc. greedy "
                     f"{qo['exec_acc_greedy']:.3f} ({qo['gold_gain_greedy']:+.3f}, KL {qo['kl_to_sft']:.2f}) | "
                     f"{qr['exec_acc_greedy']:.3f} ({qr['gold_gain_greedy']:+.3f}, KL {qr['kl_to_sft']:.2f}) |")
    floors = [n for n in ("sft", "rm", "ppo") if "floor" in p.get(n, {})]
    if floors:
        unit = {"sft": "s/epoch", "rm": "s/epoch", "ppo": "s/batch"}
        target = {"sft": 1.5, "rm": 1.5, "ppo": 2.0}
        lines += ["", "Floors: the same arithmetic as a bare PyTorch loop, measured in the same rounds (batches "
                  "tokenised and padded before the clock starts; then forward, loss, backward, clip, AdamW step and "
                  "nothing else: no checks, logging, held-out curve or data preparation; `w_*_floor` in "
                  "bench/bench.py). No eager PyTorch implementation of that arithmetic can beat its floor on this "
                  "machine (and torch.compile did not make the SFT steps faster here: see bench/README.md), so TRL's time "
                  "/ floor is the highest speed-up over TRL possible without changing the work.", "",
                  "| stage | floor (arithmetic) | floor | ours | TRL | ours / floor | TRL / floor = highest possible "
                  "speed-up | target |", "|---|---|---|---|---|---|---|---|"]
        what = {"sft": f"the same {res['steps'].get('sft', '')} steps: forward, cross-entropy with the LM head at the answer positions only, backward, clip, step",
                "rm": "ours: each prompt read once (`util.shared_prompt_scores`), pairwise loss at the EOS",
                "ppo": "bare `generate` + 3 no-grad passes (TRL's count) + 4 epochs × 4 minibatches of actor and "
                       "critic forward/backward/step"}
        for n in floors:
            f, o, r = (p[n][k]["seconds_per_unit_median"] for k in ("floor", "ours", "trl"))
            lines.append(f"| {n.upper()} | {what[n]} | {f:.{1 if n != 'ppo' else 2}f} {unit[n]} | "
                         f"{o:.{1 if n != 'ppo' else 2}f} | {r:.{1 if n != 'ppo' else 2}f} | {o / f:.2f}× | "
                         f"**{r / f:.2f}×** | {target[n]:.1f}× |")
            if n == "rm" and "floor_full" in p[n]:
                ff = p[n]["floor_full"]["seconds_per_unit_median"]
                lines.append(f"| RM | TRL's arithmetic: chosen and rejected as two full sequences | {ff:.1f} "
                             f"{unit[n]} | | {r:.1f} | | {r / ff:.2f}× (TRL over its own floor) | |")
    if {"dpo", "grpo"} & set(p):
        same = all(x.get("same_token_ids", True) for n in ("dpo", "grpo") for x in res["raw"].get(n, {}).get("trl", []))
        lines += ["", "DPO and GRPO quality: execution accuracy of greedy answers on the held-out prompts (in brackets: "
                  "the change from the SFT start, and for GRPO the KL to it); DPO also the implicit-reward accuracy "
                  f"on the held-out pairs. TRL's own tokenisation gave our token ids in every run: {same}."]
    if "gen" in res:
        g = res["gen"]
        v = g["variants"]
        lines += ["", f"Rollout generation, one batch of {g['batch']} prompts, up to {g['max_new_tokens']} new tokens, "
                  f"T={res['cfg']['temperature']}, KV cache, median of {g['repeats']} calls (tokens = answer tokens "
                  "up to EOS):", "", "| path | tokens/s | s / batch | vs bare `generate` |", "|---|---|---|---|"]
        base = v["bare_generate"]["tokens_per_s"]
        label = {"bare_generate": "bare `model.generate` (pre-encoded ids)",
                 "ours_generate": "ours: `util.generate` (what `rollout` calls: encode, pad, generate)",
                 "trl_generate": "TRL PPO `batch_generation` (keeps per-step scores)",
                 "ours_rollout": "ours: full `util.rollout` (generate + 4 scoring passes + decode + sqlite)"}
        for k in ("bare_generate", "ours_generate", "trl_generate", "ours_rollout"):
            x = v[k]
            lines.append(f"| {label[k]} | {x['tokens_per_s']:.0f} | {x['seconds_median']:.3f} | "
                         f"{(base / x['tokens_per_s'] - 1) * 100:+.1f} % |")
        lines += ["", f"Same tokens from `util.generate` and bare `generate` (same seed): {g['ours_equals_bare_tokens']}. "
                  f"What `util.generate` adds, `util.encode_prompts` for the batch: "
                  f"{g['encode_prompts_s_median'] * 1000:.1f} ms. Full rollout per batch: " + ", ".join(
                      f"{k} {v:.3f} s" for k, v in g["rollout_phases_s_per_call"].items())
                  + " (score = 4 forward passes, decode, sqlite). TRL's `get_reward` and `util.reward_scores` "
                  f"agree on the same batch to {g['rm_score_max_abs_diff_trl_vs_ours']:.1e}."]
    lines += ["", "Not identical between the two sides:", ""] + [f"* {x}" for x in NOT_IDENTICAL]
    lines += ["", "Targets:", ""] if res["targets"] else []
    for name, t in res["targets"].items():
        figs = ", ".join(f"{k} {v:.3f}" for k, v in t.items() if isinstance(v, float))
        lines.append(f"* {name}: **{'met' if t['met'] else 'missed'}** ({figs}; rule: {t['rule']})")
    if res.get("skipped"):
        lines += ["", "Not run yet: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items())]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = res["pairs"]
    names = [n for n in ("sft", "rm", "ppo", "dpo", "grpo") if n in p]
    labels = {"sft": "SFT\n(s / epoch)", "rm": "reward model\n(s / epoch)", "ppo": "PPO\n(s / batch)",
              "dpo": "DPO\n(s / epoch)", "grpo": "GRPO\n(s / iteration)"}
    targets = {"sft": 1.5, "rm": 1.5, "ppo": 2.0}          # the issue's; none for DPO and GRPO
    fig, axes = plt.subplots(1, 3, figsize=(max(13, 4.5 + 2.3 * len(names)), 3.8))
    x = range(len(names))
    for ax, key, title in ((axes[0], "seconds_per_unit_median", "time per unit of work (lower is better)"),
                           (axes[1], "peak_rss_mb_median", "peak RSS, MiB (lower is better)")):
        o = [p[n]["ours"][key] for n in names]
        t = [p[n]["trl"][key] for n in names]
        ax.bar([i - 0.2 for i in x], o, 0.4, label="tiny-rlhf")
        ax.bar([i + 0.2 for i in x], t, 0.4, label="TRL")
        ax.set_xticks(list(x), [labels[n] for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    # speed-up per stage, with the target
    sp = [p[n]["trl"]["seconds_per_unit_median"] / p[n]["ours"]["seconds_per_unit_median"] for n in names]
    axes[2].bar(list(x), sp, 0.5, color="C2")
    for i, n in enumerate(names):
        if n in targets:
            axes[2].hlines(targets[n], i - 0.3, i + 0.3, colors="k", linestyles="--")
        axes[2].text(i, sp[i], f"{sp[i]:.2f}×", ha="center", va="bottom", fontsize=9)
        if ceiling(p, n) is not None:           # the most the same arithmetic allows (TRL / bare-loop floor)
            axes[2].plot([i], [ceiling(p, n)], marker="v", color="k", ms=8, ls="none",
                         label="highest possible (TRL / floor)" if i == 0 else None)
    axes[2].set_xticks(list(x), [labels[n].split("\n")[0] for n in names])
    axes[2].set_title("speed-up over TRL (dashed: target; ▼: TRL / floor)", fontsize=10)
    axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(f"tiny-rlhf vs TRL {trl_versions(res)}, same work, {res['machine']['cpu']}, "
                 f"{res['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(md: str) -> None:
    """Replace the block between the bench markers in bench/README.md with the new table."""
    readme = ROOT / "bench" / "README.md"
    text = readme.read_text()
    a, b = "<!-- bench:start -->", "<!-- bench:end -->"
    if a in text and b in text:
        head, rest = text.split(a, 1)
        _, tail = rest.split(b, 1)
        readme.write_text(head + a + "\n" + md + b + tail)


def orchestrate(a) -> int:
    spec_name = "quick" if a.quick else "full"
    spec = dict(SPECS[spec_name])
    if a.rounds:
        spec["rounds"] = a.rounds
    out = BENCH / spec["out"]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"bench ({spec_name}): {json.dumps(spec)}", flush=True)

    start = out / "start"
    fp = start_fingerprint(SPECS[spec_name])
    ready = start / "ready.json"
    if ready.exists() and json.loads(ready.read_text()).get("fingerprint") == fp:
        setup = json.loads(ready.read_text())["setup"]
        print(f"starting points reused from {start} (delete it to retrain)", flush=True)
    else:
        print("training the starting points once (SFT actor, reward model) with our pipeline ...", flush=True)
        setup = run_worker("setup", "ours", 0, spec_name, logs, "setup")
        ready.write_text(json.dumps({"fingerprint": fp, "setup": setup}, indent=1))
        print(f"  done in {setup['seconds']:.0f} s", flush=True)

    import util
    cfg = util.get_config(spec["preset"])
    pairs = {}
    skipped = {}
    sides = {"sft": ["ours", "trl", "floor"], "rm": ["ours", "trl", "ours_prefix", "floor", "floor_full"],
             "ppo": ["ours", "trl", "floor"],
             "dpo": ["ours", "trl"], "grpo": ["ours", "trl"]}
    for pr in PAIRS:
        if pr.needs and not hasattr(util, pr.needs):
            skipped[pr.name] = f"util.{pr.needs} does not exist yet; hook in bench/bench.py PAIRS"
        elif pr.name not in sides:          # the stage exists, its benchmark workers are not written yet
            skipped[pr.name] = f"{pr.ours} exists but its workers against {pr.trl} are not written yet (PAIRS)"
        elif pr.name in a.only or not a.only:
            pairs[pr.name] = pr
    runs = {n: {s: [] for s in sides[n]} for n in pairs}
    gens = []
    for rnd in range(spec["rounds"]):
        seed = rnd
        for n in pairs:
            order = sides[n][:2] if rnd % 2 == 0 else sides[n][:2][::-1]     # ABBA: ours first, then TRL first
            order += sides[n][2:]
            for side in order:
                res = run_worker(n, side, seed, spec_name, logs, f"{n}-{side}-r{rnd}", pairs[n].python())
                runs[n][side].append(res)
                q = ", ".join(f"{k} {v:.3f}" for k, v in res["quality"].items())
                print(f"round {rnd + 1}/{spec['rounds']}  {n:4s} {side:11s} {res['seconds']:7.1f} s  "
                      f"peak {res['peak_rss_mb']:6.0f} MiB  {q}", flush=True)
        if not a.only or "gen" in a.only:
            g = run_worker("gen", "ours", seed, spec_name, logs, f"gen-r{rnd}")
            gens.append(g)
            v = g["variants"]
            print(f"round {rnd + 1}/{spec['rounds']}  gen  " + "  ".join(
                f"{k} {x['tokens_per_s']:.0f} tok/s" for k, x in v.items()), flush=True)

    res = {"spec": spec, "spec_name": spec_name, "machine": machine(), "setup": setup,
           "versions": (runs[next(iter(runs))]["ours"][0] if runs else gens[0])["versions"],
           "pair_versions": {n: s["ours"][0]["versions"] for n, s in runs.items()},
           "cfg": dataclasses.asdict(cfg), "steps": {}, "pairs": {}, "skipped": skipped,
           "raw": {n: s for n, s in runs.items()}}
    for n, by_side in runs.items():
        res["pairs"][n] = {s: summarise(r) for s, r in by_side.items() if r}
        if "steps" in by_side["ours"][0]:
            res["steps"][n] = by_side["ours"][0]["steps"]
    if gens:
        variants = {k: {f: median([g["variants"][k][f] for g in gens]) for f in gens[0]["variants"][k]}
                    for k in gens[0]["variants"]}
        res["gen"] = {**{k: gens[0][k] for k in ("batch", "max_new_tokens", "repeats")}, "variants": variants,
                      "ours_equals_bare_tokens": all(g["ours_equals_bare_tokens"] for g in gens),
                      "encode_prompts_s_median": median([g["encode_prompts_s_median"] for g in gens]),
                      "rollout_phases_s_per_call": {k: median([g["rollout_phases_s_per_call"][k] for g in gens])
                                                    for k in gens[0]["rollout_phases_s_per_call"]},
                      "rm_score_max_abs_diff_trl_vs_ours": max(g["rm_score_max_abs_diff_trl_vs_ours"] for g in gens),
                      "raw": gens}
        res["gen"]["repeats"] = res["gen"]["repeats"] * len(gens)
    res["targets"] = evaluate_targets(res)
    res["total_wall_s"] = time.perf_counter() - t_start
    name = spec["results"]
    util.write_json(res, BENCH / f"{name}.json")
    md = write_markdown(res, BENCH / f"{name}.md")
    if res["pairs"]:
        plot(res, BENCH / f"{name}.png")
    if not a.quick and not a.only and not a.rounds:
        update_readme(md)
    print("\n" + md)
    print(f"wrote {BENCH / (name + '.json')}, .md, .png; total {res['total_wall_s'] / 60:.1f} min")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="one measurement (used by the orchestrator)")
    w.add_argument("task")
    w.add_argument("side")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--spec", default="full", choices=sorted(SPECS))
    w.add_argument("--result", required=True)
    w.add_argument("--profile", default="", help="write a cProfile summary of the worker to this file")
    ap.add_argument("--quick", action="store_true", help="smoke preset, 2 rounds: checks the harness end to end")
    ap.add_argument("--rounds", type=int, default=0, help="override the number of rounds")
    ap.add_argument("--only", nargs="*", default=[], help="run only these pairs (sft rm ppo dpo grpo gen)")
    a = ap.parse_args(argv)
    if a.cmd == "worker":
        return worker_main(a)
    if os.environ.get("BENCH_QUICK"):
        a.quick = True
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
