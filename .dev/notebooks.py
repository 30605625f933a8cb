"""Writes the numbered notebooks (without outputs) from the cell texts below: `python .dev/notebooks.py`.
`make run` then fills in the outputs. Edit here, regenerate, re-run."""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]

# The first code cell of every notebook. Outside Colab it does nothing. In Colab (each notebook in its own
# runtime, opened from GitHub with no util.py beside it) it finds the project on Google Drive or clones it there
# (else into /content, where model/ dies with the runtime), enters it and installs what Colab lacks.
# It cannot import util before it has found it, hence the logic inline. tests/test_colab.py runs it.
BOOTSTRAP = '''# Colab only (nothing happens elsewhere): find this project or clone it, enter it, install what
# Colab lacks. Each notebook runs in its own runtime: only Google Drive keeps model/ for the next.
import os, sys
if "google.colab" in sys.modules:
    import glob, subprocess
    REPO = os.environ.get("RLHF_REPO", "https://github.com/tiny-rlhf/tiny-rlhf")  # or your fork
    mount = os.environ.get("RLHF_DRIVE_MOUNT", "/content/drive")
    drive = os.path.join(mount, "MyDrive")
    project = os.getcwd() if os.path.exists("util.py") else None    # files beside it, or a re-run
    if project is None:
        try:
            from google.colab import drive as gdrive
            gdrive.mount(mount)
        except Exception as e:                    # declined or failed: carry on without Drive
            print("Google Drive not mounted:", e)
        home = drive if os.path.isdir(drive) else os.environ.get("RLHF_COLAB_CONTENT", "/content")
        # a copy already there: MyDrive/tiny-rlhf, MyDrive/<any>/ or MyDrive/<any>/tiny-rlhf*/
        look = [f"{home}/tiny-rlhf", *sorted(glob.glob(f"{drive}/*/")),
                *sorted(glob.glob(f"{drive}/*/tiny-rlhf*/"))]
        found = [p for p in look if os.path.exists(f"{p}/util.py")
                 and os.path.exists(f"{p}/0_download.ipynb")]
        project = os.path.normpath(found[0] if found else f"{home}/tiny-rlhf")
        if not found:
            subprocess.run(["git", "clone", "-q", "--depth", "1", REPO, project], check=True)
    os.chdir(project)
    sys.path.insert(0, project)
    on_drive = os.path.realpath(project).startswith(os.path.realpath(drive) + os.sep)
    print(f"tiny-rlhf: {project};", "outputs (model/) persist on Google Drive" if on_drive else
          "not on Google Drive: the next notebook will NOT see model/ (lost when the runtime ends)")
    from rlhf import runtime; runtime.colab_setup()  # installs only what Colab lacks (today: none)
'''.strip()

PARAMS = '''# papermill parameters: None = RLHF_PRESET if set, else "opt" with a GPU and a reachable hub, else "tiny"
PRESET = None'''

SETUP = '''import time
import pandas as pd
import matplotlib.pyplot as plt
import util

cfg = util.get_config(PRESET)
device = util.get_device()
util.set_seed(cfg.seed)
print(f"preset: {cfg.preset}   precision: {util.resolve_precision(cfg, device)}   outputs: {cfg.out_dir}")
pd.set_option("display.max_colwidth", 120)'''


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=()):
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def header(title, intro):
    return [md(f"# {title}\n\n{intro}"), code(BOOTSTRAP), code(PARAMS, tags=["parameters"]), code(SETUP)]


NOTEBOOKS = {}

# --------------------------------------------------------------------------------------------------- 0_download
NOTEBOOKS["0_download"] = header("0 · Data, tokenizer and base models", """
This series teaches RLHF by running it, end to end, on a task where we can *check* every answer:
**text-to-SQL**. Each prompt gives a table definition and a question; the model must answer with SQL.

| stage | notebook | what it learns | writes |
|---|---|---|---|
| 0 | this one | the data, the tokenizer, the starting model | `model/base_actor/` |
| 1 | `1_actor.ipynb` | supervised fine-tuning (SFT) on human-style demonstrations | `model/actor/` |
| 2 | `2_critic.ipynb` | a reward model from preference pairs (chosen vs rejected) | `model/critic/` |
| 3 | `3_rlhf.ipynb` | PPO against the reward model, with a KL leash to the SFT model | `model/rlhf/` |
| 5 | `5_dpo.ipynb` | DPO (here IPO): the preference pairs without a reward model | `model/dpo/` |
| 6 | `6_grpo.ipynb` | GRPO: groups of answers rewarded by execution, no critic | `model/grpo/` |
| 4 | `4_test.ipynb` | the before/after report of every model above | `model/report.json` |

Run them in the order of the table, **0 → 1 → 2 → 3 → 5 → 6 → 4**: the report comes last, so it finds
every model. (`model/critic/` holds the reward model; PPO's critic, the value function of 3_rlhf, starts
from it.)

Why SQL? Because every generated query can be **executed** in sqlite against the row's tables and compared
with the gold query's result. This *execution accuracy* is our gold metric: it does not depend on any learned
model, so we can see whether RLHF really improves answers or only fools the reward model.

Presets: `smoke` (seconds, for tests), `tiny` (a small OPT trained from scratch here, minutes on a laptop CPU),
`opt` (facebook/opt-350m actor and opt-125m critic, for a GPU with the hub reachable).""") + [
    md("""
## The data

`dataset/train.json` and `dataset/eval.json` are JSON lines in the format of Simple_RLHF's text-to-SQL set
(sql-create-context): `prompt`, `chosen`, `rejected`, `response`, plus `family` and `setup_sql`.
They are generated by `util.make_dataset` (deterministic: `python util.py make-dataset` rewrites them byte
for byte). Every row carries `setup_sql` (CREATE TABLE + INSERTs) so that *any* SQL can be run against it.

* `chosen`: the correct SQL.
* `rejected`: a plausible mistake — wrong column, aggregate, operator or value, a missing condition, a syntax error.
* `more_rejected`: the question's other plausible mistakes (about 4 a row), for a reward model that ranks several
  answers per prompt (notebook 2).
* `response`: the **demonstration** used for SFT, written like real annotators write: mostly right, but with
  *recurring habits*. In three question families most demonstrators make the same mistake:"""),
    code('''pd.DataFrame({"habit": util.HABITS, "share of demos with it": util.HABIT_RATE})'''),
    md("""
This is the point of the design. A model trained only to imitate demonstrations learns the habits too — and
under greedy decoding it picks the *most common* demonstration, i.e. the habit. No amount of SFT fixes it.
The preference pairs carry the missing signal (`rejected` is the habit half the time in those families), so a
reward model learns to dislike the habit, and RL can move the policy away from it. That gap, measured by
execution accuracy, is what RLHF has to close.

The pairs also hold **contrasts**: mistakes that *add* what fixes a habit where the question does not ask for it —
an extra `AND` condition, a `COUNT(DISTINCT …)` for a plain count, a strict `>` where the question says
"at least". Without them a reward model can learn the shortcut "AND / DISTINCT / `>` is good", and PPO
exploits it: in an early version of this data without contrasts, PPO raised the RM score while gold accuracy on
plain lookups fell from 100 % to about 10 %.

Numbers are tokenised digit by digit, so a small model can copy any number from the question into its SQL."""),
    code('''train = util.load_rows(f"{cfg.data_dir}/train.json")
evalset = util.load_rows(f"{cfg.data_dir}/eval.json")
stats = {"train": util.dataset_stats(train), "eval": util.dataset_stats(evalset)}
pd.DataFrame({k: {"rows": v["rows"], "demo correct": round(v["demo_correct"], 3),
                  "rejected differs from gold": v["rejected_differs"]} for k, v in stats.items()})'''),
    code('''pd.DataFrame(train[:6])[["family", "prompt", "chosen", "rejected", "response"]]'''),
    code('''fam = pd.DataFrame([{"family": r["family"],
                     "demo correct": util.execution_match(r["setup_sql"], r["chosen"], r["response"])} for r in train])
table = fam.groupby("family")["demo correct"].agg(["count", "mean"]).rename(columns={"mean": "demo correct"})
table'''),
    md("""
### Execution accuracy, by hand

Build the row's database in memory, run the gold SQL and another SQL, compare the (sorted) result rows."""),
    code('''row = next((r for r in train if r.get("family") == "compare"), train[0])
print(row["setup_sql"][:300], "...\\n")
for name in ("chosen", "rejected", "response"):
    print(f"{name:9s}{row[name]:60s} -> {util.execute_sql(row['setup_sql'], row[name])}")
print("response matches gold:", util.execution_match(row["setup_sql"], row["chosen"], row["response"]))'''),
    md("""
## The tokenizer

`tiny` uses the byte-level BPE tokenizer shipped in `tokenizer/`, trained on this data
(`python util.py make-tokenizer`). It has its own `<pad>` token, distinct from the end-of-sequence token
`</s>`: if pad and EOS were the same token, masking pads would also mask the EOS the model must learn to emit.
`opt` uses OPT's own tokenizer, saved under `tokenizer/opt/`."""),
    md("""
## Is the hub reachable?

One TCP connection with a hard 4-second limit decides it (instead of a library's ~48 s of retries).
Without a hub the `tiny` preset needs nothing from the network."""),
    code('''t0 = time.time()
reachable = util.hub_reachable()
print(f"hub reachable: {reachable}   (decided in {time.time() - t0:.1f} s)")
if cfg.actor_hub and not reachable:
    print(f"preset {cfg.preset!r} wants {cfg.actor_hub} but the hub is unreachable: "
          "prepare_base_models will use it only if it is a local directory")
elif not cfg.actor_hub:
    print("preset", cfg.preset, "builds its model here: nothing to download")'''),
    code('''paths = util.prepare_base_models(cfg)
tok = util.load_tokenizer(paths["base_actor"])
example = train[0]["prompt"] + train[0]["chosen"]
ids = util.encode_prompt(tok, train[0]["prompt"]) + util.encode_response(tok, train[0]["chosen"])
print(len(tok), "tokens;  pad:", tok.pad_token, tok.pad_token_id, " eos:", tok.eos_token, tok.eos_token_id)
print(tok.convert_ids_to_tokens(ids))
assert tok.decode(ids, skip_special_tokens=True) == example, "round trip failed"
for k, p in paths.items():
    m = util.load_causal_lm(p)
    print(f"{k}: {sum(x.numel() for x in m.parameters())/1e6:.2f} M parameters -> {p}")'''),
    code('''lengths = pd.DataFrame({
    "prompt tokens": [len(util.encode_prompt(tok, r["prompt"])) for r in train[:2000]],
    "response tokens": [len(util.encode_response(tok, r["response"])) for r in train[:2000]]})
ax = lengths.plot.hist(bins=40, alpha=0.7, figsize=(7, 3), title="sequence lengths (first 2000 training rows)")
ax.set_xlabel("tokens");'''),
]

# --------------------------------------------------------------------------------------------------- 1_actor
NOTEBOOKS["1_actor"] = header("1 · The actor: supervised fine-tuning", r"""
The first RLHF model is an ordinary language model trained to imitate demonstrations: given the prompt,
maximise the probability of the demonstrated response $y$ token by token:

$$\mathcal{L}_{\text{SFT}} = -\frac{1}{|y|}\sum_{t} \log \pi_\theta(y_t \mid x, y_{<t})$$

Three details matter:
* **Loss on response tokens only.** The prompt and the pads get label `-100`, which the loss ignores: we teach
  the model to answer, not to write questions.
* **EOS after every response.** The model must learn to *stop*; later, PPO reads the reward at this EOS.
* **Pad ≠ EOS**, so masking pads never masks the EOS.

A speed detail: the LM head turns each position into a score for every word of the vocabulary, the costliest layer
per token here, and only about a fifth of the positions of a padded batch predict an answer token. So
`util.label_logits` runs the head at those positions only: the same loss and gradients as running it everywhere
(a unit test checks), for about 14 % less time per step on `tiny` (measured).

`tiny` trains the small OPT from scratch; `opt` fine-tunes facebook/opt-350m.""") + [
    code('''tok = util.load_tokenizer(cfg.path("base_actor"))
train = util.load_data(cfg, "sft")                 # Config.sft_data: train.json unless set
evalset = util.load_data(cfg, "eval")              # Config.eval_data: eval.json unless set
model = util.load_causal_lm(cfg.path("base_actor"), stage="0_download.ipynb", device=device, cfg=cfg)
util.check_tokenizer_matches(tok, model)
print(f"{len(train)} training demos, {len(evalset)} held-out prompts")'''),
    md("""
## One step by hand

The loss of one batch of 4 training rows, built by the helpers the loop uses
(`util.row_examples`, `util.right_pad_batch`) and scored by the model before any training.
The table shows one row from 3 prompt tokens before its answer to its first pads: the `label` is
`-100` (no loss) on the prompt and on the pads, and the token's own id on the answer, EOS included;
`log p(label)` is the log-probability the model gives that token, predicted from the position
before it."""),
    code('''import math
import torch
batch = util.right_pad_batch(util.row_examples(tok, train[:4], cfg), tok.pad_token_id)
ids, mask, labels = (t.to(device) for t in batch)
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits.float()   # all positions, full vocab
logp = torch.log_softmax(logits[:, :-1], dim=-1)     # the logits at position t predict token t + 1
target = labels[:, 1:]
counts = target != -100                              # the label positions: the loss is their mean
logp_label = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]   # -100: any index, then NaN
logp_label = logp_label.masked_fill(~counts, float("nan"))
print("batch:", tuple(ids.shape), "  answer tokens per row:", counts.sum(1).tolist())
i = int(mask.sum(1).argmin())                        # the shortest row: it ends in pads
shown = [round(v, 4) if c else "–" for v, c in zip(logp_label[i].tolist(), counts[i].tolist())]
table = pd.DataFrame({"token": tok.convert_ids_to_tokens(ids[i, 1:].tolist()),
                      "label": target[i].tolist(), "log p(label)": shown,   # –: not in the loss
                      "in the loss": counts[i].tolist()},
                     index=pd.RangeIndex(1, ids.shape[1], name="position"))
answer_starts, n = int(counts[i].nonzero()[0]) + 1, int(mask[i].sum())
table.loc[answer_starts - 3:n + 1]                   # 3 prompt tokens, the answer, 2 pads'''),
    md("The loss by hand, `-mean(log p(label))` over the label positions, against "
       "`util.sft_loss`, the function `train_sft` calls on every batch (it runs the LM head at "
       "those positions only)."),
    code('''by_hand = -logp_label[counts].mean()
with torch.no_grad():
    helper = util.sft_loss(model, batch, device)
print(f"SFT loss by hand: {by_hand:.6f}   util.sft_loss: {helper:.6f}   (a uniform guess over "
      f"the {len(tok)} tokens: log {len(tok)} = {math.log(len(tok)):.3f})")
rtol = 1e-5 if util.resolve_precision(cfg, device) == "fp32" else 2e-2   # bf16 / fp16 logits round
assert torch.isclose(by_hand, helper.float(), rtol=rtol), (by_hand, helper)'''),
    md("Stopping this cell (the stop button, Ctrl-C) keeps `model/actor/` as it was; to train again, re-run from "
       "the cell that loads the model."),
    code('''t0 = time.time()
history = util.train_sft(model, tok, train, evalset, cfg, device)
sft_seconds = time.time() - t0
print(f"SFT wall time: {sft_seconds:.0f} s")'''),
    code('''util.plot_history(history, "epoch", [["train_loss", "eval_loss"]],
                  "SFT loss (response tokens)")
print(f"held-out loss {history[-1]['eval_loss']:.3f}, perplexity {math.exp(history[-1]['eval_loss']):.2f}")'''),
    md("""
## Does it write correct SQL?

Execution accuracy on held-out prompts, decoded two ways: **greedy** (always the most likely token) and
**sampled** at the temperature PPO will use. Look at the per-family table: the families with a demonstrator
habit are exactly where the SFT model fails, greedy most of all."""),
    code('''summary, rows = util.evaluate_policy(model, tok, evalset, cfg, desc="SFT")
print("rm_score –: not measured here (no reward model yet: 2_critic trains it)")
pd.DataFrame([summary]).fillna("–")'''),
    code('''pd.DataFrame(util.per_family_accuracy(rows)).T'''),
    code('''pd.DataFrame(rows)[["family", "gold", "greedy", "sampled", "sampled_ok"]].head(12)'''),
    code('''metrics = {"preset": cfg.preset, "sft_seconds": sft_seconds, "history": history, **summary,
           "per_family": util.per_family_accuracy(rows)}
path = util.save_model(model, tok, cfg.path("actor"), metrics)
util.write_run_record(cfg, "sft", history)          # logs/sft.jsonl and the settings it ran with
print("saved", path)
del model
util.free_memory()          # on a GPU: the memory goes back before the next notebook or stage'''),
]

# --------------------------------------------------------------------------------------------------- 2_critic
NOTEBOOKS["2_critic"] = header("2 · The reward model", r"""
The reward model (RM) turns preferences into a number. It is the SFT backbone with a scalar head
(`AutoModelForSequenceClassification`, `num_labels=1`), trained on pairs so that the chosen answer scores
higher than the rejected one (Bradley–Terry):

$$\mathcal{L}_{\text{RM}} = -\log \sigma\big(r(x, y_{\text{chosen}}) - r(x, y_{\text{rejected}})\big)$$

Details that matter:
* The score is read at the **last real token** — the EOS of the answer — whether the batch is padded on the
  left (as in generation) or on the right (as in training). Reading it on a pad would score nothing.
* Dropout is off, so the same text always gets the same score.
* After training we **normalise**: shift scores so the SFT policy's answers average 0. PPO then sees
  positive rewards for better-than-SFT answers and negative for worse. The shift is stored in the model config.
* **Where is the mistake?** A single score per answer is a weak signal for a small model: it must find the one
  wrong token among fifty. So we add the same pairwise loss on every *prefix* of the rejected answer that already
  contains the mistake (from the first token where it departs from the chosen answer):
  $\;\frac{1}{|T|}\sum_{t \in T} -\log\sigma\big(r(x, y_{\text{chosen}}) - r_t(x, y_{\text{rejected}, \le t})\big)$.
  The score that PPO uses is still the one read at the EOS (`rm_prefix_weight=0` turns the extra term off).
* **Read the prompt once.** A chosen and a rejected answer share their prompt, which is most of the tokens. The
  prompt runs through the model once and its cached keys/values serve both answers (`util.shared_prompt_scores`,
  InstructGPT's trick for its K answers per prompt): the same scores as two full sequences from about 60 % of
  the tokens (on a 2-core CPU, 0.19 → 0.14 s per training step), so more epochs fit in the same minutes.
* **More than one rejected answer.** Each shipped row also lists the other mistakes its question invites
  (`more_rejected`); `rm_max_rejected=8` ranks them all below the chosen answer, about 5 pairs per prompt read.
  It learns more per epoch but each epoch costs about 2.5 times as much; with our two-minute budget one pair per
  prompt and more epochs does better, so `tiny` keeps `rm_max_rejected=1` (given six epochs, several times our
  budget, `rm_max_rejected=8` reached 0.987 on the held-out pairs below).
* `rm_freeze_backbone=True` trains the head only (cheaper, weaker).""") + [
    code('''tok = util.load_tokenizer(cfg.path("actor"))
train = util.load_data(cfg, "pref")                # Config.pref_data: train.json unless set
evalset = util.load_data(cfg, "eval")              # Config.eval_data: eval.json unless set
# tiny: start from the SFT actor's backbone; opt: from facebook/opt-125m
init = cfg.path("base_critic") if cfg.critic_hub else cfg.path("actor")
rm = util.load_score_model(init, device=device, cfg=cfg)
print("initialised from", init)'''),
    md("The pooling index: the same two answers, padded left and right, give the same scores."),
    code('''import torch
pair = [{"prompt": train[0]["prompt"], "x": train[0]["chosen"]}, {"prompt": train[1]["prompt"], "x": train[1]["rejected"]}]
ids_r, mask_r = util.rm_batch(tok, pair, cfg, "x")                       # right padding
seqs = [ids_r[i, :int(mask_r[i].sum())].tolist() for i in range(2)]
ids_l, mask_l = util.left_pad(seqs, tok.pad_token_id)                    # the same, left padding
print("last-token index, right padding:", util.last_token_index(mask_r).tolist(), " left:", util.last_token_index(mask_l).tolist())
with torch.no_grad():
    print("scores right:", util.reward_scores(rm, ids_r.to(device), mask_r.to(device)).tolist())
    print("scores left: ", util.reward_scores(rm, ids_l.to(device), mask_l.to(device)).tolist())'''),
    md("""
## One step by hand

One real training row, batched as the loop batches it (`util.ranking_examples`,
`util.ranking_batch`: the prompt once, left-padded, its answers right-padded) and scored by
`util.shared_prompt_scores`. The head gives a score at every answer token; the reward is the one at
the last real token, the EOS (`util.last_token_index`), marked ◀ below. `mistake` marks the rejected
answer's tokens from the first one that departs from the chosen answer (`util.mistake_positions`):
the prefix loss ranks each score there below the chosen answer's reward too."""),
    code('''import torch.nn.functional as F
row = next((r for r in train if r.get("family") == "compare"), train[0])
print(row["prompt"])
batch = util.ranking_batch(util.ranking_examples(tok, [row], cfg), tok.pad_token_id)
prompt_ids, prompt_mask, ids, mask, owner, c, r = (t.to(device) for t in batch)
with torch.no_grad():                                # (answers, tokens): a score at every token
    per_token = util.shared_prompt_scores(rm, prompt_ids, prompt_mask, ids, mask, owner)
end = util.last_token_index(mask)                    # each answer's EOS
after = util.mistake_positions(ids[c], ids[r], mask[c], mask[r])
table = {}
for name, j in (("chosen", int(c[0])), ("rejected", int(r[0]))):
    n = int(mask[j].sum())
    table[name] = pd.Series(tok.convert_ids_to_tokens(ids[j, :n].tolist()))
    table[f"{name} score"] = pd.Series([f"{v:.3f}" + (" ◀" if t == end[j] else "")
                                        for t, v in enumerate(per_token[j, :n].tolist())])
n = int(mask[r[0]].sum())
table["mistake"] = pd.Series(["✗" if a else "" for a in after[0, :n].tolist()])
pd.DataFrame(table).fillna("")'''),
    md("The loss by hand: $-\\log\\sigma(r_c - r_r)$ with the rewards read at the EOS, against "
       "`util.pairwise_loss`; then the prefix term by hand, and their sum against "
       "`util.reward_loss`, the function `train_reward` calls on every batch."),
    code('''s = per_token[torch.arange(len(ids)), end]   # each answer's reward, read at its EOS
rc, rr = s[c], s[r]
by_hand = -F.logsigmoid(rc - rr).mean()
prefix = (-F.logsigmoid(rc[:, None] - per_token[r]) * after).sum() / after.sum()   # mistakes
with torch.no_grad():
    helper = util.pairwise_loss(rc, rr)
    loop, _, _ = util.reward_loss(rm, prompt_ids, prompt_mask, ids, mask, owner, c, r,
                                  cfg.rm_prefix_weight)
w = cfg.rm_prefix_weight
print(f"r(chosen) = {rc[0]:.4f}   r(rejected) = {rr[0]:.4f}")
print(f"pairwise loss by hand: {by_hand:.6f}   util.pairwise_loss: {helper:.6f}")
print(f"with the prefix term by hand: {by_hand:.6f} + {w} x {prefix:.6f} = "
      f"{by_hand + w * prefix:.6f}   util.reward_loss: {loop:.6f}")
assert torch.isclose(by_hand, helper, rtol=1e-6)
assert torch.isclose(by_hand + w * prefix, loop, rtol=1e-4), (by_hand + w * prefix, loop)'''),
    md("Stopping this cell keeps `model/critic/` as it was; to train again, re-run from the cell that loads the model."),
    code('''t0 = time.time()
history = util.train_reward(rm, tok, train, evalset, cfg, device)
rm_seconds = time.time() - t0
print(f"reward model wall time: {rm_seconds:.0f} s")
util.plot_history(history, "step", [["train_loss"], ["train_acc", "eval_acc"]], "reward model");'''),
    code('''chosen, rejected = util.score_pairs(rm, tok, evalset, cfg, device)
acc = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
print(f"held-out pairwise accuracy: {acc:.3f} on {len(chosen)} pairs")
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(chosen, bins=40, alpha=0.6, label="chosen"); ax.hist(rejected, bins=40, alpha=0.6, label="rejected")
ax.set_xlabel("raw reward"); ax.legend(); ax.set_title("held-out scores");'''),
    md("""The pairs it gets wrong (if any): what kind of mistake fools it? Mostly a wrong column or a wrong value: to
see it, the score read at the EOS must compare one token of the SQL with a word of the question, fifty tokens back.
Notebook 5 (DPO) ranks pairs with a different scorer — the policy's log-probability ratio, summed token by
token. Its curve `val_reward_acc` is measured on the first 200 validation pairs; the reward model's accuracy on
those same pairs is printed here, so the two can be compared like for like."""),
    code('''wrong = [dict(family=r["family"], chosen=r["chosen"], rejected=r["rejected"], margin=round(c - j, 3))
         for r, c, j in zip(evalset, chosen, rejected) if c <= j]
print(len(wrong), "wrong pairs")
val_pairs = util.load_data(cfg, "pref", split="val")[:200]      # the pairs of DPO's curve
vc, vr = util.score_pairs(rm, tok, val_pairs, cfg, device)
print(f"on DPO's {len(val_pairs)} validation pairs the reward model ranks "
      f"{sum(c > j for c, j in zip(vc, vr)) / len(val_pairs):.3f} right")
pd.DataFrame(wrong).head(10)'''),
    md(r"""
## Normalisation

A raw score means nothing by itself: another reward model, trained from another seed, puts the same
answers somewhere else on its scale, and PPO's `kl_coef` weighs KL against that scale. So the score
is put on a fixed one: sample answers from the SFT policy to **validation prompts** (a share of the
training file, `Config.val_fraction`, that no stage trains on: on its own training prompts an RM
scores higher), and store their mean and standard deviation in the RM's config. `util.reward_scores`
then gives $\text{clip}\big((r - \mu)/\sigma, \pm 5\big)$: the SFT policy scores 0 ± 1, and one
outlier answer cannot dominate a batch. The critic, which starts as this RM, gets the same shift and
scale (`util.critic_values`), so its first values are on the rewards' scale."""),
    code('''actor = util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
prompts = util.validation_prompts(cfg)     # up to 256 prompts no stage trains on
answers = util.sample_answers(actor, tok, prompts, cfg, desc="SFT answers")
scale = util.set_reward_scale(rm, tok, prompts, answers, cfg, device)
print(f"SFT answers to {len(prompts)} validation prompts: raw score mean {scale['reward_offset']:.3f}, "
      f"std {scale['reward_scale']:.3f}; the reward is clip((raw - mean) / std, ±{scale['reward_clip']:g})")
'''),
    code('''metrics = {"preset": cfg.preset, "rm_seconds": rm_seconds, "eval_pairwise_acc": acc, **scale,
           "history": history}
print("saved", util.save_model(rm, tok, cfg.path("critic"), metrics))
util.write_run_record(cfg, "rm", history)           # logs/rm.jsonl and the settings it ran with
del rm
util.free_memory()          # on a GPU: the memory goes back before the next notebook or stage'''),
    md("""
## An ensemble (optional)

One reward model has its own blind spots, and PPO searches for them. `Config.rm_ensemble = N` trains
N - 1 more, each exactly as above but from another seed (another head, another batch order), each on
its own fixed scale from the same SFT answers, into `critic_2/` ... `critic_N/`. PPO's reward is then
the mean of their scores (minus `ensemble_penalty` × their spread): an answer that only one of them
wrongly likes earns less. The critic still starts from `critic/`, and 4_test reports that one."""),
    code('''if cfg.rm_ensemble > 1:
    more = util.train_more_reward_models(cfg, tok, train, evalset, prompts, answers, device)
    display(pd.DataFrame(more)[["path", "eval_acc", "reward_offset", "reward_scale"]])
else:
    print("rm_ensemble = 1: PPO uses model/critic/ alone")
del actor
util.free_memory()'''),
]

# --------------------------------------------------------------------------------------------------- 3_rlhf
NOTEBOOKS["3_rlhf"] = header("3 · RLHF with PPO", r"""
Now the policy (actor) learns from the reward model instead of from demonstrations. Four models take
part:

| model | initialised from | trained? | role |
|---|---|---|---|
| actor $\pi_\theta$ | SFT | yes | writes the answers |
| reference $\pi_{\text{ref}}$ | SFT | frozen | the KL leash |
| critic $V_\phi$ | reward model | yes | predicts future reward per token |
| reward model $r$ | reward model | frozen | scores whole answers |

**One iteration**

1. **Rollout.** Sample answers for a batch of prompts (left-padded, KV-cached generation), at
   temperature $T$. Every log-probability, actor's and reference's, is computed from `logits / T`:
   the same distribution the tokens were sampled from, or the importance ratio is wrong from the
   start.
2. **Stop at EOS.** Tokens after the first EOS are not part of the answer: masked out everywhere (no
   KL, no value, no loss there). An answer without EOS gets a penalty.
3. **Rewards.** Per token: $r_t = -\beta\,\mathrm{KL}_t$ with
   $\mathrm{KL}_t = \log\pi_\theta(y_t) - \log\pi_{\text{ref}}(y_t)$ (k1; k3
   $= e^{-\mathrm{KL}_t} - 1 + \mathrm{KL}_t$ optional). The RM score is added **on the EOS token
   only** — not on a pad after it, where Simple_RLHF puts it.
4. **Advantages** by GAE: $\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t)$,
   $\hat A_t = \sum_l (\gamma\lambda)^l \delta_{t+l}$, returns $\hat R_t = \hat A_t + V(s_t)$; then
   whitened over the real answer tokens.
5. **Several epochs of minibatch updates** on this rollout, so the ratio moves and the clip can act:
   $$L^{\text{clip}} = -\mathbb{E}\big[\min(\rho_t \hat A_t,
     \ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\hat A_t)\big],\quad
     \rho_t = \frac{\pi_\theta(y_t)}{\pi_{\text{old}}(y_t)}$$
   and the value loss $\tfrac12\max\big((V-\hat R)^2, (V_{\text{clip}}-\hat R)^2\big)$ with the
   value clipped around its rollout value. With one epoch and one minibatch, $\rho=1$ always and the
   clip never acts. Gradients are clipped; dropout is off in all four models (otherwise $\rho\neq1$
   before any update). Both learning rates fall linearly to 0 over the run (`util.anneal_lr`).
6. **KL control.** The RM is only a proxy: past some KL from SFT the policy earns score on answers
   the RM wrongly likes (4_test's over-optimisation plot). An adaptive controller (Ziegler et al.
   2019, `util.adaptive_kl`) steers $\beta$ after each iteration so the rollouts' KL nears
   `kl_target`: $\beta \leftarrow \beta\,\big(1 + \mathrm{clip}(\mathrm{KL}/\mathrm{KL}_{\text{target}}
   - 1, \pm0.2)\cdot B/H\big)$ for a batch of $B$ episodes and a horizon of $H$ (`kl_horizon`). The
   RM's scores are on a fixed scale (2_critic: the SFT policy scores 0 ± 1 on validation prompts), so
   a $\beta$ means the same whatever RM was trained.

The **gold execution accuracy** of each rollout is logged beside the RM score, but never used for
training: it tells us whether the policy is really getting better or only pleasing the RM.

The notebook goes in that order: first **one iteration by hand** on 8 prompts, each step with the
very function the training loop calls; then the **loop's source**, as it runs; then the **full run**
and its plots; last, knobs to **try**.""") + [
    md("""
## One iteration by hand

`util.load_ppo_models` loads the four models exactly as `util.train_ppo` does (here fresh from the
SFT model and the reward model, never from a checkpoint), with an AdamW optimizer for the actor and
one for the critic. What this section trains is thrown away before the full run."""),
    code('''import dataclasses
import torch
tok, models, opts = util.load_ppo_models(cfg, device)
prompt_rows = util.load_data(cfg, "prompt")        # as train_ppo reads them
prompt_rows = util.fit_rows(tok, prompt_rows, cfg, (), "PPO prompts")   # as train_ppo fits them
batch = prompt_rows[:8]
for name, m in models.items():
    m = m[0] if isinstance(m, list) else m      # the reward models: a list (an ensemble, or one)
    trained = m is not None and any(p.requires_grad for p in m.parameters())
    print(f"{name:7s}", "the actor with its LoRA adapters off" if m is None else
          f"{type(m).__name__}, {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters, "
          + ("trained" if trained else "frozen"))
print(f"reward models: {len(models['rm'])} (Config.rm_ensemble)")'''),
    md("""
### 1. Rollout

`util.rollout` samples one answer per prompt at temperature $T$, cuts each answer at its first EOS,
then, without gradients, computes what the update needs: the log-probs of the answer tokens under
the actor and under the reference (both at $T$), the critic's value before each token, and the RM
score of each whole answer, read at its EOS. An answer that never emits EOS loses
`missing_eos_penalty` from its score. The gold column (sqlite's verdict) is logged, never trained
on."""),
    code('''util.set_seed(cfg.seed)
ro = util.rollout(models["actor"], models["ref"], models["critic"], models["rm"], tok, batch, cfg)
question = [r["prompt"].split("question= ")[-1].removesuffix(" Assistant:") for r in batch]
pd.DataFrame({"question": question, "answer": ro.texts, "RM score": ro.scores.tolist(),
              "EOS": ro.has_eos.tolist(), "length": ro.mask.sum(1).int().tolist(),
              "gold": ro.gold}).round(3)'''),
    md(r"""
### 2. Rewards and advantages, token by token

`util.ppo_advantages` is step 2 of the loop: the per-token KL (`util.kl_per_token`), the rewards
(`util.place_rewards`: $-\beta\,\mathrm{KL}_t$ on every answer token, plus the RM score on the EOS
token only), GAE (`util.gae_advantages`) and the whitening of the advantages (`util.masked_whiten`).
One answer (the least likely of those that end with EOS), one row per token. Before any update the
actor *is* the reference, so the KL is 0 on every token and the only reward is the score on the last
row; the values are the critic's guesses of what is to come, and the advantage says how much better
than guessed each token turned out. Whitening is over all the batch's answer tokens: an answer that
did better than the critic guessed but worse than the batch's other answers ends up with negative
whitened advantages."""),
    code('''kl, rewards, advantages, returns = util.ppo_advantages(ro, cfg, cfg.kl_coef)
# the least likely answer among those that end with EOS: its tokens show the most
i = int(torch.where(ro.has_eos, -ro.logprobs.sum(1), -float("inf")).argmax())
n = int(ro.mask[i].sum())                # its tokens, up to and including the EOS
tokens = tok.convert_ids_to_tokens(ro.query_responses[i, ro.context_length:][:n].tolist())
row = lambda x: x[i, :n].tolist()
table = pd.DataFrame({"token": tokens, "log-prob": row(ro.logprobs),
                      "ref log-prob": row(ro.ref_logprobs), "KL": row(kl), "reward": row(rewards),
                      "value": row(ro.values),
                      "advantage = return - value": row(returns - ro.values),
                      "advantage, whitened": row(advantages), "return": row(returns)})
print(f"answer {i}: {ro.texts[i]!r}\\nreward on its last token {tokens[-1]!r}: RM score "
      f"{float(ro.scores[i]):.3f} - kl_coef * KL {cfg.kl_coef * float(kl[i, n - 1]):.3f} "
      f"= {float(rewards[i, n - 1]):.3f}")
table[table.columns[1:]] = table[table.columns[1:]].round(4) + 0.0   # + 0.0: no -0.0
table'''),
    md(r"""
Reading the table. The **values** are the critic's guesses before each token; the **returns** what
the answer then earned; their difference is the raw advantage, and it says which way each token is
pushed. How far a token's probability can move is another matter: the gradient of $\log p$ shrinks
as $p$ nears 1, so a token the actor already writes with near certainty hardly moves, whatever its
advantage. The answer's credit lands on its few uncertain tokens. In this batch:"""),
    code('''import math
low = int(table["log-prob"].idxmin())
sure = table["log-prob"] > math.log(0.9)
print(f"value {table['value'].min():.2f} .. {table['value'].max():.2f} along the answer; return "
      f"{table['return'].min():.2f} .. {table['return'].max():.2f}")
print(f"{int(sure.sum())} of {n} tokens have p > 0.9; the least likely is {table['token'][low]!r} "
      f"(p = {math.exp(table['log-prob'][low]):.2f})")
util.expect(table["value"].max() < table["return"].min(),
            "the critic guesses lower than the return at every token: it starts as the reward "
            "model, which scores an unfinished answer low, so every raw advantage is positive")
util.expect(sure.sum() >= n / 2, "most of this answer's tokens are near certain (p > 0.9): the "
            "update can move only the few uncertain ones")'''),
    md(r"""
### GAE, checked against its definition

$\hat A_t = \sum_{l \ge t} (\gamma\lambda)^{l-t}\,\delta_l$ with $\delta_l = r_l + \gamma V_{l+1} -
V_l$, and no value after the EOS: the episode has ended there. Written as a plain double loop over
this rollout, it must give what `util.gae_advantages` (one backward pass over all answers at once)
gives."""),
    code('''gae, _ = util.gae_advantages(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
r, v = rewards.tolist(), ro.values.tolist()
by_hand = torch.zeros_like(gae)
for b in range(len(r)):                          # each answer
    n_b = int(ro.mask[b].sum())                  # its tokens up to and including the EOS
    for t in range(n_b):
        a = 0.0
        for l in range(t, n_b):
            v_next = v[b][l + 1] if l + 1 < n_b else 0.0    # after the EOS: nothing more to come
            delta = r[b][l] + cfg.gamma * v_next - v[b][l]  # better than the critic guessed?
            a += (cfg.gamma * cfg.lam) ** (l - t) * delta  # later surprises count less
        by_hand[b, t] = a
diff, scale = float((gae - by_hand).abs().max()), max(1.0, float(gae.abs().max()))
print(f"util.gae_advantages against the double loop: max |difference| = {diff:.1e} "
      f"(advantages up to {scale:.1f})")
assert diff < 1e-5 * scale                      # float32 holds about 7 significant digits
assert torch.allclose(util.masked_whiten(gae, ro.mask), advantages)  # the loss: it, whitened'''),
    md(r"""
### 3. The losses on one minibatch, and an update

`util.ppo_losses` is what `util.ppo_update` computes on every minibatch: the new log-probs and
values, the ratio $\rho_t = \pi_\theta(y_t)/\pi_{\text{old}}(y_t)$ against the rollout's log-probs,
the clipped policy loss (`util.ppo_policy_loss`) and the clipped value loss (`util.ppo_value_loss`).
The minibatch here is the whole batch of 8. Before the first step the policy *is*
$\pi_{\text{old}}$: the ratio is exactly 1."""),
    code('''mb = torch.arange(len(batch))
mask = ro.mask[mb].bool()                        # real answer tokens only
with torch.no_grad():                            # a look only: ppo_update takes the step below
    out = util.ppo_losses(models["actor"], models["critic"], ro, mb, advantages, returns, cfg)
print(f"before any step: max |ratio - 1| = {float((out['ratio'] - 1).abs()[mask].max()):.1e}")
assert float((out["ratio"] - 1).abs()[mask].max()) < 1e-5
pg, vf = float(out["pg_loss"]), float(out["vf_loss"])
print(f"pg_loss {round(pg, 4) + 0.0:.4f}: the clipped surrogate, -advantage * ratio, token-mean\\n"
      f"  (0 before any step: ratio 1, whitened advantages average 0; its gradient is not 0)\\n"
      f"vf_loss {vf:.4f}: half the squared error of the values against the returns (clipped)\\n"
      f"vf_coef * vf_loss = {cfg.vf_coef} * {vf:.4f} = {cfg.vf_coef * vf:.4f}\\n"
      f"loss = pg_loss + vf_coef * vf_loss = {pg + cfg.vf_coef * vf:.4f}: one backward, but\\n"
      f"  two networks with an optimizer each: vf_coef only scales the critic's gradient")'''),
    md("""
Now one optimizer step on this minibatch, with `util.ppo_update` itself (one epoch, one minibatch),
then the same losses again: the ratio has left 1. Then more steps, as many as `ppo_update` takes on
each rollout (`ppo_epochs` × rollout / minibatch), and what to watch in them:

* `clipfrac` (`util.minibatch_stats`): the share of tokens whose ratio is past $1 \\pm \\epsilon$.
  Where it is past in the direction the token's advantage pushes, the clipped term takes over and
  the token's gradient is 0. The ratio can still move on (the other tokens' gradients share the
  weights, and Adam keeps its momentum): the clip removes the incentive, it is not a wall.
* `vf_clipfrac`: the same for the critic. A value that has moved `cliprange_value` from its rollout
  value, towards its return, stops learning from this rollout, so `vf_loss` can stall within one
  rollout when the critic starts far from the returns.
* the KL from the reference, exact (summed over the whole vocabulary at each answer position, then
  over the answer): 0 before the first step, then growing. (The per-token KL of step 2, log-prob
  minus reference log-prob at the sampled token, estimates it only on answers the current policy
  sampled; on these answers, sampled before the update, it can even turn negative.)"""),
    code('''one_step = dataclasses.replace(cfg, ppo_epochs=1, ppo_minibatch_size=len(batch))
n_steps = cfg.ppo_epochs * -(-cfg.rollout_batch_size // cfg.ppo_minibatch_size)   # per rollout
with util.reference_model(models["actor"], models["ref"]) as ref:   # the frozen SFT policy
    _, ref_logits = util.response_logprobs(ref, ro.query_responses, ro.attention_mask,
                                           ro.context_length)
ref_logp = torch.log_softmax(ref_logits.float() / cfg.temperature, -1)
steps = []
for step in range(1, n_steps + 1):
    models["actor"].train(), models["critic"].train()        # as ppo_iteration does (dropout is 0)
    util.ppo_update(models["actor"], models["critic"], opts["actor"], opts["critic"], ro,
                    advantages, returns, one_step, opts["scaler"])
    models["actor"].eval(), models["critic"].eval()
    with torch.no_grad():
        out = util.ppo_losses(models["actor"], models["critic"], ro, mb, advantages, returns, cfg)
        stats = util.minibatch_stats(out, ro, mb, cfg)
        logp = torch.log_softmax(out["logits"].float() / cfg.temperature, -1)
        kl_exact = (logp.exp() * (logp - ref_logp)).sum(-1) * ro.mask    # per answer position
    steps.append({"step": step, "max |ratio - 1|": float((out["ratio"] - 1).abs()[mask].max()),
                  **{k: float(stats[k]) for k in ("clipfrac", "pg_loss", "vf_clipfrac", "vf_loss")},
                  "KL from ref, exact (nats / answer)": float(kl_exact.sum(1).mean())})
    if step == 1:
        print("after one step, the ratio over the answer tokens:")
        print(pd.Series(out["ratio"][mask].tolist()).describe().round(4).to_string())
pd.DataFrame(steps).round(5)'''),
    md(r"""
### The clipped losses by hand, now that the ratio has moved

After these steps the ratio is no longer 1, so the clip can act. By hand, on the last step's numbers:
a token is clipped where its ratio is past the bound its advantage pushes towards ($\hat A > 0$ and
$\rho > 1 + \epsilon$, or $\hat A < 0$ and $\rho < 1 - \epsilon$); there its loss is
$-\hat A\,(1 \pm \epsilon)$, a constant, and elsewhere $-\hat A\,\rho$. The value loss: the new
value clipped to within `cliprange_value` of the rollout's, the larger of the two squared errors
kept, halved. Both against `util.ppo_policy_loss` and `util.ppo_value_loss`, which `ppo_losses`
called."""),
    code('''A, ratio = advantages[mb], out["ratio"]
lo, hi = 1 - cfg.cliprange, 1 + cfg.cliprange
clipped = ((A > 0) & (ratio > hi)) | ((A < 0) & (ratio < lo))      # past the bound A pushes to
per_token = torch.where(clipped, -A * ratio.clamp(lo, hi), -A * ratio)
pg_by_hand = per_token[mask].mean()
V, V_old, R = out["values"], ro.values[mb], returns[mb]
V_clip = V_old + (V - V_old).clamp(-cfg.cliprange_value, cfg.cliprange_value)
vf_by_hand = 0.5 * torch.maximum((V - R) ** 2, (V_clip - R) ** 2)[mask].mean()
print(f"tokens clipped: {int(clipped[mask].sum())} of {int(mask.sum())}; ratio "
      f"{float(ratio[mask].min()):.3f} .. {float(ratio[mask].max()):.3f}")
print(f"pg_loss by hand {float(pg_by_hand):.6f}   util.ppo_policy_loss {float(out['pg_loss']):.6f}")
print(f"vf_loss by hand {float(vf_by_hand):.6f}   util.ppo_value_loss  {float(out['vf_loss']):.6f}")
assert torch.allclose(pg_by_hand, out["pg_loss"], atol=1e-5)
assert torch.allclose(vf_by_hand, out["vf_loss"], atol=1e-5)
util.expect(clipped[mask].any(), "after these steps on one rollout some tokens are clipped: their "
            "gradient is 0, the incentive to move them further is gone",
            "no ratio moved past its bound on this batch")'''),
    code('''# the full run below loads its own models: these go, and their memory with them
del models, opts, ro, out, ref_logits, ref_logp, logp
util.free_memory()'''),
    md("""
## The loop

`util.train_ppo` runs `ppo_iterations` iterations, each on `rollout_batch_size` prompts drawn afresh
(seeded per iteration, so a resumed run draws the same batches). One iteration is
`util.ppo_iteration`, the very function the loop, the command line (`python util.py ppo`) and the
benchmark run; here is its source, as it runs:"""),
    code('''util.show_source(util.ppo_iteration)'''),
    md("""
Its step 3, `util.ppo_update`: epochs over shuffled minibatches; on each, the losses computed by
hand above, one backward (in micro-batches when `micro_batch_size` is set) and one optimizer
step."""),
    code('''util.show_source(util.ppo_update)'''),
    md("""
## The full run

Training checkpoints go to `model/rlhf/` every `save_every` iterations, atomically. Re-running this
cell after an interruption resumes from the last checkpoint when every setting that shapes PPO is
the same (it says so); a changed knob, say `kl_coef`, starts PPO afresh and names the field that
changed."""),
    code('''t0 = time.time()
history = util.train_ppo(cfg, device)
ppo_seconds = time.time() - t0
print(f"PPO wall time (this run): {ppo_seconds:.0f} s;  iterations: {len(history)}")
util.write_run_record(cfg, "ppo", history)          # logs/ppo.jsonl and the settings it ran with'''),
    code('''h = history
util.plot_history(h, "iteration", [["rm_score"], ["gold_acc"], ["kl"], ["entropy"]],
                  "what PPO optimises, and what it costs")
util.plot_history(h, "iteration", [["clipfrac", "approx_kl"], ["pg_loss"], ["vf_loss"], ["length"],
                                   ["eos_rate"]], "PPO health");'''),
    md("""
What the run's health curves show, in numbers. `kl` is in **nats per answer**: the sum over an
answer's tokens of $\\log\\pi - \\log\\pi_{\\text{ref}}$ (k1), the unit of `kl_target`. `clipfrac` is
the share of tokens the clip acted on, `approx_kl` the mean change of log-prob per token within an
iteration's updates. `vf_coef` scales the critic's loss, but actor and critic are separate networks
with an AdamW each: the factor only scales the critic's gradient, which Adam's normalisation undoes
(it matters through the gradient clip, which then sees a gradient `vf_coef` times smaller)."""),
    code('''log = pd.DataFrame(h)
print(f"clipfrac: mean {log['clipfrac'].mean():.4f}, max {log['clipfrac'].max():.4f};  approx_kl: "
      f"max {log['approx_kl'].max():.4f};  kl (nats / answer): {log['kl'].iloc[-5:].mean():.2f} "
      f"over the last 5 iterations, target {cfg.kl_target}")
util.expect(log["clipfrac"].max() < 0.05, "the clip seldom acts in this run (under 5 % of tokens "
            "in every iteration): the KL penalty and the small, annealed learning rate keep each "
            "update close to the rollout's policy; the clip is the guard, not the brake")'''),
    code('''for fn in (util.ppo_policy_loss, util.ppo_value_loss, util.adaptive_kl):
    util.show_source(fn)                            # the losses and the KL controller, as they run'''),
    code('''times = pd.DataFrame(h)[["time_generate", "time_score", "time_train"]]
print(f"time per iteration: {times.sum(axis=1).mean():.2f} s")
ax = times.plot.area(figsize=(7, 3), title="time split per iteration (s)")
ax.set_xlabel("iteration");'''),
    code('''cols = ["iteration", "rm_score", "gold_acc", "kl", "kl_coef", "entropy", "clipfrac",
        "approx_kl", "ratio_first_minibatch_max_dev", "length", "eos_rate", "sample"]
pd.DataFrame(h)[cols].iloc[::max(1, len(h) // 10)].round(3)'''),
    md("""
`ratio_first_minibatch_max_dev` (the largest |ratio - 1| on the first minibatch) is 0: before the
first update the policy *is* the rollout policy (dropout is off, so a forward in training mode is
the same). `clipfrac` > 0 on later minibatches shows the clip acting."""),
    md("""
## Try it

Each knob changes one line of the loop above. `TRY = True` runs a second PPO beside the first, in
its own folder (`model/try/`, from the same SFT and reward model), and draws both runs; on `tiny` it
takes as long as the run above. Running it again with other knobs starts that folder afresh and says
which fields changed.

1. **The leash.** `kl_coef=0.005, kl_target=0`: ten times looser, and held there (the controller
   off). What to look for: does the KL grow faster and further, and the RM score climb higher? Does
   gold accuracy peak and then fall, as the policy finds answers the RM wrongly likes? That is the
   over-optimisation curve of `4_test.ipynb` (the two left panels: RM score and gold accuracy
   against KL). Then the other way, `kl_coef=1.0, kl_target=0`: how far does the policy still
   move?
2. **Reuse of a rollout.** `ppo_epochs=1` gives each rollout 4 steps on `tiny` (64 answers in
   minibatches of 16) instead of 16. Expect a lower clip fraction (the first minibatch always has
   ratio 1, and the others have moved little) and less learnt per rollout: compare the RM score at
   the same iteration. Then `cliprange=0.05`: the same ratios cross the narrower clip more often, so
   the clip fraction rises and each token's update stops sooner.
3. **The KL target.** `kl_target=0` turns the controller off: `kl_coef` stays where it starts, and
   the KL goes where the RM pulls it. Watch the `kl_coef` panel and the gold accuracy against KL.
   Then `kl_target=4.0`, or `kl_horizon=10000` (Ziegler et al.'s, sized for runs of many more
   episodes): with batches of 64 the coefficient then moves at most 0.2 × 64 / 10000 ≈ 0.13 % per
   iteration, and the KL runs away as with no controller."""),
    code('''# True: one more PPO run (minutes on tiny); smoke runs it in seconds, as a test
TRY = cfg.preset == "smoke"
knobs = dict(kl_coef=cfg.kl_coef / 10, kl_target=0)    # or ppo_epochs=1, cliprange=0.05, ...
if TRY:
    cfg2 = dataclasses.replace(cfg, **knobs, out_dir=str(cfg.path("try")))
    for d in ("actor", "critic"):          # the same SFT and reward model: only the knobs differ
        if not cfg2.path(d).exists():
            cfg2.path(d).parent.mkdir(parents=True, exist_ok=True)
            cfg2.path(d).symlink_to(cfg.path(d).resolve(), target_is_directory=True)
    h2 = util.train_ppo(cfg2, device)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for name, run in (("the run above", h), (", ".join(f"{k}={v}" for k, v in knobs.items()), h2)):
        run = pd.DataFrame(run)
        axes[0].plot(run["kl"], run["rm_score"], ".-", label=name)
        axes[1].plot(run["kl"], run["gold_acc"], ".-", label=name)
        axes[2].plot(run["iteration"], run["clipfrac"], ".-", label=name)
        axes[3].plot(run["iteration"], run["kl_coef"], ".-", label=name)
    titles = [("KL", "RM score"), ("KL", "gold accuracy"), ("iteration", "clipfrac"),
              ("iteration", "kl_coef")]
    for ax, (x, y) in zip(axes, titles):
        ax.set_xlabel(x), ax.set_title(y), ax.grid(alpha=0.3)
    axes[0].legend();'''),
]

# --------------------------------------------------------------------------------------------------- 4_test
NOTEBOOKS["4_test"] = header("4 · Before and after", """
Every model present is evaluated on the same held-out prompts it never trained on:
* **execution accuracy** greedy and sampled (the gold metric, from sqlite),
* the **RM score** (the proxy PPO optimised), and the **win rate** against SFT by the RM,
* **KL to SFT**: how far the policy moved, in nats per answer,
* answer length and EOS rate.""") + [
    code('''from pathlib import Path
tok = util.load_tokenizer(cfg.path("actor"))
evalset = util.load_data(cfg, "eval")      # Config.eval_data, by default dataset/eval.json
rm = util.load_score_model(cfg.path("critic"), device=device, cfg=cfg)
ref = util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
candidates = {"SFT": "actor", "RLHF (PPO)": "rlhf", "DPO": "dpo", "GRPO": "grpo"}
present = {name: d for name, d in candidates.items() if (cfg.path(d) / "config.json").exists()}
print("models found:", list(present))'''),
    code('''results, rows = {}, {}
for name, d in present.items():
    util.set_seed(cfg.seed)
    model = util.load_causal_lm(cfg.path(d), device=device, cfg=cfg)
    results[name], rows[name] = util.evaluate_policy(model, tok, evalset, cfg, rm=rm, ref=ref, desc=name)
    del model
    util.free_memory()      # one evaluated model on the GPU at a time
for name in results:
    results[name]["win_rate_vs_sft"] = util.win_rate([r["rm_score"] for r in rows[name]], [r["rm_score"] for r in rows["SFT"]])
table = pd.DataFrame(results).T
# your own data without setup_sql: no execution accuracy, the rest of the table still holds
has_gold = "exec_acc_greedy" in table
if not has_gold:
    print(util.no_gold_note(0, len(evalset)))
table'''),
    code('''fig, ax = plt.subplots(figsize=(7, 3))
if has_gold:
    table[["exec_acc_greedy", "exec_acc_sampled"]].plot.bar(ax=ax, rot=0, ylim=(0, 1), title="execution accuracy (held-out)")
else:
    table[["win_rate_vs_sft"]].plot.bar(ax=ax, rot=0, ylim=(0, 1), title="win rate vs SFT by the RM (held-out)")
ax.grid(axis="y", alpha=0.3)
fig.savefig(cfg.path("report.png"), dpi=110, bbox_inches="tight");'''),
    code('''pd.DataFrame({name: {f: v["sampled_ok"] for f, v in util.per_family_accuracy(r).items()} for name, r in rows.items()})'''),
    md("Side by side, sampled answers (✓ = same result as the gold SQL; no mark without `setup_sql`):"),
    code('''side = pd.DataFrame({"family": [r["family"] for r in rows["SFT"]], "gold": [r["gold"] for r in rows["SFT"]]})
mark = {True: "✓ ", False: "✗ ", None: ""}
for name in rows:
    side[name] = [mark[r["sampled_ok"]] + r["sampled"] for r in rows[name]]
side.groupby("family").head(2).sort_values("family")'''),
    md("""
## Over-optimisation

Along PPO training: the RM score (proxy) and the gold accuracy against the KL from SFT. While both rise
together the RM is a good proxy; where the RM score keeps rising but gold accuracy stalls or falls, the policy
has started to exploit the RM. The KL penalty keeps it near the region where the RM was trained."""),
    code('''import json
ppo_history = json.loads((cfg.path("rlhf") / "metrics.json").read_text()) if "RLHF (PPO)" in present else []
if ppo_history:
    ph = pd.DataFrame(ppo_history).sort_values("kl")
    smooth = ph[["kl", "rm_score", "gold_acc"]].rolling(9, center=True, min_periods=3).mean()   # trend through noisy iterations
    fig, ax1 = plt.subplots(figsize=(7, 3.5))
    ax1.scatter(ph["kl"], ph["rm_score"], color="C0", alpha=0.35, s=14)
    ax1.plot(smooth["kl"], smooth["rm_score"], color="C0", lw=2, label="RM score (proxy)")
    ax1.set_xlabel("KL to SFT of the rollouts (nats / answer)"); ax1.set_ylabel("RM score", color="C0")
    ax2 = ax1.twinx()
    ax2.scatter(ph["kl"], ph["gold_acc"], color="C1", alpha=0.35, s=14, marker="s")
    ax2.plot(smooth["kl"], smooth["gold_acc"], color="C1", lw=2, label="gold accuracy")
    ax2.set_ylabel("gold execution accuracy", color="C1")
    ax1.set_title("proxy vs gold along PPO training (dots: iterations, lines: running mean)")
    fig.savefig(cfg.path("overoptimisation.png"), dpi=110, bbox_inches="tight");'''),
    code('''report = {"preset": cfg.preset, "n_eval_prompts": len(evalset), "temperature": cfg.temperature,
          "models": results, "per_family": {n: util.per_family_accuracy(r) for n, r in rows.items()},
          "not_measured": {} if has_gold else {"exec_acc": util.no_gold_note(0, len(evalset))}}
util.write_json(report, cfg.path("report.json"))
print("wrote", cfg.path("report.json"))'''),
    md("""
## Across seeds

One run is not a result: the seed changes the tiny base model, SFT's batches, the reward model and
every sampled rollout, and an RL stage can land anywhere in a range. `make seeds` runs this whole
pipeline (every notebook) for seeds 0, 1 and 2 and writes `docs/seeds.json` and the table below:
mean ± standard deviation, and the worst seed in brackets."""),
    code('''seeds = util.ROOT / "docs" / "seeds.md"
if seeds.exists():
    from IPython.display import Markdown, display
    display(Markdown(seeds.read_text()))
else:
    print("no docs/seeds.md yet: `make seeds` runs the whole pipeline for 3 seeds and writes it")'''),
]

# --------------------------------------------------------------------------------------------------- 5_dpo
NOTEBOOKS["5_dpo"] = header("5 · DPO: preferences without a reward model", r"""
PPO needed four models, sampling and a value function. **Direct Preference Optimisation** (Rafailov et al., 2023)
gets rid of the reward model and the sampling. The KL-regularised RLHF objective
$\max_\pi \mathbb{E}[r(x,y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{\text{ref}})$ has a closed-form optimum
$\pi^*(y\mid x) \propto \pi_{\text{ref}}(y\mid x)\,e^{r(x,y)/\beta}$, so any reward can be written through its optimal policy:
$r(x,y) = \beta \log\frac{\pi^*(y\mid x)}{\pi_{\text{ref}}(y\mid x)} + \text{const}(x)$. Put that into the Bradley–Terry
loss of the reward model (notebook 2) and the constant cancels:

$$\mathcal{L}_{\text{DPO}} = -\log\sigma\Big(\beta\big[\log\tfrac{\pi_\theta(y_c\mid x)}{\pi_{\text{ref}}(y_c\mid x)} - \log\tfrac{\pi_\theta(y_r\mid x)}{\pi_{\text{ref}}(y_r\mid x)}\big]\Big)$$

The policy *is* the reward model: $\hat r(x,y) = \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{\text{ref}}(y\mid x)}$ is its **implicit
reward**. We train on the same preference pairs as the RM, from the SFT actor, with the frozen SFT model as
$\pi_{\text{ref}}$; $\log\pi(y\mid x)$ is the sum of the answer tokens' log-probs (prompt and pads masked, as in SFT).

**DPO's known failure, and the remedy used here.** The loss only sees the *gap* $h$ between chosen and rejected,
and $-\log\sigma(\beta h)$ keeps rewarding a larger gap forever. The gap can grow while *both* answers lose
probability ("likelihood displacement", Razin et al. 2024; Pal et al. 2024): the mass goes to answers in neither
column, and nothing in offline DPO ever looks at them. Two remedies are one setting away:

* `dpo_loss="ipo"` (IPO, Azar et al., 2023), **the default** (the `opt` preset keeps the DPO paper's loss and
  settings): $(h - \tfrac{1}{2\beta})^2$ with $h$ the bracket above. It pulls each pair's gap to $1/(2\beta)$ (5 nats at $\beta = 0.1$) and stops pushing there.
* `dpo_sft_weight` $= \alpha > 0$ (RPO, Pang et al., 2024) adds the SFT loss of notebook 1 on the chosen answers,
  per token, which holds their probability up:
  $\mathcal{L} = \mathcal{L}_{\text{DPO}} + \alpha\,\frac{-\log\pi_\theta(y_c\mid x)}{|y_c|}$.

The default was chosen on the validation split, against plain DPO (`dpo_loss="sigmoid"`) and other recipes, by
`.dev/dpo_sweep.py`: its table follows the training curves below.

* With `lora_r > 0` the actor gets LoRA adapters, and $\pi_{\text{ref}}$ is the same model with the adapters switched off:
  one copy of the weights instead of two.

What DPO cannot do: it only ever sees the answers in the dataset, never its own samples (it is *offline*).""") + [
    code('''tok = util.load_tokenizer(cfg.path("actor"))
train = util.load_data(cfg, "pref")                # Config.pref_data: train.json unless set
val = util.load_data(cfg, "pref", split="val")     # training rows held out: the curves' data
evalset = util.load_data(cfg, "eval")              # the test set: only the final table reads it
actor = util.add_lora(util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
ref = None if cfg.lora_r else util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False)
print(f"{len(train)} preference pairs to train on, {len(val)} for validation; beta={cfg.dpo_beta}, "
      f"loss={cfg.dpo_loss}, SFT weight (RPO)={cfg.dpo_sft_weight}, LoRA rank={cfg.lora_r}")'''),
    md("""
## One step by hand

A batch of 4 pairs (the loop draws `dpo_batch_size` at random; here the first 4 rows).
`util.pair_batch` puts the 4 chosen answers, then the 4 rejected ones, in one SFT-style batch;
`util.answer_logprobs` sums each answer's token log-probs, under the policy and under the reference.
At the start the policy *is* the reference (the SFT model), so every implicit reward
$\\beta(\\log\\pi - \\log\\pi_{\\text{ref}})$ in the table is 0."""),
    code('''import math
import torch
import torch.nn.functional as F
pairs, beta = train[:4], cfg.dpo_beta
k = len(pairs)
ids, mask, labels = (t.to(device) for t in util.pair_batch(tok, pairs, cfg))
with torch.no_grad():
    logp = util.answer_logprobs(actor, ids, mask, labels)             # log pi(y | x), 8 answers
    with util.reference_model(actor, ref) as r:
        ref_logp = util.answer_logprobs(r, ids, mask, labels)         # log pi_ref(y | x)
print(f"policy vs reference: largest |log-prob difference| {(logp - ref_logp).abs().max():.1e}")
assert torch.allclose(logp, ref_logp, atol=1e-4)
reward = beta * (logp - ref_logp)                    # the implicit rewards, chosen then rejected
h = (logp[:k] - ref_logp[:k]) - (logp[k:] - ref_logp[k:])
pd.DataFrame({"chosen": [p["chosen"] for p in pairs], "rejected": [p["rejected"] for p in pairs],
              "log π(y_c)": logp[:k].tolist(), "log π_ref(y_c)": ref_logp[:k].tolist(),
              "log π(y_r)": logp[k:].tolist(), "log π_ref(y_r)": ref_logp[k:].tolist(),
              "r̂(y_c)": reward[:k].tolist(), "r̂(y_r)": reward[k:].tolist(), "h": h.tolist()})'''),
    md("""
The DPO loss by hand, $-\\log\\sigma(\\beta h)$ averaged over the pairs, against
`util.dpo_loss` (what `train_dpo` calls), and the IPO variant $(h - \\tfrac{1}{2\\beta})^2$.
At the start $h = 0$ for every pair, so the DPO loss is $-\\log\\sigma(0) = \\log 2$ whatever the
data: the policy prefers nothing the reference does not. Its gradient is not 0:
$\\partial\\mathcal{L}/\\partial h = -\\beta\\,\\sigma(-\\beta h) = -\\beta/2$, so the first step
pushes $\\log\\pi(y_c)$ up and $\\log\\pi(y_r)$ down. IPO starts at $(1/(2\\beta))^2$ and pulls
$h$ towards $1/(2\\beta)$."""),
    code('''by_hand = -F.logsigmoid(beta * h).mean()
loss, rc, rr = util.dpo_loss(logp[:k], logp[k:], ref_logp[:k], ref_logp[k:], beta, "sigmoid")
ipo_by_hand = ((h - 1 / (2 * beta)) ** 2).mean()
ipo, _, _ = util.dpo_loss(logp[:k], logp[k:], ref_logp[:k], ref_logp[k:], beta, "ipo")
print(f"DPO loss by hand: {by_hand:.6f}   util.dpo_loss: {loss:.6f}   log 2 = {math.log(2):.6f}")
print(f"IPO loss by hand: {ipo_by_hand:.4f}   util.dpo_loss(..., 'ipo'): {ipo:.4f}   "
      f"(1/(2 beta))^2 = {1 / (2 * beta) ** 2:.4f}")
print(f"the loop uses dpo_loss={cfg.dpo_loss!r}, beta={beta}")
assert torch.isclose(by_hand, loss) and torch.isclose(ipo_by_hand, ipo)
assert torch.allclose(rc, reward[:k]) and torch.allclose(rr, reward[k:])'''),
    md("""
The RPO term by hand: the chosen answers' $-\\log\\pi_\\theta(y_c\\mid x)$ summed, over their number of tokens (the
labels that are not $-100$): one token mean over the batch, as in SFT, against `util.chosen_nll` (what `dpo_step` adds, times
`dpo_sft_weight`). Unlike the DPO loss it does not start at the same value for every batch: it is notebook 1's SFT
loss on these answers, and its gradient raises $\\log\\pi(y_c)$ whatever happens to $y_r$."""),
    code('''n_tokens = (labels[:k, 1:] != -100).sum(1)                  # answer tokens of each chosen answer
nll_by_hand = -logp[:k].sum() / n_tokens.sum()              # every chosen token weighs the same
nll = util.chosen_nll(logp[:k], labels[:k])
print("tokens per chosen answer:", n_tokens.tolist())
print(f"SFT term by hand: {nll_by_hand:.4f}   util.chosen_nll: {nll:.4f}")
step_loss = (ipo if cfg.dpo_loss == "ipo" else loss) + cfg.dpo_sft_weight * nll      # what dpo_step minimises
print(f"this config's loss on the batch: {cfg.dpo_loss} {(ipo if cfg.dpo_loss == 'ipo' else loss):.4f} "
      f"+ {cfg.dpo_sft_weight} x {nll:.4f} = {step_loss:.4f}")
assert torch.isclose(nll_by_hand, nll)'''),
    code('''t0 = time.time()
history = util.train_dpo(actor, ref, tok, train, val, cfg, device)
dpo_seconds = time.time() - t0
print(f"DPO wall time: {dpo_seconds:.0f} s")
util.plot_history(history, "step", [["train_loss"], ["train_reward_acc", "val_reward_acc"],
                                    ["chosen_reward", "rejected_reward", "train_margin"]], "DPO: what it optimises")
util.plot_history(history, "step", [["val_chosen_logratio", "val_rejected_logratio"], ["val_exec_acc_sampled"],
                                    ["val_kl_to_sft"]], "DPO: what happens to the answers (validation split)");'''),
    md("""
**Reading the curves.** The first row is what DPO optimises: the loss, the implicit-reward accuracy (DPO's version
of the RM's pairwise accuracy, here on validation pairs) and the implicit rewards
$\\hat r = \\beta\\log\\frac{\\pi}{\\pi_{\\text{ref}}}$ of the training batches. The second row is what a user gets.
`val_chosen_logratio` and `val_rejected_logratio` are $\\log\\pi_\\theta(y) - \\log\\pi_{\\text{ref}}(y)$ in nats on
the validation pairs: the accuracy only needs the first above the second, so it can rise while *both* fall.
`val_exec_acc_sampled` runs one sampled answer per validation prompt in sqlite, and `val_kl_to_sft` is measured on
those samples: DPO never sees its own answers, so only these two show what it now writes. This run's figures:"""),
    code('''first, last = history[0], history[-1]
print(f"implicit-reward accuracy (validation pairs): {first['val_reward_acc']:.2f} at the start -> "
      f"{last['val_reward_acc']:.2f}")
print(f"log pi - log pi_ref, chosen answers:   {last['val_chosen_logratio']:+.2f} nats "
      f"({'up' if last['val_chosen_logratio'] > 0 else 'DOWN'}: the policy finds them "
      f"{math.exp(last['val_chosen_logratio']):.2f}x as likely as SFT did)")
print(f"log pi - log pi_ref, rejected answers: {last['val_rejected_logratio']:+.2f} nats")
if "val_exec_acc_sampled" in last:
    print(f"sampled execution accuracy on the validation prompts: {first['val_exec_acc_sampled']:.3f} -> "
          f"{last['val_exec_acc_sampled']:.3f}; KL to SFT {last['val_kl_to_sft']:.2f} nats")'''),
    md("""
## Plain DPO beside the default: the validation sweep

`.dev/dpo_sweep.py` trained DPO from one SFT model with each candidate recipe and several seeds (the seed changes
the batch order), and scored every policy on the **validation split** (training prompts that no stage trains on),
never on `eval.json`. Its rule: among the recipes that keep every question family within 0.05 of SFT and stay
within 2 nats of it, the one whose *worst* seed has the highest sampled accuracy. `plain` is the DPO paper's loss
with this project's earlier settings (1 epoch, lr 1e-4, $\\beta$ = 0.1); `rpo` adds the SFT term (weight 1; `rpo-w2`:
2), `lr3e-5` and `rpo-lr3e-5` take a third of the learning rate, `ipo` is IPO and `beta0.5` a larger $\\beta$.
`docs/dpo_sweep.json` holds every run with its per-family table and its curves."""),
    code('''import json
from IPython.display import display
sweep_file = util.ROOT / "docs" / "dpo_sweep.json"
sweep = json.loads(sweep_file.read_text()) if sweep_file.exists() else {}
if sweep:
    fields = next(v["recipe"] for k, v in sweep.items() if k != "SFT")
    mine = {f: getattr(cfg, f) for f in fields}
    runs = pd.DataFrame([{"recipe": k.split("/")[0], "this config": v["recipe"] == mine, "seed": v["seed"],
                          "sampled": v["validation"]["exec_acc_sampled"],
                          "greedy": v["validation"]["exec_acc_greedy"], "KL": v["validation"]["kl_to_sft"],
                          "fall": v["family_drop"]} for k, v in sweep.items() if k != "SFT"])
    sft_val = sweep["SFT"]["validation"]
    print(f"SFT on the validation split: sampled {sft_val['exec_acc_sampled']:.3f}, "
          f"greedy {sft_val['exec_acc_greedy']:.3f}")
    display(runs.groupby(["recipe", "this config"]).agg(
        seeds=("seed", "count"), sampled_mean=("sampled", "mean"), sampled_worst=("sampled", "min"),
        greedy_mean=("greedy", "mean"), KL_max=("KL", "max"), largest_family_fall=("fall", "max"))
        .round(3).sort_values("sampled_worst", ascending=False))
else:
    print("no docs/dpo_sweep.json: python .dev/dpo_sweep.py writes it")'''),
    code('''# the second row of curves for plain DPO and for this config's recipe: seed 0 of the sweep
names = ["plain", *(runs[runs["this config"]].recipe.unique() if sweep else [])]
shown = {name: sweep[f"{name}/seed0"]["history"] for name in dict.fromkeys(names) if f"{name}/seed0" in sweep}
if shown:
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.2))
    for name, h in shown.items():
        for ax, key in zip(axes, ["val_chosen_logratio", "val_exec_acc_sampled", "val_kl_to_sft"]):
            pts = [(p["step"], p[key]) for p in h if key in p]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=name)
            ax.set_title(key); ax.set_xlabel("step"); ax.grid(alpha=0.3); ax.legend()
    fig.tight_layout()
    plt.show()
    for name, h in shown.items():
        print(f"{name}, seed 0, at the end: chosen log-ratio {h[-1]['val_chosen_logratio']:+.2f} nats, "
              f"sampled validation accuracy {h[-1]['val_exec_acc_sampled']:.3f}, KL to SFT {h[-1]['val_kl_to_sft']:.2f}")'''),
    md("## The gold metric: execution accuracy on held-out prompts, next to SFT"),
    code('''import json
util.set_seed(cfg.seed)
rm = util.load_score_model(cfg.path("critic"), device=device, cfg=cfg)
sft_model = ref if ref is not None else util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
summary, rows = util.evaluate_policy(actor, tok, evalset, cfg, rm=rm, ref=sft_model, desc="DPO")
sft = json.loads((cfg.path("actor") / "metrics.json").read_text())
keys = ["exec_acc_greedy", "exec_acc_sampled", "rm_score", "kl_to_sft", "eos_rate"]
print("–: not measured (1_actor's evaluation of SFT ran before there was a reward model)")
pd.DataFrame({"SFT": {k: sft.get(k) for k in keys}, "DPO": {k: summary[k] for k in keys}}).T.fillna("–")'''),
    code('''pd.DataFrame({"SFT": {f: v["sampled_ok"] for f, v in sft["per_family"].items()},
              "DPO": {f: v["sampled_ok"] for f, v in util.per_family_accuracy(rows).items()}})'''),
    code('''pd.DataFrame(rows)[["family", "gold", "greedy", "sampled", "sampled_ok"]].head(10)'''),
    code('''metrics = {"preset": cfg.preset, "dpo_seconds": dpo_seconds, "beta": cfg.dpo_beta, "loss": cfg.dpo_loss,
           "lora_r": cfg.lora_r, "history": history, **summary, "per_family": util.per_family_accuracy(rows)}
print("saved", util.save_model(actor, tok, cfg.path("dpo"), metrics))
util.write_run_record(cfg, "dpo", history)          # logs/dpo.jsonl and the settings it ran with
del actor, ref, rm, sft_model
util.free_memory()          # on a GPU: the memory goes back before the next notebook or stage'''),
]

# --------------------------------------------------------------------------------------------------- 6_grpo
NOTEBOOKS["6_grpo"] = header("6 · GRPO: group-relative rewards, no critic", r"""
**Group Relative Policy Optimisation** (Shao et al., 2024, DeepSeekMath) keeps PPO's clipped update but drops
the critic. For each prompt it samples a **group** of $G$ answers, scores them, and uses how each answer did
*relative to its own group* as the advantage of every one of its tokens:

$$\hat A_i = \frac{r_i - \operatorname{mean}(r_1..r_G)}{\operatorname{std}(r_1..r_G)}$$

The group mean plays the role of the value function's baseline. A group where every answer gets the same reward
carries no signal ($\hat A = 0$): too easy or too hard prompts teach nothing.

$$\mathcal{L} = -\frac1G\sum_i \frac1{|y_i|}\sum_t \Big[\min\big(\rho_{i,t}\hat A_i,\ \mathrm{clip}(\rho_{i,t},1\pm\epsilon)\hat A_i\big) - \beta\,\mathrm{KL}^{k3}_{i,t}\Big]$$

The KL to the SFT reference is a term in the **loss** (with the k3 estimator, always ≥ 0), not in the reward as in PPO.

**Rewards.** Our task is verifiable, so GRPO can use rewards that need no learned model:
* **execution accuracy**: 1 when the answer's result in sqlite equals the gold query's result, else 0;
* **format**: +`grpo_format_weight` for a single `SELECT` statement that runs and ends with EOS;
* optionally the **reward model** (`grpo_rm_weight > 0`), as in PPO.

Note what this changes: with the execution reward, training optimises the gold metric itself (on *training*
prompts); the evaluation below stays on held-out prompts. There is no proxy to over-optimise, which is why
verifiable rewards are popular — where they exist.""") + [
    md("""
## One step by hand: one group

One prompt, $G$ = `grpo_group_size` answers sampled from the SFT actor with the loop's own
sampler (`util.generate`, at the loop's temperature), each cut at its first EOS
(`util.response_mask`), rewarded in sqlite (`util.exec_rewards`, `util.format_rewards`), then given
its group-relative advantage (`util.group_advantages`): the steps of `util.grpo_iteration`, for one
of its prompts. Many prompts teach nothing: the SFT actor writes answers of the same worth every
time, so the group's rewards are all equal, and so are its advantages. The cell samples groups for
prompts of the `compare` family, one after the other, until it meets one whose rewards differ, and
keeps the first all-equal group it met too. Look at the `advantage` column."""),
    code('''import torch
tok = util.load_tokenizer(cfg.path("actor"))
train = util.load_data(cfg, "prompt")              # as train_grpo reads them
sft = util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)    # the policy at iteration 0


def sample_group(row):
    """One prompt, G times, as in grpo_iteration: sampled, cut at EOS, rewarded, advantages."""
    group = [row] * cfg.grpo_group_size
    qr, prompt_mask, lq = util.generate(sft, tok, [r["prompt"] for r in group], cfg)
    responses = qr[:, lq:]
    mask = util.response_mask(responses, tok.eos_token_id).float()   # 1 up to the first EOS
    _, has_eos = util.first_eos_index(responses, tok.eos_token_id)
    texts = util.decode_responses(tok, responses)
    acc = util.exec_rewards(group, texts)
    fmt = util.format_rewards(group, texts, has_eos.tolist())
    rewards = torch.tensor(acc) + cfg.grpo_format_weight * torch.tensor(fmt)
    return dict(row=row, qr=qr, prompt_mask=prompt_mask, lq=lq, mask=mask, has_eos=has_eos,
                texts=texts, acc=acc, fmt=fmt, rewards=rewards,
                adv=util.group_advantages(rewards, cfg.grpo_group_size))


util.set_seed(cfg.seed)
mixed = flat = None
tried = []                                          # True: that prompt's group had mixed rewards
for row in [r for r in train if r.get("family") == "compare"][:30]:
    g = sample_group(row)
    tried.append(len(set(g["rewards"].tolist())) > 1)
    if tried[-1]:
        mixed = mixed or g
    else:
        flat = flat or g
    if mixed and flat:
        break
print(f"groups sampled: {len(tried)}, with mixed rewards: {sum(tried)}")
g = mixed or flat                     # (in the smoke preset every group may be all-equal)
qr, prompt_mask, lq, mask, has_eos = g["qr"], g["prompt_mask"], g["lq"], g["mask"], g["has_eos"]
texts, acc, fmt, rewards, adv = g["texts"], g["acc"], g["fmt"], g["rewards"], g["adv"]
print(g["row"]["prompt"], "\\ngold:", g["row"]["chosen"])
pd.DataFrame({"answer": texts, "tokens": mask.sum(1).int().tolist(), "EOS": has_eos.tolist(),
              "exec": acc, "format": fmt, "reward": rewards.tolist(),
              "advantage": adv.tolist()})'''),
    code('''util.expect(mixed is not None and (adv > 0).any() and (adv < 0).any(),
            "in this group the answers above the mean reward get a positive advantage, those "
            "below a negative one", "no group with mixed rewards among the prompts tried")
if flat is not None:
    print("\\nan all-equal group:", flat["row"]["prompt"][-70:])
    print("  rewards:   ", [round(r, 2) for r in flat["rewards"].tolist()])
    print("  advantages:", [f"{a:.1e}" for a in flat["adv"].tolist()])
    # (r - mean) / (std + 1e-4) with std 0: what is left is float32's rounding of r - mean
    util.expect(flat["adv"].abs().max() < 1e-2,
                "an all-equal group gives every answer an advantage of about 0 (float32 rounding "
                "divided by the helper's eps 1e-4): no signal; only the KL term acts on it")'''),
    md("""
By hand: the group's mean and standard deviation, and the advantages $(r_i - \\text{mean}) /
\\text{std}$, against `util.group_advantages`. (With `grpo_rm_weight > 0` the loop adds the reward
model's score to each reward; it is 0 here unless set.) Then the GRPO loss of this group with
`util.grpo_loss` at iteration 0: the policy is the one that sampled and also the reference, so every
ratio is 1 and every KL 0, and the loss is $-\\text{mean}_i \\hat A_i = 0$. Its gradient is not 0:
it raises the log-probabilities of the answers above the group's mean and lowers the others."""),
    code('''mean, std = rewards.mean(), rewards.std()           # std with n - 1, torch's default
by_hand = (rewards - mean) / (std + 1e-4)           # + 1e-4 (the helper's eps): all equal gives 0
print(f"group mean {mean:.3f}, std {std:.3f}")
print("advantages by hand:        ", [round(a, 4) for a in by_hand.tolist()])
print("util.group_advantages:     ", [round(a, 4) for a in adv.tolist()])
assert torch.allclose(by_hand, adv)
attn = torch.cat([prompt_mask, mask.long()], 1)
with torch.no_grad():                                # the policy that sampled: old log-probs
    old_logprobs, _ = util.response_logprobs(sft, qr, attn, lq, cfg.temperature)
ref_logprobs = old_logprobs                          # the reference is the same SFT model here
logprobs, _ = util.response_logprobs(sft, qr, attn, lq, cfg.temperature)   # with gradient
loss, kl, ratio = util.grpo_loss(logprobs, old_logprobs, ref_logprobs, adv.to(device), mask,
                                 cfg.cliprange, cfg.grpo_kl_coef)
on = mask.bool()
grads = torch.autograd.grad(loss, [p for p in sft.parameters() if p.requires_grad])
print(f"ratio on the answer tokens: {ratio[on].min():.4f} .. {ratio[on].max():.4f}   "
      f"KL: {kl[on].abs().max():.1e}")
print(f"GRPO loss: {loss:.1e}   mean advantage: {adv.mean():.1e}   "
      f"gradient norm: {torch.cat([g.flatten() for g in grads]).norm():.4f}")
tol = 1e-5 if util.resolve_precision(cfg, device) == "fp32" else 1e-2   # bf16 / fp16 round
assert (ratio[on] - 1).abs().max() < tol and kl[on].abs().max() < tol
assert abs(float(loss.detach() + adv.mean())) < tol      # loss = -mean advantage at ratio 1
del sft, grads, logprobs, loss, kl, ratio             # the graph too: training loads its own actor
util.free_memory()'''),
    code('''print(f"{cfg.grpo_iterations} iterations x {cfg.grpo_prompts} prompts x {cfg.grpo_group_size} answers; "
      f"KL coef {cfg.grpo_kl_coef}, format weight {cfg.grpo_format_weight}, RM weight {cfg.grpo_rm_weight}, LoRA rank {cfg.lora_r}")
t0 = time.time()
actor, history = util.train_grpo(cfg, device)
grpo_seconds = time.time() - t0
print(f"GRPO wall time: {grpo_seconds:.0f} s")'''),
    code('''util.plot_history(history, "iteration", [["reward"], ["gold_acc", "format_rate"], ["kl"], ["groups_without_signal", "clipfrac"]],
                  "GRPO: reward on the training prompts and what it costs");'''),
    code('''cols = ["iteration", "reward", "gold_acc", "format_rate", "groups_without_signal", "kl", "clipfrac", "length", "sample"]
pd.DataFrame(history)[cols].iloc[::max(1, len(history) // 10)].round(3)'''),
    md("""
Two columns of the log need reading. `groups_without_signal` is the share of an iteration's groups
whose rewards were all equal (all right, or all wrong the same way): like the group above, they give
every answer an advantage of about 0, so only the other groups move the policy, and the KL term. It
grows as the policy gets more training prompts right every time. `format_rate` is the share of
answers that earn the format reward: the SFT actor already writes one `SELECT` ending in EOS, so it is
near 1 from the start, and the format reward, the same for every answer of a group, cancels in the
advantage. And `kl` in this log is the loss's own term: the k3 estimate, a **mean per answer
token**; the evaluation's `kl_to_sft` below is k1 summed over an answer, **nats per answer**, as in
PPO. What this run shows:"""),
    code('''log = pd.DataFrame(history)
k = max(1, len(log) // 4)                            # the first and the last quarter of the run
early, late = log["groups_without_signal"][:k].mean(), log["groups_without_signal"][-k:].mean()
print(f"groups without signal: {early:.2f} of them in the first {k} iterations, {late:.2f} in the "
      f"last {k}; format_rate {log['format_rate'].min():.2f} at its lowest")
util.expect(late > early, "groups without signal grow as the policy gets the training prompts "
            "right every time")
util.expect(log["format_rate"].min() > 0.9, "format_rate stays near 1: the format reward is the "
            "same for every answer of a group, so it hardly ever makes an advantage")'''),
    md("## The gold metric on held-out prompts, next to SFT"),
    code('''import json
evalset = util.load_data(cfg, "eval")
util.set_seed(cfg.seed)
rm = util.load_score_model(cfg.path("critic"), device=device, cfg=cfg)
sft_model = util.load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
summary, rows = util.evaluate_policy(actor, tok, evalset, cfg, rm=rm, ref=sft_model, desc="GRPO")
sft = json.loads((cfg.path("actor") / "metrics.json").read_text())
keys = ["exec_acc_greedy", "exec_acc_sampled", "rm_score", "kl_to_sft", "eos_rate"]
print("–: not measured (1_actor's evaluation of SFT ran before there was a reward model)")
pd.DataFrame({"SFT": {k: sft.get(k) for k in keys}, "GRPO": {k: summary[k] for k in keys}}).T.fillna("–")'''),
    code('''pd.DataFrame({"SFT": {f: v["sampled_ok"] for f, v in sft["per_family"].items()},
              "GRPO": {f: v["sampled_ok"] for f, v in util.per_family_accuracy(rows).items()}})'''),
    code('''metrics = {"preset": cfg.preset, "grpo_seconds": grpo_seconds, "lora_r": cfg.lora_r, "history": history,
           **summary, "per_family": util.per_family_accuracy(rows)}
print("saved", util.save_model(actor, tok, cfg.path("grpo"), metrics))
util.write_run_record(cfg, "grpo", history)         # logs/grpo.jsonl and the settings it ran with
del actor, rm, sft_model
util.free_memory()          # on a GPU: the memory goes back before the next notebook or stage'''),
]


def main(names=()):
    """Writes every notebook, or only those named on the command line."""
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = nbf.v4.new_notebook()
        nb.cells = cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbf.write(nb, ROOT / f"{name}.ipynb")
        print("wrote", name)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
