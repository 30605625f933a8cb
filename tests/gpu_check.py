"""GPU check of the `opt` preset: every stage for a few steps, per precision, with peak memory and step times.

    python tests/gpu_check.py --out gpu_check.json     # on a CUDA GPU: bf16 (if the GPU has it) and fp16
    python tests/gpu_check.py --estimate               # no GPU needed: the estimated memory/time table (README)
    python tests/gpu_check.py --check-estimate         # CPU, seconds: the estimate's activation terms vs autograd's
    python tests/gpu_check.py --device cpu --small --steps 2    # validates this script on a CPU in a few minutes

A script, not part of `make test`: pytest does not collect it (its name does not start with test_ and nothing in
it is named test_*). It needs no model hub: it builds opt-350m- and opt-125m-shaped OPT models with RANDOM weights
(the real dimensions), saves them as the hub stores them (float16 safetensors, "torch_dtype"/"dtype" float16 in
config.json, with the shipped tokenizer/ beside them), then for each precision runs sft, rm, ppo, dpo and grpo
through util.get_config("opt", actor_hub=..., critic_hub=...) + util.run_stage, and util.evaluate_policy, each
precision in its own process and its own out_dir. It prints one row per stage and precision: peak GPU memory
allocated by PyTorch (torch.cuda.max_memory_allocated, reset before each stage; the CUDA context, ~0.3-0.5 GiB,
comes on top), seconds per optimizer step (sft, rm, dpo: median gap between optimizer steps, the first excluded)
or per iteration (ppo, grpo: the last iteration's own timings), whether the final loss is finite, and whether
every optimizer held fp32 (master) weights. --out also writes the rows as JSON. The exit status is 1 when a stage
failed or ended with a non-finite loss.

Random weights and the shipped tokenizer (1111 tokens, so prompts of ~36 tokens and answers of ~11 instead of
the up to 112 + 24 the opt preset allows with OPT's own tokenizer): the measured memory and times are those of
shorter sequences than a real run; --estimate models the real run's lengths. Default settings (4 optimizer steps
of sft/rm/dpo, 2 iterations of ppo/grpo, 64 evaluation prompts): by the estimate's arithmetic a few seconds of
GPU work per stage, so loading and saving dominate; meant to take under 5 min on an H100/H200 (both precisions)
and under 10 on a T4 (fp16 only: a T4 has no bf16), not yet timed on either. The stage outputs (~12 GB per
precision at the real dimensions: PPO saves its optimizer states) go to a temporary directory, each precision's
removed when it is done (--keep keeps them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sft", "rm", "ppo", "dpo", "grpo", "eval"]
GIB = 2 ** 30

# ============================================================================ model shapes

COMMON = dict(vocab_size=50272, max_position_embeddings=2048, dropout=0.1, attention_dropout=0.0,
              activation_dropout=0.0, activation_function="relu", enable_bias=True, init_std=0.02)
SHAPES = {  # the hub configs' dimensions (facebook/opt-350m, facebook/opt-125m)
    "actor": dict(hidden_size=1024, word_embed_proj_dim=512, num_hidden_layers=24, num_attention_heads=16,
                  ffn_dim=4096, do_layer_norm_before=False),
    "critic": dict(hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12, num_attention_heads=12,
                   ffn_dim=3072, do_layer_norm_before=True),
}
SMALL = {   # --small: the same two code paths (post-LN with project_in/out; pre-LN without), tiny dimensions and a
    # vocabulary of 2048 (>= the shipped tokenizer's 1111 tokens; 50272 makes the LM head most of a CPU run)
    "actor": dict(vocab_size=2048, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2,
                  num_attention_heads=4, ffn_dim=256, do_layer_norm_before=False),
    "critic": dict(vocab_size=2048, hidden_size=48, word_embed_proj_dim=48, num_hidden_layers=2,
                   num_attention_heads=4, ffn_dim=192, do_layer_norm_before=True),
}


def shape(role: str, small: bool = False) -> dict:
    """OPTConfig keyword arguments of the actor or critic (opt-350m / opt-125m, or the --small stand-ins)."""
    return {**COMMON, **(SMALL if small else SHAPES)[role]}


def param_count(s: dict, score_head: bool = False) -> int:
    """Parameters of an OPT model of shape `s` (as model.num_parameters() counts them: the LM head is tied to the
    token embedding). score_head: OPTForSequenceClassification (a scalar head on word_embed_proj_dim, no bias)."""
    h, p, L, f, V = (s["hidden_size"], s["word_embed_proj_dim"], s["num_hidden_layers"], s["ffn_dim"],
                     s["vocab_size"])
    embeddings = V * p + (s["max_position_embeddings"] + 2) * h    # OPT's learned positions are offset by 2
    projections = 2 * p * h if p != h else 0                       # project_in / project_out, no bias
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h  # q, k, v, out; fc1, fc2; two LayerNorms
    final_norm = 2 * h if s["do_layer_norm_before"] else 0         # opt-350m (post-LN) has none
    return embeddings + projections + L * layer + final_norm + (p if score_head else 0)


def matmul_params(s: dict) -> int:
    """Weights multiplied once per token by the transformer body (layers + projections; no embeddings, no head)."""
    h, p, L, f = s["hidden_size"], s["word_embed_proj_dim"], s["num_hidden_layers"], s["ffn_dim"]
    return L * (4 * h * h + 2 * h * f) + (2 * p * h if p != h else 0)

# ============================================================================ the estimate (no GPU needed)


GPUS = {    # name: (realistic half-precision matmul throughput FLOP/s, memory bandwidth B/s, memory GiB)
    "T4": (25e12, 320e9, 15.0),        # 65 TFLOP/s fp16 peak; no bf16, so fp16 + loss scaling
    "A100 40GB": (120e12, 1.5e12, 39.4),   # 312 TFLOP/s bf16 peak
}
# ASSUMPTIONS, not from the shapes: the host's time to launch one decoder layer's kernels in eager PyTorch +
# transformers (~20 ops), the floor of any pass (a pass can be no faster than layers x this); and transformers'
# generate loop per token (logits processing, sampling, stopping). This 2-core EPYC spends 0.14-0.18 ms per layer
# and ~0.6 ms per generate step on a 24-layer OPT of width 16 (host cost alone); CUDA launches add to it.
DISPATCH_S = 0.25e-3
GENERATE_STEP_S = 2e-3


def estimate(rows_sft: int = 6000, rows_pairs: int = 6000, n_eval: int = 600) -> list[dict]:
    """Estimated peak GPU memory (GiB) and minutes per stage of the `opt` preset on each of GPUS, from the model
    shapes and the preset's batch sizes. Every figure is an estimate: no GPU was measured. Assumptions, each term
    explained where it is added: weights and AdamW states fp32 (trained: 4 B weight + 4 B grad + 8 B AdamW per
    parameter; frozen reference/reward models: 4 B), forwards under autocast (16-bit activations and a 16-bit copy
    of each weight), every sequence padded to max_prompt + max_response = 136 tokens, SDPA attention (no seq^2
    tensor kept), batches split into micro-batches of 8 (gradient accumulation). Times: compute at a realistic
    throughput plus memory traffic at full bandwidth, no overlap between the two; loading, saving and the sqlite
    checks of answers are left out."""
    a, c = shape("actor"), shape("critic")
    Na, Nc = param_count(a), param_count(c, score_head=True)
    V, Lp, Lr, mb = a["vocab_size"], 112, 24, 8
    s = Lp + Lr                                                    # 136: every sequence padded to the longest

    def act_bytes(m, tokens):
        # activations kept for backward per token per layer, 16-bit under autocast unless said:
        #   attention block: residual/LayerNorm input fp32 4h, q/k/v projection input 2h, q, k, v 6h,
        #                    out_proj input (SDPA output) 2h                               = 14h
        #   MLP block:       LayerNorm input fp32 4h, fc1 input 2h, ReLU output = fc2 input 2*4h(ffn) = 6h + 2f
        # (dropout is off, so no masks; SDPA keeps only a logsumexp per head and token, not the seq^2 scores)
        return tokens * m["num_hidden_layers"] * (20 * m["hidden_size"] + 2 * m["ffn_dim"])

    def kv_bytes(m, batch, length):
        # KV cache of generation: keys and values (2) of every layer, 16-bit, for every token of every row
        return batch * length * m["num_hidden_layers"] * 2 * m["hidden_size"] * 2

    def logit_bytes(rows, tokens, per_element):
        # the LM head runs on the answer positions only (util.label_logits / logits_to_keep): rows x tokens x
        # vocab elements; per_element: 16-bit logits 2 B + fp32 upcast 4 B + fp32 log-softmax 4 B = 10 B in a
        # no-grad scoring pass; + 4 B (log-softmax kept for backward) when training
        return rows * tokens * V * per_element

    trained = lambda n: 16 * n          # fp32 weight 4 B + fp32 grad 4 B + AdamW exp_avg, exp_avg_sq 8 B
    frozen = lambda n: 4 * n            # fp32 weights only (reference policy, reward model)
    cast = lambda n: 2 * n              # autocast's 16-bit copy of a trained model's weights (kept in its cache
                                        # while the forward's graph lives; frozen models' copies are per layer)
    adam_tmp = lambda n: 4 * n          # foreach AdamW's temporaries at the step (sqrt(exp_avg_sq): one fp32 copy)

    mem = {
        # SFT: the actor trains; one micro-batch of 8 rows in flight; or the optimizer step after it
        "sft": max(trained(Na) + cast(Na) + act_bytes(a, mb * s) + logit_bytes(mb, Lr, 14),
                   trained(Na) + adam_tmp(Na)),
        # RM: the critic trains on micro-batches of 8 prompts, each read once (its KV cache shared by the chosen
        # and the rejected answer: 8 x (112 + 2 x 24) tokens); then the reward offset: the SFT actor generates for
        # 64 prompts at a time while the trained critic stays loaded (weights + its last gradients: 8 B)
        "rm": max(trained(Nc) + cast(Nc) + act_bytes(c, mb * (Lp + 2 * Lr)) + kv_bytes(c, 2 * mb, Lp),
                  8 * Nc + frozen(Na) + cast(Na) + kv_bytes(a, 64, s)),
        # PPO: actor + critic train, reference + reward model frozen. Rollout: generate 64 answers (KV cache) and
        # score them in one no-grad pass each (logits of 64 x 25 positions); update: actor and critic graphs of one
        # micro-batch alive together (one backward for pg + vf loss), + the entropy's softmax in fp32 (8 B)
        "ppo": trained(Na) + trained(Nc) + frozen(Na) + frozen(Nc) + max(
            cast(Na) + kv_bytes(a, 64, s) + logit_bytes(64, Lr + 1, 10),
            cast(Na) + cast(Nc) + act_bytes(a, mb * s) + act_bytes(c, mb * s) + logit_bytes(mb, Lr + 1, 22),
            adam_tmp(Na)),
        # DPO: the actor trains on micro-batches of 8 pairs = 16 sequences (chosen + rejected), the reference
        # (frozen copy of the SFT actor) runs no-grad on the same 16
        "dpo": trained(Na) + frozen(Na) + max(cast(Na) + act_bytes(a, 2 * mb * s) + logit_bytes(2 * mb, Lr, 14),
                                              adam_tmp(Na)),
        # GRPO: 16 prompts x 8 answers = 128 sequences generated at once (KV cache) and scored no-grad by actor and
        # reference; the update runs micro-batches of 8
        "grpo": trained(Na) + frozen(Na) + max(cast(Na) + kv_bytes(a, 128, s) + logit_bytes(128, Lr + 1, 10),
                                               cast(Na) + act_bytes(a, mb * s) + logit_bytes(mb, Lr + 1, 14),
                                               adam_tmp(Na)),
        # evaluation of one policy as 4_test does it: policy, SFT reference and reward model loaded (fp32), batches
        # of eval_batch_size 64 generated, then scored by policy and reference (KL) and the reward model
        "eval": frozen(Na) + frozen(Na) + frozen(Nc) + cast(Na) + kv_bytes(a, 64, s) + logit_bytes(64, Lr + 1, 10),
    }

    def fwd_flops(m, n_tokens, ctx, head_tokens):
        # 2 FLOPs per weight per token in the body; attention scores and the weighted sum: 2 matmuls of
        # 2 * ctx * h FLOPs per token per layer; the LM head (vocab x proj) only on the positions that predict
        return (2 * matmul_params(m) * n_tokens + 4 * m["num_hidden_layers"] * m["hidden_size"] * ctx * n_tokens
                + 2 * V * m["word_embed_proj_dim"] * head_tokens)

    rows = []
    for gpu, (flops, bw, cap) in GPUS.items():
        def launch(m, passes):
            return passes * m["num_hidden_layers"] * DISPATCH_S

        def forward(m, n, batch, head_tokens=Lr + 1):
            # a no-grad forward of `batch` sequences of s tokens: compute, plus the weights' traffic: util runs each
            # forward call in its own autocast, so every call re-casts the fp32 weights (read 4 B, write 2 B) and
            # the matmuls read the 16-bit copy (2 B) = 8 B per parameter
            t = fwd_flops(m, batch * s, s, batch * head_tokens) / flops + 8 * n / bw
            return max(t, launch(m, 1))

        def train_micro(m, n, batch, tokens_per_row=s, head_tokens=Lr):
            # one micro-batch forward + backward: 3x the forward's FLOPs (backward = 2 matmuls per forward one);
            # traffic: the autocast cast of the weights (read 4 B, write 2 B), backward reads the 16-bit copy (2 B),
            # gradient accumulation reads and writes fp32 grads (8 B) = 16 B per parameter
            t = 3 * fwd_flops(m, batch * tokens_per_row, s, batch * head_tokens) / flops + 16 * n / bw
            return max(t, launch(m, 3))

        def opt_step(n):
            # gradient clipping (norm: read 4 B; scale: read + write 8 B) and foreach AdamW (read weight, grad, both
            # moments 16 B; write weight and moments 12 B; sqrt temporary 8 B): ~48 B per parameter, memory-bound
            return 48 * n / bw

        def generate(m, n, batch):
            # prefill: one forward over the 112-token prompts; then 24 decode steps, each a forward call of one
            # token per row: memory-bound, reading the weights (8 B per parameter, as in forward(): each step
            # re-casts the fp32 weights; a 16-bit copy kept for generation would read 2 B) and the KV cache so
            # far; or bounded by the launch of its kernels
            prefill = fwd_flops(m, batch * Lp, Lp, batch) / flops + 8 * n / bw
            steps = 0.0
            for t in range(Lr):
                gpu_time = max(2 * n * batch / flops, (8 * n + kv_bytes(m, batch, Lp + t)) / bw)
                steps += max(gpu_time, launch(m, 1) + GENERATE_STEP_S)
            return prefill + steps

        t = {}
        # SFT: 2 epochs of ~6000 rows, batches of 32 in micro-batches of 8; held-out loss on 200 rows 25 times
        sft_steps = math.ceil(rows_sft * 2 / 32)
        t["sft"] = (sft_steps * (4 * train_micro(a, Na, mb) + opt_step(Na))
                    + 25 * math.ceil(200 / 64) * forward(a, Na, 64, Lr))
        # RM: 1 epoch of ~6000 pairs, batches of 32 pairs; each prompt once + 2 answers of 24 tokens; held-out
        # accuracy on 200 pairs 10 times; the reward offset: 256 answers generated by the actor and scored
        rm_steps = math.ceil(rows_pairs / 32)
        t["rm"] = (rm_steps * (4 * train_micro(c, Nc, mb, Lp + 2 * Lr, 0) + opt_step(Nc))
                   + 10 * math.ceil(200 / 128) * forward(c, Nc, 256, 0)
                   + 4 * generate(a, Na, 64) + 2 * forward(c, Nc, 128, 0))
        # PPO: 60 iterations; rollout: generate 64, score with actor, reference, critic, reward model; update: 4
        # epochs x 4 minibatches of 16 (2 micro-batches each) for actor and critic, one AdamW step of each
        ppo_it = (generate(a, Na, 64) + forward(a, Na, 64) + forward(a, Na, 64)
                  + forward(c, Nc, 64, 0) + forward(c, Nc, 64, 0)
                  + 16 * (2 * (train_micro(a, Na, mb, s, Lr + 1) + train_micro(c, Nc, mb, s, 0))
                          + opt_step(Na) + opt_step(Nc)))
        t["ppo"] = 60 * ppo_it
        # DPO: 1 epoch of ~6000 pairs in batches of 64 (8 micro-batches of 8 pairs = 16 sequences), the reference
        # forward on the same sequences; held-out pair statistics on 200 pairs 20 times (policy + reference)
        dpo_steps = math.ceil(rows_pairs / 64)
        t["dpo"] = (dpo_steps * (8 * (train_micro(a, Na, 2 * mb) + forward(a, Na, 2 * mb, Lr)) + opt_step(Na))
                    + 20 * math.ceil(200 / 64) * 2 * forward(a, Na, 128, Lr))
        # GRPO: 40 iterations of 16 prompts x 8 answers: generate 128, score with actor and reference, 2 epochs x 4
        # minibatches of 32 (4 micro-batches each)
        grpo_it = (generate(a, Na, 128) + forward(a, Na, 128) + forward(a, Na, 128)
                   + 8 * (4 * train_micro(a, Na, mb, s, Lr + 1) + opt_step(Na)))
        t["grpo"] = 40 * grpo_it
        # evaluation of one policy: 600 prompts greedy and sampled (10 batches of 64 each), KL to the reference
        # and reward-model score on the sampled answers
        n_batches = math.ceil(n_eval / 64)
        t["eval"] = n_batches * (2 * generate(a, Na, 64) + forward(a, Na, 64) + forward(a, Na, 64)
                                 + forward(c, Nc, 64, 0))
        for stage in STAGES:
            rows.append({"gpu": gpu, "stage": stage, "peak_gib": mem[stage] / GIB, "minutes": t[stage] / 60,
                         "fits": mem[stage] / GIB < cap})
    return rows


WORK = {"sft": ("SFT", "2 epochs × ~6000 rows, batches of 32"),
        "rm": ("reward model", "1 epoch × ~6000 pairs, batches of 32, + reward offset"),
        "ppo": ("PPO", "60 iterations × 64 rollouts, 4 PPO epochs"),
        "dpo": ("DPO", "1 epoch × ~6000 pairs, batches of 64, + reference"),
        "grpo": ("GRPO", "40 iterations × 16 prompts × 8 answers, 2 epochs"),
        "eval": ("evaluation", "one policy on 600 prompts, greedy + sampled")}


def estimate_markdown() -> str:
    """The estimate as the README's markdown table, with a last row for the whole pipeline (the five stages, and
    4_test's evaluation of four policies)."""
    est = {(r["gpu"], r["stage"]): r for r in estimate()}
    gpus = list(GPUS)
    head = " | ".join(f"{g}: peak GiB *(est.)* | {g}: min *(est.)*" for g in gpus)
    lines = [f"| stage | work | {head} |", "|---|---|" + "---|---|" * len(gpus)]
    for stage in STAGES:
        cells = " | ".join(f"{est[(g, stage)]['peak_gib']:.1f} | {est[(g, stage)]['minutes']:.1f}" for g in gpus)
        lines.append(f"| {WORK[stage][0]} | {WORK[stage][1]} | {cells} |")
    total = {g: sum(est[(g, st)]["minutes"] * (4 if st == "eval" else 1) for st in STAGES) for g in gpus}
    peak = {g: max(est[(g, st)]["peak_gib"] for st in STAGES) for g in gpus}
    cells = " | ".join(f"{peak[g]:.1f} | {total[g]:.1f}" for g in gpus)
    lines.append(f"| all | the five stages + 4 evaluations | {cells} |")
    return "\n".join(lines)

def check_activation_estimate() -> list[dict]:
    """Checks the estimate's biggest per-micro-batch terms on the CPU, no GPU needed (a few seconds): builds each
    model at its real dimensions, runs one SFT micro-batch (8 x 136 tokens, 24 answer tokens each) forward under
    bf16 autocast as util runs it, and adds up the bytes autograd saves for backward (activations + the 16-bit
    weight copies + the head's logits), to compare with act_bytes + cast + logit_bytes of estimate()."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    sys.path.insert(0, str(ROOT))
    import util
    out = []
    for role in ("actor", "critic"):
        s = shape(role)
        torch.manual_seed(0)
        model = util.run_in_precision(util.disable_dropout(OPTForCausalLM(OPTConfig(
            **s, pad_token_id=0, bos_token_id=1, eos_token_id=2))), "bf16")
        ids = torch.randint(3, 1000, (8, 136))
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :112] = -100                  # the prompt; the last 24 tokens are the answer
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()   # each storage once
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, predicts = util.label_logits(model, ids, mask, labels)
            torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][predicts])
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}   # fp32 masters: counted apart
        measured = sum(b for k, b in saved.items() if k not in weights)
        L, h, f, n = s["num_hidden_layers"], s["hidden_size"], s["ffn_dim"], param_count(s)
        est = 8 * 136 * L * (20 * h + 2 * f) + 2 * n + 8 * 24 * s["vocab_size"] * 14
        out.append({"model": role, "measured_gib": measured / GIB, "estimated_gib": est / GIB})
        print(f"{role}: one micro-batch saves {measured / GIB:.3f} GiB for backward; the estimate's terms give "
              f"{est / GIB:.3f} GiB ({(est / measured - 1) * 100:+.1f} %)")
    return out


# ============================================================================ building the models


def build_hub_dirs(root: Path, small: bool, seed: int = 0) -> dict:
    """opt-350m- and opt-125m-shaped OPTs with random weights, saved like hub snapshots: float16 safetensors,
    torch_dtype/dtype float16 in config.json, the shipped tokenizer beside them. Returns {role: dir}."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    sys.path.insert(0, str(ROOT))
    import util
    tok = util.load_tokenizer(ROOT / "tokenizer")
    out = {}
    for role in ("actor", "critic"):
        d = root / f"hub-{role}"
        s = shape(role, small)
        torch.manual_seed(seed)
        model = OPTForCausalLM(OPTConfig(**s, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id)).half()
        n = model.num_parameters()
        assert n == param_count(s), f"{role}: param_count says {param_count(s)}, the model has {n}"
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        cfg_path = d / "config.json"
        conf = json.loads(cfg_path.read_text())
        conf["torch_dtype"] = conf["dtype"] = "float16"            # older and newer transformers' key, as the hub
        cfg_path.write_text(json.dumps(conf, indent=2))
        dtypes = safetensors_dtypes(d)
        assert dtypes == {"F16"}, f"{d}: weights stored as {dtypes}, expected F16"
        print(f"{role}: {n / 1e6:.1f} M parameters (random weights), saved float16 to {d}")
        out[role] = d
    return out


def safetensors_dtypes(d: Path) -> set:
    """The dtypes of the tensors in a directory's .safetensors files (read from their headers)."""
    found = set()
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found

# ============================================================================ one precision (its own process)


EVAL_PROMPTS = 64      # the evaluation stage: one batch of the opt preset's eval_batch_size


def overrides(steps: int) -> dict:
    """Config fields that cut the opt preset to a few steps: sft/rm/dpo about `steps` optimizer steps each (of 128
    training rows), ppo and grpo max(2, steps // 2) iterations. n_eval=8: the held-out curves of sft/rm/dpo, which
    such short runs compute at every step, stay a small part of the step times."""
    n_train, its = 128, max(2, steps // 2)
    return dict(n_train=n_train, n_eval=8, sft_epochs=steps * 32 / n_train, rm_epochs=steps * 32 / n_train,
                dpo_epochs=steps * 64 / n_train, ppo_iterations=its, grpo_iterations=its)


LOSS_KEYS = {"sft": ["train_loss"], "rm": ["train_loss"], "ppo": ["pg_loss", "vf_loss"], "dpo": ["train_loss"],
             "grpo": ["loss"], "eval": ["kl_to_sft", "rm_score"]}


def worker(precision: str, work: Path, hub: dict, steps: int, small: bool, device: str) -> list[dict]:
    """Every stage in `precision` in a fresh out_dir; one result row per stage."""
    import torch
    sys.path.insert(0, str(ROOT))
    import util
    fields = {f.name for f in dataclasses.fields(util.Config)}
    wanted = dict(actor_hub=str(hub["actor"]), critic_hub=str(hub["critic"]), out_dir=str(work / precision),
                  tokenizer_dir=str(work / precision / "tokenizer"), precision=precision, **overrides(steps))
    missing = sorted(set(wanted) - fields)
    if missing:
        print(f"NOTE: util.Config has no {missing} (util.py predates them): run without them")
    cfg = util.get_config("opt", **{k: v for k, v in wanted.items() if k in fields})
    cuda = device == "cuda"
    steps_seen, master = [], []

    def pre(opt, args, kwargs):     # every optimizer step: are its parameters fp32 (master weights)?
        master.append(all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"]))

    def post(opt, args, kwargs):
        if cuda:
            torch.cuda.synchronize()
        steps_seen.append(time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    rows, failed = [], None
    for stage in STAGES:
        row = {"stage": stage, "precision": precision, "device": device}
        if failed:
            rows.append({**row, "error": f"skipped: {failed} failed"})
            continue
        util.free_memory()                        # the last stage's models: accelerate's references, CUDA's cache
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            row["start_gib"] = torch.cuda.memory_allocated() / GIB
        steps_seen.clear(), master.clear()
        t0 = time.perf_counter()
        try:
            if stage == "eval":
                result = evaluate(util, cfg)
            else:
                result = util.run_stage(stage, cfg)
        except Exception as e:                    # noqa: BLE001 -- reported in the table, the next stages skipped
            failed = stage
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300], "optimizer_steps": len(steps_seen),
                         "master_fp32": all(master) if master else None})
            print(f"[{precision}] {stage} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        if cuda:
            torch.cuda.synchronize()
        row["seconds"] = time.perf_counter() - t0
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda else None
        row["optimizer_steps"] = len(steps_seen)
        row["master_fp32"] = all(master) if master else None
        row.update(per_unit(stage, result, steps_seen, row["seconds"], cfg))
        losses = {k: result.get(k) for k in LOSS_KEYS[stage]}
        row["final_loss"] = losses
        row["finite"] = all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses.values())
        rows.append(row)
        print(f"[{precision}] {stage}: {json.dumps(row)}", flush=True)
    for h in hooks:
        h.remove()
    return rows


def per_unit(stage: str, result: dict, stamps: list, seconds: float, cfg) -> dict:
    """Seconds per optimizer step (sft, rm, dpo: median gap between steps, the first step's warm-up excluded),
    per iteration (ppo, grpo: the last iteration's own timings) or per evaluation batch."""
    if stage in ("sft", "rm", "dpo"):
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"unit": "optimizer step", "seconds_per_unit": statistics.median(gaps) if gaps else None}
    if stage in ("ppo", "grpo"):
        keys = [k for k in result if k.startswith("time_")]
        last = sum(result[k] for k in keys) if keys else None
        its = cfg.ppo_iterations if stage == "ppo" else cfg.grpo_iterations
        return {"unit": "iteration", "seconds_per_unit": last if last is not None else seconds / its}
    return {"unit": f"eval batch of {cfg.eval_batch_size}",
            "seconds_per_unit": seconds / math.ceil(result.get("n_prompts", EVAL_PROMPTS) / cfg.eval_batch_size)}


def evaluate(util, cfg) -> dict:
    """util.evaluate_policy on EVAL_PROMPTS held-out prompts: the PPO policy against the SFT reference, with the RM."""
    device = util.accelerator().device
    tok = util.load_tokenizer(cfg.path("actor"))
    policy = util.load_causal_lm(cfg.path("rlhf"), device=device, cfg=cfg)      # cfg: forwards in its precision
    ref = util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False)
    rm = util.load_score_model(cfg.path("critic"), device=device, cfg=cfg).requires_grad_(False)
    rows = util.load_rows(Path(cfg.data_dir, "eval.json"), limit=EVAL_PROMPTS)
    summary, _ = util.evaluate_policy(policy, tok, rows, cfg, rm=rm, ref=ref)
    return summary

# ============================================================================ driver


def precisions(device: str, small: bool) -> tuple[list[str], list[str]]:
    """(precisions to run, notes): bf16 and fp16 on CUDA (bf16 only from compute capability 8, as util's auto
    rule); fp32 and bf16 on a CPU (--small validation)."""
    import torch
    if device == "cpu":
        return ["fp32", "bf16"], []
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return ["bf16", "fp16"], []
    return ["fp16"], [f"bf16 skipped: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no "
                      "native bf16"]


def table(rows: list[dict]) -> str:
    out = ["| stage | precision | peak GPU memory (GiB) | seconds / unit | unit | optimizer steps | final loss finite "
           "| fp32 master weights | total s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            fp32 = {True: "yes", False: "NO", None: "-"}[r.get("master_fp32")]
            out.append(f"| {r['stage']} | {r['precision']} | | | | {r.get('optimizer_steps', '')} | "
                       f"no ({r['error'][:120]}) | {fp32} | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a (cpu)"
        spu = f"{r['seconds_per_unit']:.3f}" if r.get("seconds_per_unit") is not None else "?"
        fp32 = {True: "yes", False: "NO", None: "-"}[r.get("master_fp32")]
        out.append(f"| {r['stage']} | {r['precision']} | {peak} | {spu} | {r['unit']} | {r['optimizer_steps']} | "
                   f"{'yes' if r['finite'] else 'NO'} | {fp32} | {r['seconds']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny model dimensions (validates the script on a CPU)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps of sft/rm/dpo (ppo/grpo: max(2, steps//2) "
                                                         "iterations)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--work", help="directory for the models and stage outputs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--estimate", action="store_true", help="print the estimated memory/time table and exit")
    ap.add_argument("--check-estimate", action="store_true",
                    help="on the CPU: compare the estimate's activation terms with what autograd saves, and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)      # internal: run one precision in this process
    args = ap.parse_args(argv)
    if args.estimate:
        print(estimate_markdown())
        return 0
    if args.check_estimate:
        check_activation_estimate()
        return 0
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""       # before torch is imported: accelerate then picks the CPU
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.pop("RLHF_OUT", None)                  # out_dir is ours
    if args.worker:
        work = Path(args.work)
        hub = {"actor": work / "hub-actor", "critic": work / "hub-critic"}
        rows = worker(args.worker, work, hub, args.steps, args.small, args.device)
        Path(work, f"rows-{args.worker}.json").write_text(json.dumps(rows))
        return 0
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --device cpu --small to validate the script, or --estimate")
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        run, notes = precisions(args.device, args.small)
        for n in notes:
            print(f"NOTE: {n}")
        if args.device == "cuda":
            print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        build_hub_dirs(work, args.small)
        rows = []
        for p in run:
            cmd = [sys.executable, __file__, "--worker", p, "--work", str(work), "--steps", str(args.steps),
                   "--device", args.device] + (["--small"] if args.small else [])
            rc = subprocess.call(cmd)
            got = Path(work, f"rows-{p}.json")
            rows += (json.loads(got.read_text()) if got.exists()
                     else [{"stage": "all", "precision": p, "error": f"worker exited with {rc}"}])
            if not args.keep:
                shutil.rmtree(work / p, ignore_errors=True)   # ~12 GB per precision at the real dimensions
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    print(f"\n{len(run)} precision(s) in {time.time() - t0:.0f} s; notes: {notes or 'none'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"notes": notes, "rows": rows}, indent=1))
        print(f"rows written to {args.out}")
    ok = all("error" not in r and r["finite"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
