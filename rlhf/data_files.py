"""Reading data files: JSON, JSON lines, Parquet, .txt prompts or a hub dataset, in any of the usual
row shapes (aliases, chats, HH-style shared prompts), as rows of prompt / chosen / rejected /
response; the Config's data sources and the validation split; hygiene (leakage, missing fields,
whether GRPO's prompts can be rewarded at all). util re-exports these."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import ConfigError, DataError
from .runtime import hub_reachable

if TYPE_CHECKING:
    from .config import Config

FIELD_ALIASES = {"prompt": ["prompt", "question", "query"],
                 "chosen": ["chosen", "response_chosen", "answer"],
                 "rejected": ["rejected", "response_rejected", "negative"],
                 "response": ["response"]}
# chat messages ([{"role", "content"}, ...]) become text in the shipped prompts' style:
# "Human: ... Assistant: ..."
ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant",
              "system": "System"}
ASSISTANT_ROLES = ("assistant", "gpt")
# where an assistant turn begins in text that holds a whole chat (Anthropic HH: "\n\nAssistant:")
TURN_MARKERS = ("Assistant:", "<|assistant|>", "### Response:")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


class Rows(list):
    """Loaded rows, a plain list to every caller, with .info: source, rows read, skipped, split."""

    def __init__(self, rows=(), info: dict | None = None):
        super().__init__(rows)
        self.info = dict(info or {})


def is_hub_id(source: str) -> bool:
    """True for "hf:owner/name[:split]", or "owner/name[:split]" when that is no local file."""
    if source.startswith("hf:"):
        return True
    name = source.split(":")[0]
    return (bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()
            and not name.endswith(DATA_SUFFIXES))


def _hub_records(source: str, split: str) -> tuple[str, list[tuple[int, object]]]:
    """(a name for messages, [(row number, record)]) of a hub dataset, by datasets.load_dataset."""
    name, _, asked = source.removeprefix("hf:").partition(":")
    split = asked or split
    label = f"hf:{name}[{split}]"
    if not hub_reachable():
        raise ConnectionError(f"{label} is a hub dataset id and the hub is unreachable: download "
                              "the dataset where the hub is reachable, save it as JSON lines or "
                              "Parquet, and give that file's path")
    import datasets
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:              # not found, no such split, gated: say which, with the cause
        raise DataError(f"{label}: could not load it ({type(e).__name__}: {e})") from None
    return label, [(i + 1, r) for i, r in enumerate(ds)]


def _read_records(path: Path) -> list[tuple[int, object]]:
    """(line number, record) of JSON lines, a JSON array, Parquet or .txt (a prompt a line)."""
    if path.suffix == ".parquet":
        import pandas as pd
        return [(i + 1, r) for i, r in enumerate(pd.read_parquet(path).to_dict("records"))]
    try:
        # utf-8-sig drops the byte-order mark some Windows editors write, which json.loads refuses
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}): save the file as "
                        "UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    # split on \n (a CRLF's \r is dropped): str.splitlines would also split a JSON string at U+2028,
    # which JSON allows inside strings
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if path.suffix == ".txt":
        return [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
    if text.lstrip().startswith("["):
        try:
            return [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((i, DataError(f"{path}:{i}: invalid JSON ({e.msg})")))
    return out


def _is_messages(value) -> bool:
    """True for a chat: a non-empty list of {"role", "content"} dicts."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _role(message: dict) -> str:
    """A message's role, lower case."""
    return str(message["role"]).lower()


def chat_text(messages: list[dict]) -> str:
    """A chat as one text, "Human: hi Assistant: hello", the shipped prompts' style."""
    return " ".join(f"{ROLE_NAMES.get(_role(m), _role(m).title())}: {m['content']}"
                    for m in messages)


def _chat_answer(messages: list[dict], prompt: list | None) -> str:
    """The answer part of a chat: what follows the prompt's messages; " hello" for one reply."""
    if prompt and messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if prompt is not None:
        # a row with a prompt whose answer chats restate it (UltraFeedback: [user, assistant]):
        # the answer is what the assistant says
        while messages and _role(messages[0]) not in ASSISTANT_ROLES:
            messages = messages[1:]
    if not messages:
        return ""
    if prompt is not None and _role(messages[0]) in ASSISTANT_ROLES:
        rest = messages[1:]                 # the prompt ends "Assistant:": the answer starts bare
        return f" {messages[0]['content']}" + (f" {chat_text(rest)}" if rest else "")
    return chat_text(messages)


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen, rejected) of a row whose answers both hold the prompt (HH); None if none."""
    common = os.path.commonprefix([chosen, rejected])
    if chosen.strip() == rejected.strip():  # the same text: its last assistant turn is the answer
        common = chosen
    # cut after the last assistant turn of the shared text: answers that begin alike ("I think")
    # stay answers
    cut = max((common.rfind(m) + len(m) for m in TURN_MARKERS if m in common), default=0)
    if cut == 0 or not (chosen[cut:].strip() and rejected[cut:].strip()):
        # no turn marker: back to the last whitespace (no word cut in two); answers start with it
        spaces = [m.start() for m in re.finditer(r"\s+", common)]
        cut = next((c for c in reversed(spaces)
                    if c > 0 and chosen[c:].strip() and rejected[c:].strip()), 0)
    if cut == 0 or not common[:cut].strip():
        return None
    return common[:cut].lstrip(), chosen[cut:], rejected[cut:]


def _as_row(rec, where: str, required, columns: dict) -> dict:
    """One record as a row: columns mapped, aliases read, chats as text, an HH prompt split off."""
    if isinstance(rec, str):                # a line of a .txt file: one prompt
        rec = {"prompt": rec}
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    names = {}                              # our field -> the record's key that holds it
    for field, aliases in FIELD_ALIASES.items():
        mapped = columns.get(field)
        name = mapped if mapped in rec else next((a for a in aliases if a in rec), None)
        if name is not None:
            names[field] = name
    # setup_sql, family, more_rejected under other names
    extra = {f: c for f, c in columns.items() if f not in FIELD_ALIASES and c in rec}
    used = set(names.values()) | set(extra.values()) | set(sum(FIELD_ALIASES.values(), []))
    row = {k: v for k, v in rec.items() if k not in used}
    row.update({f: rec[c] for f, c in extra.items()})
    values = {f: rec[n] for f, n in names.items()}
    chat = rec.get("messages")
    if not values and _is_messages(chat) and len(chat) > 1 and _role(chat[-1]) in ASSISTANT_ROLES:
        # a chat for SFT: its last (assistant) message is the demonstration, the rest the prompt
        row.pop("messages")
        values = {"prompt": chat[:-1], "response": chat[-1:]}
    prompt = values.get("prompt")
    if _is_messages(prompt):
        open_turn = _role(prompt[-1]) not in ASSISTANT_ROLES
        values["prompt"] = chat_text(prompt) + (" Assistant:" if open_turn else "")
    for field in ("chosen", "rejected", "response"):
        if _is_messages(values.get(field)):
            given = prompt if _is_messages(prompt) else [] if "prompt" in values else None
            values[field] = _chat_answer(values[field], given)
    answers = [values.get("chosen"), values.get("rejected")]
    if "prompt" not in values and all(isinstance(a, str) for a in answers):
        parts = split_shared_prompt(*answers)
        if parts is None:
            raise DataError(f"{where}: no prompt field, and chosen and rejected share no beginning "
                            f"that ends on a turn ({TURN_MARKERS[0]!r}) or a word: give each row a "
                            "'prompt' field")
        values["prompt"], values["chosen"], values["rejected"] = parts
        row["_split"] = True                # counted by load_rows, then removed
    for need in required:
        options = need if isinstance(need, tuple) else (need,)
        if not any(f in values for f in options):
            accepted = [a for f in options for a in [columns.get(f)] + FIELD_ALIASES[f] if a]
            raise DataError(f"{where}: field {' or '.join(map(repr, options))} is missing "
                            f"(accepted names: {accepted}; this row has: {sorted(rec)}): "
                            "Config.columns maps other names to it")
    needed = {f for n in required for f in (n if isinstance(n, tuple) else (n,))}
    for field, value in values.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{names.get(field, field)}' must be a string, got "
                            f"{type(value).__name__} (or a chat: a list of role/content messages)")
        if field in needed and not value.strip():
            raise DataError(f"{where}: field '{names.get(field, field)}' is empty")
        row[field] = value
    more = row.get("more_rejected")
    if more is not None and not (isinstance(more, list)
                                 and all(isinstance(a, str) and a.strip() for a in more)):
        raise DataError(f"{where}: field 'more_rejected' must be a list of non-empty strings")
    return row


def load_rows(path, required=("prompt", "chosen", "rejected"), skip_bad: bool = False,
              limit: int = 0, columns: dict | None = None, pairs: bool = False,
              split: str = "train") -> Rows:
    """Rows of a JSON/JSONL/Parquet/.txt file or hub id; see the comments inside for the options."""
    # required: field names, a tuple = one of them; a bad row raises DataError, or with skip_bad is
    # skipped and counted; columns: {our field: the source's name}; pairs=True skips and counts the
    # rows with no rejected answer or one equal to chosen; split: a hub dataset's default split
    if isinstance(path, str) and is_hub_id(path):
        name, records = _hub_records(path, split)
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run 0_download.ipynb first (or `python "
                                    "util.py make-dataset`)")
        beyond = [f for f in required if f != "prompt"]
        if path.suffix == ".txt" and beyond:
            raise DataError(f"{path}: a .txt file holds prompts only (one a line), but these rows "
                            f"need {beyond}: use JSON lines")
        name, records = str(path), _read_records(path)
    rows, bad, n_split, n_read = [], [], 0, 0
    skipped = {"no rejected answer": [], "chosen equals rejected": []}
    for line, rec in records:
        n_read += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            row = _as_row(rec, f"{name}:{line}", required, columns or {})
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        n_split += bool(row.pop("_split", False))
        if pairs:
            # a pair with nothing to prefer teaches the reward model and DPO nothing
            if not row.get("rejected", "").strip():
                skipped["no rejected answer"].append(f"{name}:{line}")
                continue
            if row["rejected"].strip() == row["chosen"].strip():
                skipped["chosen equals rejected"].append(f"{name}:{line}")
                continue
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if bad:
        print(f"skipped {len(bad)} bad row(s) of {Path(name).name}; first: {bad[0]}")
    for why, where in skipped.items():
        if where:
            print(f"{name}: skipped {len(where)} pair(s) with {why} (first: {where[0]})")
    if n_split:
        print(f"{name}: {n_split} row(s) had no prompt field: the prompt was split off the shared "
              "beginning of chosen and rejected, at their last assistant turn (or word)")
    if not rows:
        counts = ", ".join(f"{len(w)} with {k}" for k, w in skipped.items() if w)
        raise DataError(f"{name}: no usable rows" + (f" ({counts})" if counts else ""))
    return Rows(rows, {"source": name, "read": n_read, "used": len(rows), "skipped_bad": len(bad),
                       **{f"skipped_{k.replace(' ', '_')}": len(w) for k, w in skipped.items()},
                       "prompts_split": n_split})

# ---------------------------------------------------------------------------- data sources

# kind: (Config field, the shipped file when it is "", required fields (a tuple: one of), a name)
DATA_SOURCES = {
    "sft": ("sft_data", "train.json", ("prompt", ("response", "chosen")), "SFT demonstrations"),
    "pref": ("pref_data", "train.json", ("prompt", "chosen"), "preference pairs"),
    "prompt": ("prompt_data", "train.json", ("prompt",), "prompts"),
    "eval": ("eval_data", "eval.json", ("prompt",), "evaluation rows"),
}


def data_source(cfg: Config, kind: str) -> str:
    """Where a kind of data comes from: its Config field, else the shipped file under data_dir."""
    field, default = DATA_SOURCES[kind][:2]
    return getattr(cfg, field) or str(Path(cfg.data_dir, default))


# a training source this small keeps every row for training (a validation split of 1 row is noise)
MIN_ROWS_FOR_VALIDATION = 20


def in_validation(prompt: str, fraction: float) -> bool:
    """Whether a training prompt is held out for validation: decided by a hash of the prompt, so a
    prompt is held out of every stage and every file alike, whatever the seed or the row order."""
    digest = hashlib.sha256(_normal(prompt).encode()).hexdigest()
    return int(digest[:8], 16) / 16 ** 8 < fraction


def load_data(cfg: Config, kind: str, limit: int | None = None, split: str = "train") -> Rows:
    """Rows of a config's source: "sft", "pref", "prompt" (n_train rows) or "eval" (n_eval).
    split="val" gives the training source's validation rows (Config.val_fraction of its prompts),
    which no stage trains on; "train" gives the rest."""
    if kind not in DATA_SOURCES:
        raise ValueError(f"unknown kind of data {kind!r}: choose one of {sorted(DATA_SOURCES)}")
    field, _, required, what = DATA_SOURCES[kind]
    source = data_source(cfg, kind)
    limit_field = "n_eval" if kind == "eval" else "n_train"
    limit = getattr(cfg, limit_field) if limit is None else limit
    if getattr(cfg, field) and not is_hub_id(source) and not Path(source).exists():
        raise FileNotFoundError(f"Config.{field}={source!r}: no such file (relative to "
                                f"{Path.cwd()}) and not a hub dataset id (hf:owner/name)")
    rows = load_rows(source, required, limit=limit, columns=cfg.columns, pairs=kind == "pref",
                     split="test" if kind == "eval" else "train")
    cut = f", the first {limit} (Config.{limit_field})" if len(rows) == limit else ""
    if kind == "eval" or cfg.val_fraction == 0 or len(rows) < MIN_ROWS_FOR_VALIDATION:
        if split == "val":
            raise ValueError(f"no validation split of the {what}: Config.val_fraction is 0, or "
                             f"fewer than {MIN_ROWS_FOR_VALIDATION} rows" if kind != "eval" else
                             "the evaluation rows are a test set: they have no validation split")
        print(f"{what}: {len(rows)} rows from {rows.info['source']}{cut}")
        return rows
    held = [in_validation(r["prompt"], cfg.val_fraction) for r in rows]
    part = Rows([r for r, h in zip(rows, held) if h == (split == "val")],
                {**rows.info, "split": split, "validation_rows": sum(held)})
    print(f"{what} ({split}): {len(part)} of {len(rows)} rows from {rows.info['source']}{cut}; "
          f"{sum(held)} held out for validation (Config.val_fraction={cfg.val_fraction})")
    return part


def validation_prompts(cfg: Config, n: int = 256) -> list[str]:
    """Up to n prompts of the validation split of the preference data (no stage trains on them);
    the training prompts, said so, when the data is too small to hold any out."""
    try:
        rows = load_data(cfg, "pref", split="val")
    except ValueError as e:
        print(f"{e}: the training prompts stand in for validation prompts")
        rows = load_data(cfg, "pref")
    return [r["prompt"] for r in rows[:n]]


def _normal(prompt: str) -> str:
    """A prompt with each whitespace run made one space: the same question typed twice is equal."""
    return " ".join(prompt.split())


def leaked_prompts(train_rows: list[dict], eval_rows: list[dict]) -> int:
    """How many evaluation rows have a prompt that is also a training prompt (whitespace aside)."""
    seen = {_normal(r["prompt"]) for r in train_rows}
    return sum(_normal(r["prompt"]) in seen for r in eval_rows)


def report_leakage(train_rows: list[dict], eval_rows: list[dict], what: str) -> int:
    """Count and print the evaluation prompts that the training rows hold too."""
    n = leaked_prompts(train_rows, eval_rows)
    note = ": their scores measure memory, not generalisation" if n else ""
    print(f"leakage: {n} of {len(eval_rows)} evaluation prompts are also in the {what}{note}")
    return n


def with_fields(rows: list[dict], fields, what: str) -> list[dict]:
    """The rows with each field a non-empty string (pairs: chosen != rejected); the rest counted."""
    pair = {"chosen", "rejected"} <= set(fields)

    def ok(r):
        if not all(isinstance(r.get(f), str) and r[f].strip() for f in fields):
            return False
        return not pair or r["chosen"].strip() != r["rejected"].strip()
    keep = [r for r in rows if ok(r)]
    if len(keep) < len(rows):
        print(f"{what}: {len(rows) - len(keep)} of {len(rows)} rows left out (they lack "
              f"{'/'.join(fields)}{' or have chosen == rejected' if pair else ''})")
    return keep


def demonstrations(rows: list[dict], what: str) -> list[dict]:
    """Rows for SFT: as they are when each has a response, else chosen stands in for it."""
    if all(isinstance(r.get("response"), str) for r in rows):
        return rows                         # the shipped rows: the same list, untouched
    has = [(isinstance(r.get("response"), str), isinstance(r.get("chosen"), str)) for r in rows]
    out = [r if resp else {**r, "response": r["chosen"]} for r, (resp, ch) in zip(rows, has)
           if resp or ch]
    n = sum(ch and not resp for resp, ch in has)
    left = f"; {len(rows) - len(out)} have neither and are left out" if len(out) < len(rows) else ""
    print(f"{what}: {n} of {len(rows)} rows have no 'response': SFT uses their 'chosen' answer "
          f"instead{left}")
    return out


def check_grpo_reward(rows: list[dict], cfg: Config) -> None:
    """Refuse GRPO when no answer can be rewarded: no setup_sql anywhere, the reward model off."""
    n = sum("setup_sql" in r for r in rows)
    if n == 0 and cfg.grpo_rm_weight <= 0:
        raise ConfigError(
            "GRPO has no reward for these prompts: none has 'setup_sql' (the tables an answer "
            "is executed on), so no answer can be checked, and Config.grpo_rm_weight=0 leaves the "
            "reward model out. Set grpo_rm_weight > 0 (e.g. 1.0) to reward the answers with the "
            "reward model (train it first: 2_critic.ipynb or `python util.py rm`), or give the "
            "rows setup_sql.")
    if n < len(rows):
        by = "the reward model only" if cfg.grpo_rm_weight > 0 else "nothing (set grpo_rm_weight)"
        print(f"GRPO: {len(rows) - n} of {len(rows)} prompts have no 'setup_sql': execution and "
              f"format rewards need it, so their answers are rewarded by {by}")
