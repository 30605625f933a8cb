"""Text to token ids, and token ids to padded batches: prompts (BOS in front) and answers (EOS
after), the rows whose answers fit the token limits, left padding for generation, right padding
for training, the (input_ids, labels) examples of SFT, the ranking batches of the reward model and
DPO's pair batches. util re-exports these names."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .checks import DataError

if TYPE_CHECKING:
    from .config import Config


def encode_batch(tok, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (twice as fast as one call each), BOS/EOS added
    if asked."""
    front = [tok.bos_token_id] if bos and tok.bos_token_id is not None else []
    back = [tok.eos_token_id] if eos else []
    if not texts:
        return []
    # the Rust tokenizer's own batch call gives the same ids as tok(texts) in a third of the time:
    # the wrapper around it (attention masks, BatchEncoding) costs more than the tokenising; a slow
    # tokenizer has no backend
    fast = getattr(getattr(tok, "backend_tokenizer", None), "encode_batch_fast", None)
    ids = ([e.ids for e in fast(list(texts), add_special_tokens=False)] if fast
           else tok(list(texts), add_special_tokens=False)["input_ids"])
    return [front + x + back for x in ids]


def encode_prompt(tok, prompt: str) -> list[int]:
    """Prompt token ids, with BOS in front when the tokenizer has one."""
    return encode_batch(tok, [prompt], bos=True)[0]


def encode_response(tok, response: str) -> list[int]:
    """Response token ids with EOS appended: the model must learn to stop."""
    return encode_batch(tok, [response], eos=True)[0]


def fit_rows(tok, rows: list[dict], cfg: Config, answers=("response",), what: str = "rows",
             more_rejected: int = 0) -> list[dict]:
    """The rows whose answers fit max_response_tokens; over-long ones are skipped (a cut answer has
    no EOS to learn) and over-long prompts are cut to their last max_prompt_tokens tokens, both
    counted and printed. more_rejected: how many of a row's extra rejected answers the stage uses;
    the first that fit are kept."""
    for i, r in enumerate(rows):
        missing = [k for k in answers if not isinstance(r.get(k), str)]
        if missing:
            raise DataError(f"{what}: row {i} has no {missing[0]!r} field (this stage needs "
                            f"{list(answers)})")
    prompts = encode_batch(tok, [r["prompt"] for r in rows], bos=True)
    long_prompts = sum(len(p) > cfg.max_prompt_tokens for p in prompts)
    fits = [True] * len(rows)
    for k in answers:                           # one batched tokenizer call per field
        lengths = [len(a) for a in encode_batch(tok, [r[k] for r in rows], eos=True)]
        fits = [ok and n <= cfg.max_response_tokens for ok, n in zip(fits, lengths)]
    keep, long_extra = [], 0
    for r, ok in zip(rows, fits):
        # only a stage that uses them tokenises these
        if ok and more_rejected and r.get("more_rejected"):
            lengths = [len(a) for a in encode_batch(tok, r["more_rejected"], eos=True)]
            fit = [a for a, n in zip(r["more_rejected"], lengths) if n <= cfg.max_response_tokens]
            long_extra += len(r["more_rejected"]) - len(fit)
            r = {**r, "more_rejected": fit[:more_rejected]}
        if ok:
            keep.append(r)
    if long_prompts:
        print(f"{what}: {long_prompts} of {len(rows)} prompts are longer than max_prompt_tokens="
              f"{cfg.max_prompt_tokens}: cut to their last {cfg.max_prompt_tokens} tokens")
    if len(keep) < len(rows):
        print(f"{what}: skipped {len(rows) - len(keep)} of {len(rows)} rows whose "
              f"{'/'.join(answers)} is longer than max_response_tokens={cfg.max_response_tokens} "
              "tokens with EOS (raise it to keep them)")
    if long_extra:
        print(f"{what}: skipped {long_extra} more_rejected answers longer than max_response_tokens="
              f"{cfg.max_response_tokens} tokens with EOS (raise it to keep them)")
    if rows and not keep:
        raise DataError(f"{what}: every row is longer than "
                        f"max_response_tokens={cfg.max_response_tokens}")
    return keep


def left_pad(seqs: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) with left padding, as generation wants."""
    import torch
    # padded as Python lists: one tensor copy, not one per row
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (n - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def encode_prompts(tok, prompts: list[str], max_tokens: int):
    """Left-padded prompt batch; over-long prompts keep their last max_tokens tokens."""
    seqs = [p[-max_tokens:] for p in encode_batch(tok, prompts, bos=True)]
    return left_pad(seqs, tok.pad_token_id)


def sft_examples(tok, prompts: list[str], responses: list[str], max_prompt: int, max_response: int):
    """[(input_ids, labels)]: labels copy the response tokens and are -100 on the prompt (no loss
    there)."""
    out = []
    for p, r in zip(encode_batch(tok, prompts, bos=True), encode_batch(tok, responses, eos=True)):
        p, r = p[-max_prompt:], r[:max_response]
        out.append((p + r, [-100] * len(p) + r))
    return out


def row_examples(tok, rows: list[dict], cfg: Config, key: str = "response"):
    """sft_examples of each row's prompt -> row[key], cut to the config's prompt and answer lengths.
    """
    return sft_examples(tok, [r["prompt"] for r in rows], [r[key] for r in rows],
                        cfg.max_prompt_tokens, cfg.max_response_tokens)


def sft_example(tok, prompt: str, response: str, max_prompt: int, max_response: int):
    """One (input_ids, labels) pair, as sft_examples."""
    return sft_examples(tok, [prompt], [response], max_prompt, max_response)[0]


def right_pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, labels) right-padded; pads get label -100."""
    import torch
    # padded as Python lists: one tensor copy, not one per row
    n = max(len(x) for x, _ in examples)
    ids = torch.tensor([x + [pad_id] * (n - len(x)) for x, _ in examples], dtype=torch.long)
    labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in examples], dtype=torch.long)
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in examples], dtype=torch.long)
    return ids, mask, labels


def rm_batch(tok, rows, cfg: Config, key: str):
    """Right-padded (ids, mask) of prompt + rows[key] + EOS."""
    ids, mask, _ = right_pad_batch(row_examples(tok, rows, cfg, key), tok.pad_token_id)
    return ids, mask


def ranking_examples(tok, rows: list[dict], cfg: Config) -> list[tuple[list[int], list[list[int]]]]:
    """Each row tokenised: its prompt ids and its answers [chosen, rejected, *more_rejected] (up to
    rm_max_rejected rejected ones), each with EOS."""
    answers = [[r["chosen"], r["rejected"], *r.get("more_rejected", [])][:cfg.rm_max_rejected + 1]
               for r in rows]
    # every answer in one call
    ids = encode_batch(tok, [a for row in answers for a in row], eos=True)
    out, i = [], 0
    for p, row in zip(encode_batch(tok, [r["prompt"] for r in rows], bos=True), answers):
        out.append((p[-cfg.max_prompt_tokens:],
                    [a[:cfg.max_response_tokens] for a in ids[i:i + len(row)]]))
        i += len(row)
    return out


def ranking_batch(examples: list[tuple[list[int], list[list[int]]]], pad_id: int):
    """Each prompt once, left-padded, and its answers right-padded: (prompt ids, prompt mask, answer
    ids, answer mask, row of each answer, and for each pair the index of its chosen and of its
    rejected answer)."""
    import torch
    prompt_ids, prompt_mask = left_pad([p for p, _ in examples], pad_id)
    answers, owner, chosen, rejected = [], [], [], []
    for i, (_, row_answers) in enumerate(examples):
        for j, a in enumerate(row_answers):
            # answer 0 is the chosen one, every later one is a rejected one
            if j:
                chosen.append(len(answers) - j)
                rejected.append(len(answers))
            answers.append(a)
            owner.append(i)
    ids, mask, _ = right_pad_batch([(a, a) for a in answers], pad_id)
    return (prompt_ids, prompt_mask, ids, mask, torch.tensor(owner), torch.tensor(chosen),
            torch.tensor(rejected))


def pair_batch(tok, rows, cfg: Config):
    """One right-padded SFT-style batch: the chosen answers of `rows`, then their rejected answers.
    """
    examples = row_examples(tok, rows, cfg, "chosen") + row_examples(tok, rows, cfg, "rejected")
    return right_pad_batch(examples, tok.pad_token_id)
