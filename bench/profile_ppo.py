"""Where PPO's time goes, ours and TRL's, and what the two LM-head fixes adopted in util.py bought (measured here by
patching the functions they replaced back into util, in this process only; util.py itself is not changed).

    bench/.venv/bin/python bench/profile_ppo.py        # after `make bench` (uses its starting points)

Writes bench/profile.md and bench/profile.json:
  1. phase split of our PPO iteration (generate / score / train) and per-op CPU time (torch.profiler), grouped:
     matrix multiplies, attention, softmax family, optimizer, the rest; the same for TRL's PPOTrainer.train();
  2. fix B, adopted in util: util.response_logprobs asks the model for the response positions' logits only
     (transformers' logits_to_keep); measured against the full head it replaced (patched back in this process):
     PPO seconds per rollout batch, and the largest log-prob difference;
  3. fix C, adopted in util: util.sft_loss applies the LM head at the response positions only (util.label_logits);
     measured against transformers' full-head loss it replaced.
(Fix A, util.encode_prompts tokenising the batch in one call, was adopted in 42cf003; results.md's rollout table
measures util.generate against bare generate.)
`profile_ppo.py fix_c` (or any of the part names) runs one part and prints it.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402

START = BENCH / "out" / "start"
SPEC = bench.SPECS["full"]
GROUPS = [("matrix multiplies (forward + backward)", ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm")),
          ("attention kernels", ("attention", "sdpa", "flash")),
          ("softmax / log-softmax / entropy", ("softmax", "log_softmax", "logsumexp", "_softmax")),
          ("optimizer (AdamW)", ("adam", "_foreach", "lerp", "addcdiv", "addcmul")),
          ("embedding / layer norm", ("embedding", "layer_norm", "native_layer_norm")),
          ]


def group_ops(prof) -> dict:
    """Self CPU time by op group, seconds, and the share of the total."""
    tot, out = 0.0, {g: 0.0 for g, _ in GROUPS}
    out["everything else (elementwise, copies, python)"] = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6
        tot += t
        name = e.key.lower()
        for g, keys in GROUPS:
            if any(k in name for k in keys):
                out[g] += t
                break
        else:
            out["everything else (elementwise, copies, python)"] += t
    return {k: {"s": v, "share": v / tot if tot else 0.0} for k, v in out.items()}


def profile_ours(n_iters: int = 2) -> dict:
    import util
    from torch.profiler import ProfilerActivity, profile
    cfg = bench.make_cfg(SPEC, 0, START)
    train, _ = bench.load_data(cfg)
    tok = util.load_tokenizer(START / "actor")
    models = {"actor": util.load_causal_lm(START / "actor"), "ref": util.load_causal_lm(START / "actor"),
              "critic": util.load_score_model(START / "critic"), "rm": util.load_score_model(START / "critic")}
    opts = {"actor": util.make_optimizer(models["actor"], cfg.ppo_lr, 1, warmup=0)[0],
            "critic": util.make_optimizer(models["critic"], cfg.ppo_vf_lr, 1, warmup=0)[0]}
    rows = bench.ppo_prompt_rows(train, cfg, n_iters + 1)
    bs = cfg.rollout_batch_size
    util.ppo_iteration(models, opts, tok, rows[:bs], cfg, cfg.kl_coef)            # warm-up
    phases = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(1, n_iters + 1):
            rec = util.ppo_iteration(models, opts, tok, rows[i * bs:(i + 1) * bs], cfg, cfg.kl_coef)
            phases.append({k: rec[f"time_{k}"] for k in ("generate", "score", "train")})
        wall = time.perf_counter() - t0
    return {"iterations": n_iters, "wall_s_profiled": wall,
            "phases_s_per_iter": {k: statistics.mean(p[k] for p in phases) for k in phases[0]},
            "op_groups": group_ops(prof),
            "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)}


def profile_trl(n_batches: int = 2) -> dict:
    import torch
    import util
    from torch.profiler import ProfilerActivity, profile
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    cfg = bench.make_cfg(SPEC, 0, START)
    train, _ = bench.load_data(cfg)
    tok = util.load_tokenizer(START / "actor")
    tok.padding_side = "left"
    policy, ref = util.load_causal_lm(START / "actor"), util.load_causal_lm(START / "actor").requires_grad_(False)
    value, rm = util.load_score_model(START / "critic"), util.load_score_model(START / "critic").requires_grad_(False)
    rm.score = bench.OffsetScore(rm)
    value.score = bench.OffsetScore(value, clip=False)   # the critic on the rewards scale, as ours
    prompts = bench.ppo_prompt_rows(train, cfg, n_batches)
    ds = Dataset.from_dict({"input_ids": [util.encode_prompt(tok, r["prompt"])[-cfg.max_prompt_tokens:] for r in prompts]})
    opt = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": cfg.ppo_lr},
                             {"params": list(value.parameters()), "lr": cfg.ppo_vf_lr}], betas=(0.9, 0.95),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(output_dir=tmp, per_device_train_batch_size=cfg.rollout_batch_size,
                         num_mini_batches=cfg.rollout_batch_size // cfg.ppo_minibatch_size,
                         num_ppo_epochs=cfg.ppo_epochs, total_episodes=n_batches * cfg.rollout_batch_size,
                         local_rollout_forward_batch_size=cfg.rollout_batch_size,
                         response_length=cfg.max_response_tokens, stop_token="eos", temperature=cfg.temperature,
                         missing_eos_penalty=cfg.missing_eos_penalty, kl_coef=cfg.kl_coef, num_sample_generations=0,
                         gradient_checkpointing=False, bf16=False, report_to="none", save_strategy="no",
                         disable_tqdm=True, use_cpu=True)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             train_dataset=ds, value_model=value, eval_dataset=ds.select(range(8)),
                             optimizers=(opt, sched))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
    return {"batches": n_batches, "wall_s_profiled": wall, "op_groups": group_ops(prof),
            "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)}


# ---------------------------------------------------------------------------- adopted fixes against what they replaced


def forget_earlier_garbage() -> None:
    """Collect, then freeze what is left, so that what earlier runs in this process left behind is not scanned again
    by the next run's garbage collections (without it, an in-process run's timing depends on what ran before: the
    RM's data preparation, profile_train's third worker, took 6.5 s instead of 1.0 s)."""
    gc.collect()
    gc.freeze()


def response_logprobs_full(model, query_responses, attention_mask, context_length, temperature=1.0):
    """Before fix B: the LM head at every position, then the response positions sliced out."""
    import util
    logits = model(input_ids=query_responses, attention_mask=attention_mask).logits[:, context_length - 1:-1]
    return util.logprobs_from_logits(logits, query_responses[:, context_length:], temperature), logits


def fix_b(n_batches: int = 6, repeats: int = 2) -> dict:
    import torch
    import util
    cfg = bench.make_cfg(SPEC, 0, START)
    train, _ = bench.load_data(cfg)
    # exactness: the same log-probs from the full logits and from the kept ones
    tok = util.load_tokenizer(START / "actor")
    actor = util.load_causal_lm(START / "actor")
    rows = bench.ppo_prompt_rows(train, cfg, 1)
    qr, pmask, lq = util.generate(actor, tok, [r["prompt"] for r in rows], cfg)
    attn = torch.cat([pmask, util.response_mask(qr[:, lq:], tok.eos_token_id)], 1)
    with torch.no_grad():
        a, _ = util.response_logprobs(actor, qr, attn, lq, cfg.temperature)
        b, _ = response_logprobs_full(actor, qr, attn, lq, cfg.temperature)
    diff = float((a - b).abs().max())
    original = util.response_logprobs
    times = {"full head (before)": [], "fix B (util now)": []}
    gold = {k: [] for k in times}
    for rep in range(repeats):
        for k in (list(times) if rep % 2 == 0 else list(times)[::-1]):
            util.response_logprobs = response_logprobs_full if k.startswith("full") else original
            with tempfile.TemporaryDirectory() as tmp:
                c = bench.make_cfg(SPEC, 0, tmp)
                c.ppo_iterations, c.save_every = n_batches, 10**9
                for d in ("actor", "critic"):
                    Path(tmp, d).symlink_to(START / d, target_is_directory=True)
                forget_earlier_garbage()
                t0 = time.perf_counter()
                hist = util.train_ppo(c, "cpu", rows=train)
                times[k].append((time.perf_counter() - t0) / n_batches)
                gold[k].append([h["gold_acc"] for h in hist])
            util.response_logprobs = original
    return {"max_abs_logprob_diff": diff, "batches": n_batches, "repeats": repeats,
            "s_per_batch_median": {k: statistics.median(v) for k, v in times.items()},
            "rollout_gold_acc_per_iteration": gold}


def sft_loss_full(model, batch, device):
    """Before fix C: transformers' own loss, the LM head and the cross-entropy at every position."""
    ids, mask, labels = (t.to(device) for t in batch)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def fix_c(epochs: float = 0.25, repeats: int = 2) -> dict:
    import torch
    import util
    cfg = bench.make_cfg(SPEC, 0, START)
    cfg.sft_epochs = epochs
    train, ev = bench.load_data(cfg)
    tok = util.load_tokenizer(START / "base_actor")
    m = util.load_causal_lm(START / "base_actor")
    b = util.right_pad_batch([util.sft_example(tok, r["prompt"], r["response"], cfg.max_prompt_tokens,
                                               cfg.max_response_tokens) for r in train[:32]], tok.pad_token_id)
    with torch.no_grad():
        diff = abs(float(util.sft_loss(m, b, "cpu")) - float(sft_loss_full(m, b, "cpu")))
    original = util.sft_loss
    times = {"full head (before)": [], "fix C (util now)": []}
    loss = {k: [] for k in times}
    for rep in range(repeats):
        for k in (list(times) if rep % 2 == 0 else list(times)[::-1]):
            util.sft_loss = sft_loss_full if k.startswith("full") else original
            model = util.load_causal_lm(START / "base_actor")
            forget_earlier_garbage()
            t0 = time.perf_counter()
            util.train_sft(model, tok, train, ev, cfg, "cpu", n_logs=1)
            times[k].append((time.perf_counter() - t0) / epochs)
            util.sft_loss = original
            loss[k].append(bench.sft_quality(model, tok, ev, cfg)["heldout_loss"])
    return {"loss_abs_diff_one_batch": diff, "epochs": epochs, "repeats": repeats,
            "s_per_epoch_median": {k: statistics.median(v) for k, v in times.items()},
            "heldout_loss": loss}


def main() -> int:
    bench.quiet()
    if not (START / "critic").exists():
        print("run `make bench` first (it trains the starting points into bench/out/start)")
        return 1
    only = sys.argv[1:]
    if only:                                # e.g. `profile_ppo.py fix_c`: one part, printed
        print(json.dumps({k: globals()[k]() for k in only}, indent=1, default=str))
        return 0
    res = {"ours": profile_ours(), "trl": profile_trl(), "fix_b": fix_b(), "fix_c": fix_c()}
    Path(BENCH / "profile.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "top_ops"}
                                                        for k, v in res.items()}, indent=1))
    o, t = res["ours"], res["trl"]
    lines = ["# Where PPO's time goes (tiny preset, one rollout batch of 64, 4 PPO epochs x 4 minibatches of 16)", "",
             f"Ours: {o['wall_s_profiled'] / o['iterations']:.2f} s per iteration under the profiler; phases per "
             "iteration: " + ", ".join(f"{k} {v:.2f} s" for k, v in o["phases_s_per_iter"].items()) + ".",
             f"TRL PPOTrainer: {t['wall_s_profiled'] / t['batches']:.2f} s per rollout batch under the profiler.", "",
             "Self CPU time by op group (torch.profiler):", "", "| op group | ours | TRL |", "|---|---|---|"]
    for g in o["op_groups"]:
        lines.append(f"| {g} | {o['op_groups'][g]['share'] * 100:.0f} % | {t['op_groups'][g]['share'] * 100:.0f} % |")
    b = res["fix_b"]
    lines += ["", "## Fix B (adopted): `util.response_logprobs` computes logits at the response positions only", "",
              f"Largest log-prob difference against the full head: {b['max_abs_logprob_diff']:.2e}. "
              f"util.train_ppo, {b['batches']} rollout batches, {b['repeats']} runs each, interleaved: " + ", ".join(
                  f"{k} {v:.2f} s/batch" for k, v in b["s_per_batch_median"].items()) + ".", "",
              "## Fix C (adopted, SFT): `util.sft_loss` applies the LM head at the response positions only", "",
              f"Loss difference against the full head on one batch: {res['fix_c']['loss_abs_diff_one_batch']:.2e}. util.train_sft, "
              f"{res['fix_c']['epochs']} epoch, {res['fix_c']['repeats']} runs each, interleaved: " + ", ".join(
                  f"{k} {v:.1f} s/epoch" for k, v in res["fix_c"]["s_per_epoch_median"].items())
              + "; held-out loss " + ", ".join(f"{k} {v}" for k, v in res["fix_c"]["heldout_loss"].items()) + ".", "",
              "## Top ops, ours", "", "```", o["top_ops"], "```", "", "## Top ops, TRL", "", "```", t["top_ops"], "```"]
    Path(BENCH / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
