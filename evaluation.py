"""Measuring without gradients: the reward model's scores of answers and of preference pairs, a
policy's evaluation (execution accuracy greedy and sampled, RM score, KL to SFT, length, EOS), its
accuracy per question family and its win rate. util re-exports these names.

The models' own functions (generate, reward_scores, ...) live in util, which imports this module:
they are imported inside the functions here, when they run."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from encoding import ranking_batch, ranking_examples, rm_batch
from runtime import progress
from sql_data import execution_match
from stopping import stop_cleanly

if TYPE_CHECKING:
    from util import Config


def score_texts(model, tok, prompts: list[str], answers: list[str], cfg: Config, device,
                normalized=True, batch_size=128):
    """Reward of each (prompt, answer) pair."""
    import torch
    from util import reward_scores
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
    import torch
    from util import at_last_token, shared_prompt_scores
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


def evaluate_batch(model, tok, part: list[dict], greedy: list[str], cfg: Config, rm=None,
                   ref=None) -> list[dict]:
    """One sampled answer per row of `part` beside its greedy one: per-row verdicts (None without
    setup_sql), RM score, KL to the reference, length, EOS."""
    import torch
    from util import (decode_responses, first_eos_index, generate, response_logprobs,
                      response_mask, reward_scores)
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
    from util import sample_answers
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
