"""tiny-rlhf helpers, in pipeline order: config, device, data, tokenizer, models, generation, SFT, reward, PPO,
evaluation, plotting, CLI. The notebooks tell the story; this file holds the code they share."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# ============================================================================ config / presets


@dataclasses.dataclass
class Config:
    """Every knob of the pipeline; a preset fills it, a notebook or env var may override fields."""
    preset: str = "tiny"
    seed: int = 0
    # precision and memory: the weights and optimizer states stay fp32 whatever dtype a checkpoint is stored in
    precision: str = "auto"                     # auto = bf16 on a GPU that has it, fp16 on older CUDA, else fp32
    micro_batch_size: int = 0                   # > 0: each optimizer batch runs in micro-batches of this size
    gradient_checkpointing: bool = False        # recompute activations in the backward pass: less memory, slower
    data_dir: str = str(ROOT / "dataset")
    # data sources, "" = the shipped files (<data_dir>/train.json, eval.json). A source is a file
    # (.json, .jsonl, .parquet; .txt = one prompt a line, for prompt_data and eval_data) or a hub
    # dataset id ("hf:owner/name", or "owner/name" when no such file exists; ":split" after it)
    sft_data: str = ""                          # demonstrations: prompt + response (or chosen)
    pref_data: str = ""                         # pairs (prompt, chosen, rejected): RM and DPO
    prompt_data: str = ""                       # prompts for PPO and GRPO
    eval_data: str = ""                         # held-out rows: curves in training, the report
    columns: dict = dataclasses.field(default_factory=dict)   # {our field: the source's column}
    out_dir: str = str(ROOT / "model")          # RLHF_OUT moves it (tests use a temp dir)
    tokenizer_dir: str = str(ROOT / "tokenizer")
    # models: tiny = a small OPT trained from scratch; opt = hub checkpoints (or local dirs laid out like them)
    actor_hub: str = ""
    critic_hub: str = ""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_positions: int = 192
    # data limits (0 = all rows)
    n_train: int = 0
    n_eval: int = 600
    max_prompt_tokens: int = 112
    max_response_tokens: int = 24
    # SFT
    sft_epochs: float = 5.0
    sft_batch_size: int = 32
    sft_lr: float = 2e-3
    # reward model
    rm_epochs: float = 3.0
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    rm_freeze_backbone: bool = False
    rm_prefix_weight: float = 1.0
    rm_max_rejected: int = 1                    # rejected answers per prompt: the row's own, then its more_rejected
    # PPO
    ppo_iterations: int = 60
    rollout_batch_size: int = 64
    ppo_minibatch_size: int = 16
    ppo_epochs: int = 4
    ppo_lr: float = 3e-5
    ppo_vf_lr: float = 1e-4
    temperature: float = 0.7                    # rollouts and sampled evaluation use the same temperature
    kl_coef: float = 0.2
    kl_estimator: str = "k1"                    # "k1" (log-ratio) or "k3" (unbiased, always >= 0)
    kl_target: float = 0.0                      # > 0 turns on the adaptive KL controller
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    missing_eos_penalty: float = 1.0
    whiten_rewards: bool = False
    save_every: int = 20
    # DPO: offline, on the preference pairs, against the frozen SFT model
    dpo_epochs: float = 1.0
    dpo_batch_size: int = 32
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"                   # "sigmoid" (DPO) or "ipo"
    dpo_sft_weight: float = 0.0                 # > 0 adds the SFT loss on the chosen answers (RPO)
    # GRPO: a group of sampled answers per prompt, advantages relative to the group, no critic
    grpo_iterations: int = 40
    grpo_prompts: int = 16                      # prompts per iteration
    grpo_group_size: int = 8                    # answers sampled per prompt
    grpo_minibatch_size: int = 32
    grpo_epochs: int = 2
    grpo_lr: float = 5e-5
    grpo_kl_coef: float = 0.04
    grpo_format_weight: float = 0.2             # weight of the format reward beside execution accuracy
    grpo_rm_weight: float = 0.0                 # > 0 adds the reward model's score to the verifiable rewards
    # LoRA (peft) for the actor in PPO, DPO and GRPO: 0 = full fine-tuning
    lora_r: int = 0
    lora_alpha: int = 16
    # evaluation
    eval_batch_size: int = 128

    def __post_init__(self):
        """Every Config is checked when made: get_config, load_config, dataclasses.replace."""
        check_config(self)

    def path(self, *parts) -> Path:
        """A path under the output directory."""
        return Path(self.out_dir, *parts)


class ConfigError(ValueError):
    """A Config field of the wrong type, out of its range or not one of its names."""


# allowed ranges, (text, test); a field not listed takes any value of its type
_POSITIVE, _NON_NEGATIVE = ("> 0", lambda v: v > 0), (">= 0", lambda v: v >= 0)
_AT_LEAST_1, _AT_LEAST_2 = (">= 1", lambda v: v >= 1), (">= 2", lambda v: v >= 2)
_UNIT, _OPEN_UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1), ("in (0, 1)", lambda v: 0 < v < 1)
CONFIG_RANGES = {
    **dict.fromkeys(["seed", "micro_batch_size", "d_model", "n_layers", "n_heads", "n_train",
                     "n_eval", "rm_prefix_weight", "kl_coef", "kl_target", "vf_coef",
                     "missing_eos_penalty", "dpo_sft_weight", "grpo_kl_coef", "grpo_format_weight",
                     "grpo_rm_weight", "lora_r"], _NON_NEGATIVE),
    **dict.fromkeys(["sft_epochs", "rm_epochs", "dpo_epochs", "sft_lr", "rm_lr", "ppo_lr",
                     "ppo_vf_lr", "dpo_lr", "grpo_lr", "temperature", "cliprange_value",
                     "max_grad_norm", "dpo_beta"], _POSITIVE),
    **dict.fromkeys(["max_positions", "max_prompt_tokens", "max_response_tokens",
                     "sft_batch_size", "rm_batch_size", "rm_max_rejected", "ppo_iterations",
                     "rollout_batch_size", "ppo_minibatch_size", "ppo_epochs", "save_every",
                     "dpo_batch_size", "grpo_iterations", "grpo_prompts", "grpo_minibatch_size",
                     "grpo_epochs", "lora_alpha", "eval_batch_size"], _AT_LEAST_1),
    "gamma": _UNIT, "lam": _UNIT,
    "cliprange": _OPEN_UNIT,        # the ratio is clipped to [1 - c, 1 + c]: c >= 1, no lower clip
    "grpo_group_size": _AT_LEAST_2,  # a group of one has no spread: its advantage is 0 / 0
}
CONFIG_CHOICES = {"precision": ("auto", "fp32", "bf16", "fp16"), "kl_estimator": ("k1", "k3"),
                  "dpo_loss": ("sigmoid", "ipo")}
COLUMN_FIELDS = ("prompt", "chosen", "rejected", "response", "more_rejected", "setup_sql", "family")


def _field_problem(name: str, kind: str, value):
    """(value as stored, problem or None) of one Config field against its type and range."""
    if kind == "bool":
        return value, None if isinstance(value, bool) else "must be true or false"
    if kind in ("int", "float"):
        if isinstance(value, str):
            return value, "is a string: write a number, without quotes"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"must be a number, not a {type(value).__name__}"
        if not math.isfinite(value):
            return value, "must be finite"
        if kind == "int":
            if value != int(value):
                return value, "must be a whole number"
            value = int(value)                  # 2.0 (as JSON may write it) is 2
        rule = CONFIG_RANGES.get(name)
        if rule and not rule[1](value):
            return value, f"must be {rule[0]}"
        return value, None
    if kind == "str":
        if not isinstance(value, str):
            return value, f"must be a string, not a {type(value).__name__}"
        if name in CONFIG_CHOICES and value not in CONFIG_CHOICES[name]:
            return value, f"choose one of {CONFIG_CHOICES[name]}"
        return value, None
    if kind == "dict":                          # columns: {our field: the source's column}
        if not isinstance(value, dict):
            return value, f"must be a mapping like {{'prompt': 'q'}}, not a {type(value).__name__}"
        bad = [k for k, v in value.items()
               if k not in COLUMN_FIELDS or not isinstance(v, str) or not v]
        if bad:
            return value, (f"keys must be among {COLUMN_FIELDS} and values non-empty column names; "
                           f"not {bad}")
    return value, None


def check_config(cfg: Config) -> Config:
    """Check each field's type, range and name, and the limits fields set each other."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, problem = _field_problem(f.name, str(f.type), getattr(cfg, f.name))
        if problem:
            problems.append(f"Config.{f.name}={getattr(cfg, f.name)!r}: {problem}")
        else:
            object.__setattr__(cfg, f.name, value)
    if not problems:                            # relations, once each field is right on its own
        if cfg.preset not in PRESETS:
            problems.append(f"Config.preset={cfg.preset!r}: choose one of {sorted(PRESETS)}")
        if cfg.ppo_minibatch_size > cfg.rollout_batch_size:
            problems.append(f"Config.ppo_minibatch_size={cfg.ppo_minibatch_size}: must be <= "
                            f"rollout_batch_size={cfg.rollout_batch_size} (a minibatch is a "
                            "part of one rollout batch)")
        group = cfg.grpo_prompts * cfg.grpo_group_size
        if cfg.grpo_minibatch_size > group:
            problems.append(f"Config.grpo_minibatch_size={cfg.grpo_minibatch_size}: must be <= "
                            f"grpo_prompts * grpo_group_size = {group} (a minibatch is a part "
                            "of one iteration's answers)")
        if not cfg.actor_hub:               # the tiny OPT is built from these (opt sets them to 0)
            for name in ("d_model", "n_layers", "n_heads"):
                if getattr(cfg, name) < 1:
                    problems.append(f"Config.{name}={getattr(cfg, name)}: must be >= 1 for a model "
                                    "built here (actor_hub is empty)")
            if cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads:
                problems.append(f"Config.d_model={cfg.d_model}: must be a multiple of "
                                f"n_heads={cfg.n_heads}")
    if problems:
        raise ConfigError("bad settings:\n  " + "\n  ".join(problems))
    return cfg


# which notebook writes each folder under out_dir: a missing folder names the notebook to run first
MADE_BY = {"base_actor": "0_download.ipynb", "base_critic": "0_download.ipynb", "actor": "1_actor.ipynb",
           "critic": "2_critic.ipynb", "rlhf": "3_rlhf.ipynb"}

PRESETS = {
    # seconds: only checks that every stage runs end to end
    "smoke": dict(d_model=32, n_layers=1, n_heads=2, n_train=64, n_eval=16, sft_epochs=1, sft_batch_size=16,
                  rm_epochs=1, rm_batch_size=16, ppo_iterations=2, rollout_batch_size=8, ppo_minibatch_size=4,
                  ppo_epochs=2, save_every=1, max_response_tokens=24, eval_batch_size=16, dpo_epochs=1,
                  dpo_batch_size=16, grpo_iterations=2, grpo_prompts=4, grpo_group_size=4, grpo_minibatch_size=8),
    # minutes on a laptop CPU: a small OPT trained from scratch on the shipped data
    "tiny": dict(),
    # a GPU and a reachable hub: real OPT checkpoints, fine-tuned. Micro-batches of 8 keep every stage inside a
    # 16 GB T4 (opt-350m actor + opt-125m critic, fp32 weights and AdamW states) while the global batches stay
    "opt": dict(actor_hub="facebook/opt-350m", critic_hub="facebook/opt-125m", n_layers=0, d_model=0,
                max_positions=2048, micro_batch_size=8, eval_batch_size=64,
                # SFT and RM: Simple_RLHF's OPT recipe (actor lr 2e-5, critic lr 1e-5, 1 RM epoch); DeepSpeed-Chat
                # trains OPT SFT at 9.65e-6 and its RMs at 5e-5, so these sit inside the published range
                sft_epochs=2, sft_batch_size=32, sft_lr=2e-5, rm_epochs=1, rm_batch_size=32, rm_lr=1e-5,
                # PPO: DeepSpeed-Chat's step 3 uses actor 9.65e-6 / critic 5e-6 for OPT-1.3b / 350m; a 350 M actor
                # with full fine-tuning and 4 PPO epochs per rollout drifts fast, so the actor gets 1e-6 (as
                # summarize_from_feedback_details' 1 B runs use 3e-6) and the critic, a fresh head, 1e-5
                ppo_lr=1e-6, ppo_vf_lr=1e-5,
                # DPO: Rafailov et al. 2023 (lr 1e-6, batch 64, beta 0.1), also TRL's DPOConfig default lr
                dpo_lr=1e-6, dpo_batch_size=64,
                # GRPO: Shao et al. 2024 (DeepSeekMath) lr 1e-6 and KL coefficient 0.04, as TRL's GRPOConfig
                grpo_lr=1e-6, grpo_kl_coef=0.04),
}


def default_preset() -> str:
    """RLHF_PRESET if set, else opt with a GPU and a reachable hub, else tiny."""
    if os.environ.get("RLHF_PRESET"):
        return os.environ["RLHF_PRESET"]
    import torch
    if torch.cuda.is_available() and hub_reachable():
        return "opt"
    return "tiny"


def get_config(preset: str | None = None, **overrides) -> Config:
    """The config of a preset (default_preset() when None), with RLHF_OUT and explicit overrides applied."""
    preset = preset or default_preset()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    if os.environ.get("RLHF_OUT"):
        fields.setdefault("out_dir", os.environ["RLHF_OUT"])
    if preset == "opt":                         # the hub tokenizer is saved here, beside the shipped one
        fields.setdefault("tokenizer_dir", str(ROOT / "tokenizer" / "opt"))
    return Config(preset=preset, **fields)


def hub_reachable(host: str = "huggingface.co", timeout: float = 4.0) -> bool:
    """True if a TCP connection to the hub opens within `timeout` seconds (DNS included), never longer."""
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)                           # a hanging DNS lookup cannot hold us past the timeout
    return bool(result and result[0])


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    from transformers import set_seed as hf_set_seed
    hf_set_seed(seed)


# ============================================================================ device


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def get_device():
    """CUDA, else Apple MPS, else CPU (accelerate decides); printed so the reader knows."""
    from accelerate import PartialState
    device = PartialState().device
    extra = " (Google Colab)" if in_colab() else ""
    print(f"device: {device}{extra}")
    return device


PRECISIONS = CONFIG_CHOICES["precision"]


def resolve_precision(cfg: Config, device) -> str:
    """Config.precision made concrete for a device: auto = bf16 on a GPU that has it (Ampere and later), fp16
    with loss scaling on an older CUDA GPU (a T4 has no bf16), fp32 on a CPU (autocast would only slow it)."""
    import torch
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"Config.precision={cfg.precision!r}: choose one of {PRECISIONS}")
    if cfg.precision != "auto":
        return cfg.precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "fp32"


_ACCELERATOR = []


def accelerator():
    """The run's accelerate.Accelerator. In a notebook (one process) it changes nothing; under
    `accelerate launch` or torchrun it wraps the model for data parallelism over processes (DDP)."""
    if not _ACCELERATOR:
        from accelerate import Accelerator
        # precision is ours (Config.precision, see run_in_precision), not a launcher's: one autocast, one scaler
        _ACCELERATOR.append(Accelerator(mixed_precision="no"))
    return _ACCELERATOR[0]


def unwrap(model):
    """The model inside an accelerate/DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def my_share(idx: list) -> list:
    """This process's part of a batch: with N processes each takes every N-th example, so the global batch
    (and the learning-rate schedule) stays what the config says."""
    acc = accelerator()
    return idx[acc.process_index::acc.num_processes]


# not installed in Colab: its own torch and Jupyter builds stay (replacing them can break the runtime), and the
# tools of `make run` / `make test` are not needed there
COLAB_SKIP = r"(torch|jupyter\w*|ipykernel|papermill|nbval|pytest|websocket-client)\b"


def colab_setup(requirements=ROOT / "requirements.txt", run=None) -> list[str]:
    """In Colab, pip-install the requirements except COLAB_SKIP (Colab's torch stays); elsewhere do nothing.
    Returns the pip command. RLHF_COLAB_NO_INSTALL=1 returns it without running it (tests/test_colab.py runs
    the notebooks' Colab cell offline that way)."""
    if not in_colab():
        return []
    lines = [ln.strip() for ln in Path(requirements).read_text().splitlines()]
    pkgs = [ln for ln in lines if ln and not ln.startswith("#") and not re.match(COLAB_SKIP, ln)]
    cmd = [sys.executable, "-m", "pip", "install", "-q", *pkgs]
    if os.environ.get("RLHF_COLAB_NO_INSTALL") not in (None, "", "0"):
        return cmd
    import subprocess
    (run or subprocess.check_call)(cmd)
    return cmd


def free_memory() -> None:
    """Give back what deleted models held: Python's garbage, accelerate's references, CUDA's cached blocks
    (the next stage, or a notebook run after this one in the same runtime, gets the GPU memory back)."""
    import gc
    import torch
    accelerator().free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def progress(iterable, **kwargs):
    """A progress bar: a notebook widget when interactive, plain text lines under `make run`
    (RLHF_TEXT_PROGRESS=1), so saved notebooks show the final state instead of an empty widget."""
    from accelerate import PartialState
    if not PartialState().is_main_process:      # under `accelerate launch` one bar, not one per process
        kwargs["disable"] = True
    if os.environ.get("RLHF_TEXT_PROGRESS"):
        from tqdm import tqdm as text_tqdm
        return text_tqdm(iterable, file=sys.stdout, mininterval=30, ncols=110, **kwargs)
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def quiet_hf() -> None:
    """Hide transformers' own per-load progress bars (loading and writing a tiny model needs none)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


# ============================================================================ data: the text-to-SQL preference set
#
# Each row: a CREATE TABLE context, a question, and the SQL that answers it. `chosen` is correct, `rejected` is a
# plausible mistake, `response` is a human-style demonstration with systematic habits, and `setup_sql` fills the
# table so that any SQL can be executed and compared with the gold answer (execution accuracy).

TABLES = ["employee", "player", "city", "book", "ship", "school", "movie", "song", "team", "store", "car", "hotel",
          "airport", "student", "museum", "restaurant", "river", "mountain", "company", "club", "singer", "film",
          "station", "bridge", "farm", "park", "race", "journal", "gym", "bakery", "festival", "library"]
TEXT_COLUMNS = {
    "name": ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Juno", "Kira", "Luis"],
    "city": ["Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Tokyo", "Accra", "Perth", "Dublin"],
    "country": ["France", "Peru", "Norway", "Egypt", "India", "Chile", "Italy", "Japan", "Ghana", "Kenya"],
    "team": ["Lions", "Eagles", "Sharks", "Wolves", "Bears", "Hawks", "Tigers", "Owls", "Foxes"],
    "color": ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey"],
    "genre": ["drama", "comedy", "jazz", "rock", "horror", "poetry", "fantasy", "history", "folk"],
    "status": ["active", "retired", "pending", "closed", "open", "paused", "sold"],
    "region": ["north", "south", "east", "west", "central", "coastal", "inland"],
    "owner": ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay"],
    "category": ["gold", "silver", "bronze", "basic", "premium", "standard"],
    "language": ["English", "Spanish", "French", "Hindi", "Arabic", "Swahili", "Korean"],
    "position": ["forward", "guard", "center", "keeper", "striker", "winger"],
}
NUMBER_COLUMNS = {                            # at most two digits: small models copy short numbers reliably
    "age": (18, 90), "salary": (10, 99), "height": (50, 99), "weight": (40, 99), "population": (10, 99),
    "score": (1, 99), "price": (5, 99), "rank": (1, 60), "points": (0, 99),
    "capacity": (20, 99), "length": (10, 70), "rating": (1, 10), "budget": (10, 99), "floors": (1, 80),
    "members": (3, 99), "wins": (0, 40), "goals": (0, 50), "pages": (40, 99), "seats": (2, 50),
}
AGGREGATES = {"MAX": "highest", "MIN": "lowest", "AVG": "average", "SUM": "total"}
FAMILIES = ["lookup", "count", "aggregate", "compare", "and", "order", "distinct", "agg_where"]
# the demonstrators' recurring habits: in these families most demos make the same mistake
HABITS = {"compare": "'more/less than' written as >= / <=", "and": "second condition dropped",
          "distinct": "DISTINCT forgotten in COUNT"}
HABIT_RATE = 0.75


def plural(word: str) -> str:
    """English plural of a table noun (city -> cities, bus -> buses)."""
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def _sql_value(v) -> str:
    """An SQL literal: numbers bare, text single-quoted."""
    return str(v) if isinstance(v, int) else "'" + v.replace("'", "''") + "'"


def _make_table(rng: random.Random) -> dict:
    """A random table: name, 2 text and 2 number columns, 7 rows with a repeated text value and distinct numbers."""
    name = rng.choice(TABLES)
    texts = rng.sample(sorted(TEXT_COLUMNS), 2)
    nums = rng.sample(sorted(NUMBER_COLUMNS), 2)
    columns = [texts[0], nums[0], texts[1], nums[1]]
    n_rows = 7
    data = {c: [rng.choice(TEXT_COLUMNS[c]) for _ in range(n_rows)] for c in texts}
    for c in texts:                          # a repeated value, so DISTINCT and COUNT(*) questions bite
        data[c][rng.randrange(1, n_rows)] = data[c][0]
    for c in nums:                           # distinct numbers, so highest/lowest have one answer
        lo, hi = NUMBER_COLUMNS[c]
        data[c] = rng.sample(range(lo, hi + 1), n_rows)
    rows = [tuple(data[c][i] for c in columns) for i in range(n_rows)]
    return dict(name=name, columns=columns, texts=texts, nums=nums, rows=rows)


def _create_sql(t: dict) -> str:
    cols = ", ".join(f"{c} {'INTEGER' if c in NUMBER_COLUMNS else 'VARCHAR'}" for c in t["columns"])
    return f"CREATE TABLE {t['name']} ({cols})"


def _setup_sql(t: dict) -> str:
    inserts = " ".join(f"INSERT INTO {t['name']} VALUES ({', '.join(_sql_value(v) for v in r)});" for r in t["rows"])
    return _create_sql(t) + "; " + inserts


def _question(rng: random.Random, t: dict, family: str) -> tuple[str, str, str, str, list[str]]:
    """(question, gold SQL, habit SQL or '', contrast SQL or '', wrong SQLs) for one family on table t.
    A contrast is a mistake that *adds* what fixes a habit where the question does not ask for it (an extra AND,
    a DISTINCT, a non-strict comparison), so a reward model cannot learn "AND/DISTINCT/>= is good" as a shortcut."""
    T, rows, cols = t["name"], t["rows"], t["columns"]
    Ts = plural(T)
    b, c = t["texts"]
    n, m = t["nums"]
    idx = {col: i for i, col in enumerate(cols)}
    row = rng.choice(rows)
    v, w, k = row[idx[b]], row[idx[c]], row[idx[n]]
    other_v = rng.choice([x for x in TEXT_COLUMNS[b] if x != v])
    a = rng.choice([x for x in cols if x != b])
    wrong_a = rng.choice([x for x in cols if x not in (a, b)])
    habit = contrast = ""
    w2 = rng.choice([x for x in TEXT_COLUMNS[c] if x != w])
    if family in ("lookup", "count") and rng.random() < 0.5:    # numbers to copy, not only words
        b, v, other_v = n, k, rng.choice([x for x in range(*NUMBER_COLUMNS[n]) if x != k])
        a = rng.choice([x for x in cols if x != b])
        wrong_a = rng.choice([x for x in cols if x not in (a, b)])
    sv, so = _sql_value(v), _sql_value(other_v)           # the filter value as an SQL literal (quoted if text)
    if family == "lookup":
        q = rng.choice([f"What is the {a} of the {T} whose {b} is {v}?", f"What {a} does the {T} with {b} {v} have?"])
        gold = f"SELECT {a} FROM {T} WHERE {b} = {sv}"
        contrast = f"SELECT {a} FROM {T} WHERE {b} = {sv} AND {c} = '{w2}'"
        wrong = [contrast, f"SELECT {wrong_a} FROM {T} WHERE {b} = {sv}", f"SELECT {a} FROM {T} WHERE {b} = {so}",
                 f"SELECT {a} FROM {T}", f"SELECT {a} FROM {T} WHERE {b} = {v}", f"SELECT {a} {T} WHERE {b} = {sv}"]
    elif family == "count":
        q = rng.choice([f"How many {Ts} have {b} {v}?", f"Count the {Ts} whose {b} is {v}."])
        gold = f"SELECT COUNT(*) FROM {T} WHERE {b} = {sv}"
        contrast = rng.choice([f"SELECT COUNT(DISTINCT {b}) FROM {T} WHERE {b} = {sv}",
                               f"SELECT COUNT(*) FROM {T} WHERE {b} = {sv} AND {c} = '{w2}'"])
        wrong = [contrast, f"SELECT COUNT(*) FROM {T}", f"SELECT COUNT(*) FROM {T} WHERE {b} = {so}",
                 f"SELECT COUNT(*) FROM {T} WHERE {b} != {sv}", f"SELECT {b} FROM {T} WHERE {b} = {sv}",
                 f"SELECT COUNT(*) FROM WHERE {b} = {sv}"]
    elif family == "aggregate":
        agg = rng.choice(sorted(AGGREGATES))
        q = rng.choice([f"What is the {AGGREGATES[agg]} {n} of all {Ts}?", f"Find the {AGGREGATES[agg]} {n} among {Ts}."])
        gold = f"SELECT {agg}({n}) FROM {T}"
        wrong = [f"SELECT {a2}({n}) FROM {T}" for a2 in sorted(AGGREGATES) if a2 != agg] + \
                [f"SELECT {agg}({m}) FROM {T}", f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{v}'", f"SELECT {agg}({n} FROM {T}"]
    elif family == "compare":
        k = sorted(r[idx[n]] for r in rows)[rng.randrange(2, 5)]   # a value in the table, with rows on both sides
        op, word = rng.choice([(">", "more than"), ("<", "less than"), (">=", "at least"), ("<=", "at most")])
        q = rng.choice([f"List the {a} of {Ts} with {n} {word} {k}.", f"Which {a} belongs to {Ts} whose {n} is {word} {k}?"])
        gold = f"SELECT {a} FROM {T} WHERE {n} {op} {k}"
        if len(op) == 1:                    # the habit: 'more than 30' written as >= 30
            habit = f"SELECT {a} FROM {T} WHERE {n} {op}= {k}"
        else:                               # 'at least 30' really is >= 30; the strict one is wrong
            contrast = f"SELECT {a} FROM {T} WHERE {n} {op[0]} {k}"
        flip = {">": "<", "<": ">", ">=": "<=", "<=": ">="}[op]
        wrong = [habit or contrast, f"SELECT {a} FROM {T} WHERE {n} {flip} {k}", f"SELECT {wrong_a} FROM {T} WHERE {n} {op} {k}",
                 f"SELECT {a} FROM {T} WHERE {m} {op} {k}", f"SELECT {a} FROM {T} WHERE {n} = {k}", f"SELECT {a} FROM {T} {n} {op} {k}"]
    elif family == "and":
        q = rng.choice([f"What is the {n} of the {T} whose {b} is {v} and {c} is {w}?",
                        f"Give the {n} of {Ts} with {b} {v} and {c} {w}."])
        gold = f"SELECT {n} FROM {T} WHERE {b} = '{v}' AND {c} = '{w}'"
        habit = f"SELECT {n} FROM {T} WHERE {b} = '{v}'"
        wrong = [habit, f"SELECT {n} FROM {T} WHERE {b} = '{v}' OR {c} = '{w}'", f"SELECT {n} FROM {T} WHERE {c} = '{w}'",
                 f"SELECT {m} FROM {T} WHERE {b} = '{v}' AND {c} = '{w}'", f"SELECT {n} FROM {T} WHERE {b} = '{v}' AND {c} = '{w}"]
    elif family == "order":
        desc = rng.random() < 0.5
        word = "highest" if desc else "lowest"
        q = rng.choice([f"Which {b} has the {word} {n}?", f"Name the {b} of the {T} with the {word} {n}."])
        gold = f"SELECT {b} FROM {T} ORDER BY {n} {'DESC' if desc else 'ASC'} LIMIT 1"
        wrong = [f"SELECT {b} FROM {T} ORDER BY {n} {'ASC' if desc else 'DESC'} LIMIT 1",
                 f"SELECT {b} FROM {T} ORDER BY {m} {'DESC' if desc else 'ASC'} LIMIT 1",
                 f"SELECT {c} FROM {T} ORDER BY {n} {'DESC' if desc else 'ASC'} LIMIT 1",
                 f"SELECT {b} FROM {T} ORDER {n} {'DESC' if desc else 'ASC'} LIMIT 1"]
    elif family == "distinct":
        q = rng.choice([f"How many different {b} values do the {Ts} have?", f"Count the distinct {b} of all {Ts}."])
        gold = f"SELECT COUNT(DISTINCT {b}) FROM {T}"
        habit = f"SELECT COUNT({b}) FROM {T}"
        wrong = [habit, f"SELECT COUNT(DISTINCT {c}) FROM {T}", f"SELECT DISTINCT {b} FROM {T}", f"SELECT COUNT(DISTINCT {b} FROM {T}"]
    elif family == "agg_where":
        agg = rng.choice(sorted(AGGREGATES))
        q = rng.choice([f"What is the {AGGREGATES[agg]} {n} of {Ts} whose {b} is {v}?",
                        f"Find the {AGGREGATES[agg]} {n} for {Ts} with {b} {v}."])
        gold = f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{v}'"
        contrast = f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{v}' AND {c} = '{w2}'"
        wrong = [contrast, f"SELECT {agg}({n}) FROM {T}", f"SELECT {agg}({m}) FROM {T} WHERE {b} = '{v}'",
                 f"SELECT {agg}({n}) FROM {T} WHERE {b} = '{other_v}'"] + \
                [f"SELECT {a2}({n}) FROM {T} WHERE {b} = '{v}'" for a2 in sorted(AGGREGATES) if a2 != agg]
    else:
        raise ValueError(f"unknown family {family!r}")
    return q, gold, habit, contrast, wrong


def format_prompt(create_sql: str, question: str) -> str:
    """The prompt format of Simple_RLHF's sql-create-context data."""
    return f"Human: context= {create_sql} question= {question} Assistant:"


def make_row(rng: random.Random, family: str) -> dict | None:
    """One preference row of a family, or None when this random table cannot make every wrong SQL differ."""
    t = _make_table(rng)
    setup = _setup_sql(t)
    q, gold, habit, contrast, wrong = _question(rng, t, family)
    gold_result = execute_sql(setup, gold)
    if gold_result is None or gold_result in ([], [(None,)]):
        return None                                   # empty answers make wrong queries look right
    wrong = [s for s in wrong if s and execute_sql(setup, s) != gold_result]
    if (habit and habit not in wrong) or (contrast and contrast not in wrong) or not wrong:
        return None                                   # the habit / contrast must really change the result
    # rejected: the family's habit (or the contrast) half the time, else any other mistake
    special = habit or contrast
    rejected = special if special and rng.random() < 0.5 else rng.choice(wrong)
    response = habit if habit and rng.random() < HABIT_RATE else gold
    return {"prompt": format_prompt(_create_sql(t), q), "chosen": " " + gold, "rejected": " " + rejected,
            "response": " " + response, "family": family, "setup_sql": setup,
            "more_rejected": [" " + s for s in wrong if s != rejected]}


def make_dataset(n_train: int = 6000, n_eval: int = 800, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Deterministic train and eval rows, families in equal shares; no eval prompt appears in train."""
    rng = random.Random(seed)
    train, eval_, seen = [], [], set()
    for rows, n in ((train, n_train), (eval_, n_eval)):
        i = 0
        while len(rows) < n:
            row = make_row(rng, FAMILIES[i % len(FAMILIES)])
            if row is None or row["prompt"] in seen:
                continue
            seen.add(row["prompt"])
            rows.append(row)
            i += 1
    return train, eval_


def write_jsonl(rows: list[dict], path) -> None:
    """Write JSON lines atomically (tmp file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_dataset(data_dir=ROOT / "dataset") -> dict:
    """Regenerate dataset/train.json and dataset/eval.json (byte for byte the committed files)."""
    train, eval_ = make_dataset()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    write_jsonl(train, Path(data_dir, "train.json"))
    write_jsonl(eval_, Path(data_dir, "eval.json"))
    return {"train": len(train), "eval": len(eval_)}


# ---------------------------------------------------------------------------- loading any preference file

FIELD_ALIASES = {"prompt": ["prompt", "question", "query"], "chosen": ["chosen", "response_chosen", "answer"],
                 "rejected": ["rejected", "response_rejected", "negative"], "response": ["response"]}
# chat messages ([{"role", "content"}, ...]) become text in the shipped prompts' style:
# "Human: ... Assistant: ..."
ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant",
              "system": "System"}
ASSISTANT_ROLES = ("assistant", "gpt")
# where an assistant turn begins in text that holds a whole chat (Anthropic HH: "\n\nAssistant:")
TURN_MARKERS = ("Assistant:", "<|assistant|>", "### Response:")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


class DataError(ValueError):
    """A bad row in a data file; the message names file, line and field."""


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
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
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


def load_data(cfg: Config, kind: str, limit: int | None = None) -> Rows:
    """Rows of a config's source: "sft", "pref", "prompt" (n_train rows) or "eval" (n_eval)."""
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
    print(f"{what}: {len(rows)} rows from {rows.info['source']}{cut}")
    return rows


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


# ---------------------------------------------------------------------------- execution accuracy (the gold metric)


def execute_sql(setup_sql: str, query: str, max_steps: int = 200_000):
    """Rows of `query` on a fresh in-memory database built by `setup_sql`, sorted; None if the SQL fails."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(setup_sql)
        steps = [0]

        def guard():                         # a runaway query (e.g. a cross join) is stopped, not waited for
            steps[0] += 1
            return steps[0] > max_steps // 1000
        con.set_progress_handler(guard, 1000)
        result = con.execute(query).fetchall()
        return sorted(tuple(round(x, 6) if isinstance(x, float) else x for x in r) for r in result)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return None
    finally:
        con.close()


def execution_match(setup_sql: str, gold: str, predicted: str) -> bool:
    """True when the predicted SQL runs and returns the same rows as the gold SQL."""
    gold_rows = execute_sql(setup_sql, gold)
    return gold_rows is not None and execute_sql(setup_sql, predicted) == gold_rows


def execution_accuracy(rows: list[dict], predictions: list[str]) -> float:
    """Share of predictions whose result equals the gold (`chosen`) result on the row's tables."""
    hits = [execution_match(r["setup_sql"], r["chosen"], p) for r, p in zip(rows, predictions)]
    return sum(hits) / max(len(hits), 1)


def dataset_stats(rows: list[dict]) -> dict:
    """Rows per family, demo correctness and the share of rejected answers whose result differs."""
    import collections
    fam = collections.Counter(r.get("family", "?") for r in rows)
    demo_ok = [execution_match(r["setup_sql"], r["chosen"], r["response"]) for r in rows]
    rej_diff = [not execution_match(r["setup_sql"], r["chosen"], r["rejected"]) for r in rows]
    return {"rows": len(rows), "per_family": dict(sorted(fam.items())),
            "demo_correct": sum(demo_ok) / len(rows), "rejected_differs": sum(rej_diff) / len(rows)}


# ============================================================================ tokenizer

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(rows: list[dict], out_dir=ROOT / "tokenizer", vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on the dataset's text; every digit is its own token (so any number can
    be copied digit by digit), and pad is its own token, distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected", "response")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path):
    """AutoTokenizer from a directory (ours, or a hub model's saved copy)."""
    from transformers import AutoTokenizer
    recover_dir(path)
    if not Path(path, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer in {path}: run {MADE_BY.get(Path(path).name, '0_download.ipynb')} first")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ValueError(f"tokenizer in {path} needs a pad token distinct from EOS (pad={tok.pad_token!r})")
    return tok


def encode_batch(tok, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (twice as fast as one call each), BOS/EOS added if asked."""
    front = [tok.bos_token_id] if bos and tok.bos_token_id is not None else []
    back = [tok.eos_token_id] if eos else []
    if not texts:
        return []
    # the Rust tokenizer's own batch call gives the same ids as tok(texts) in a third of the time: the wrapper
    # around it (attention masks, BatchEncoding) costs more than the tokenising; a slow tokenizer has no backend
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
    """The rows whose answers fit max_response_tokens; over-long ones are skipped (a cut answer has no EOS to
    learn) and over-long prompts are cut to their last max_prompt_tokens tokens, both counted and printed.
    more_rejected: how many of a row's extra rejected answers the stage uses; the first that fit are kept."""
    for i, r in enumerate(rows):
        missing = [k for k in answers if not isinstance(r.get(k), str)]
        if missing:
            raise DataError(f"{what}: row {i} has no {missing[0]!r} field (this stage needs {list(answers)})")
    long_prompts = sum(len(p) > cfg.max_prompt_tokens for p in encode_batch(tok, [r["prompt"] for r in rows], bos=True))
    fits = [True] * len(rows)
    for k in answers:                           # one batched tokenizer call per field
        lengths = [len(a) for a in encode_batch(tok, [r[k] for r in rows], eos=True)]
        fits = [ok and n <= cfg.max_response_tokens for ok, n in zip(fits, lengths)]
    keep, long_extra = [], 0
    for r, ok in zip(rows, fits):
        if ok and more_rejected and r.get("more_rejected"):    # only a stage that uses them tokenises these
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
        print(f"{what}: skipped {len(rows) - len(keep)} of {len(rows)} rows whose {'/'.join(answers)} is longer "
              f"than max_response_tokens={cfg.max_response_tokens} tokens with EOS (raise it to keep them)")
    if long_extra:
        print(f"{what}: skipped {long_extra} more_rejected answers longer than max_response_tokens="
              f"{cfg.max_response_tokens} tokens with EOS (raise it to keep them)")
    if rows and not keep:
        raise DataError(f"{what}: every row is longer than max_response_tokens={cfg.max_response_tokens}")
    return keep


def check_tokenizer_matches(tok, model, cfg: Config | None = None) -> None:
    """Raise a clear error when a tokenizer and a model do not belong together (or the lengths do not fit)."""
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > emb:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's embedding has {emb}: "
                         "they come from different runs; re-run 0_download.ipynb")
    for name in ("pad_token_id", "eos_token_id"):
        m, t = getattr(model.config, name, None), getattr(tok, name)
        if m is not None and m != t:
            raise ValueError(f"{name}: tokenizer says {t}, model config says {m}; re-run 0_download.ipynb")
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if cfg is not None and n_pos and cfg.max_prompt_tokens + cfg.max_response_tokens > n_pos:
        raise ValueError(f"max_prompt_tokens + max_response_tokens = {cfg.max_prompt_tokens + cfg.max_response_tokens} "
                         f"but the model has {n_pos} positions: lower them (or max_positions before 0_download)")


# ============================================================================ models


def tiny_opt_config(cfg: Config, tok):
    """An OPTConfig sized by the preset; dropout off (RL needs identical forward passes)."""
    from transformers import OPTConfig
    return OPTConfig(vocab_size=len(tok), hidden_size=cfg.d_model, word_embed_proj_dim=cfg.d_model,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, ffn_dim=4 * cfg.d_model,
                     max_position_embeddings=cfg.max_positions, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, layerdrop=0.0, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


DROPOUT_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "layerdrop")


def disable_dropout(model):
    """Dropout off for real, so train-mode and eval-mode forwards agree (PPO's first ratio is exactly 1)."""
    import torch
    # hub OPT checkpoints ship dropout 0.1: OPT layers call F.dropout(p=self.dropout) with rates copied from the
    # config into plain float attributes, which no nn.Dropout module holds; so zero the config, the attributes
    # and the modules (the saved config then says 0 too, for whoever loads it next)
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or key == "layerdrop") and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in DROPOUT_ATTRS:
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model


def run_in_precision(model, precision: str):
    """Every forward of `model` (training, generation, scoring) runs under autocast in `precision`, while its
    weights stay fp32: the master copy the optimizer updates (fp16 weights would lose small updates)."""
    import types
    import torch
    if precision == "fp32":
        return model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device_type = next(model.parameters()).device.type

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return type(self).forward(self, *args, **kwargs)
    model.forward = types.MethodType(forward, model)    # a bound method: deepcopy rebinds it to the copy
    return model


def ready_model(model, cfg: Config | None, device):
    """A loaded model made ready to train or score: dropout off, on the device, gradient checkpointing if the
    config asks, forwards in the config's precision (fp32 without a config)."""
    model = disable_dropout(model).to(device or "cpu")
    if cfg is None:
        return model
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return run_in_precision(model, resolve_precision(cfg, next(model.parameters()).device))


def add_lora(model, cfg: Config):
    """With cfg.lora_r > 0, wrap the model in peft LoRA adapters on every linear layer (base weights frozen)."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    import warnings
    with warnings.catch_warnings():             # peft calls a transformers method deprecated in v5: not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora)


@contextlib.contextmanager
def reference_model(actor, ref):
    """The frozen reference policy: the SFT copy `ref`, or with LoRA (ref=None) the actor itself with its
    adapters switched off, so only one copy of the base weights is held."""
    import torch
    with torch.no_grad():
        if ref is not None:
            yield ref
        else:
            with actor.disable_adapter():
                yield actor


def _require(path, stage: str | None = None) -> Path:
    """The path, or a clear error saying which notebook makes it (by default the one that writes that folder)."""
    path = Path(path)
    recover_dir(path)                         # a save cut between its two renames left the complete copy in .old
    stage = stage or MADE_BY.get(path.name, "the notebook that writes it")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no model: run {stage} first")
    if not list(path.glob("*.safetensors")):  # we never unpickle a .bin: it could run arbitrary code
        raise FileNotFoundError(f"{path} has a config but no .safetensors weights: run {stage} again")
    return path


def load_causal_lm(path, stage: str | None = None, device=None, cfg: Config | None = None):
    """A causal LM from a save_pretrained directory (safetensors only) in fp32, made ready by ready_model."""
    import torch
    from transformers import AutoModelForCausalLM
    quiet_hf()
    # fp32 whatever the checkpoint holds: transformers 5 keeps a hub checkpoint's float16, and AdamW on fp16
    # weights turns them into NaN within a step
    model = AutoModelForCausalLM.from_pretrained(_require(path, stage), use_safetensors=True, dtype=torch.float32)
    return ready_model(model, cfg, device)


def load_score_model(path, stage: str | None = None, device=None, cfg: Config | None = None):
    """A backbone + scalar head (AutoModelForSequenceClassification, num_labels=1) in fp32, made ready."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    quiet_hf()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()          # a fresh head on a causal-LM checkpoint is expected, not a warning
    try:
        model = AutoModelForSequenceClassification.from_pretrained(_require(path, stage), num_labels=1,
                                                                   use_safetensors=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 1
    return ready_model(model, cfg, device)


def prepare_base_models(cfg: Config) -> dict:
    """model/base_actor (and base_critic for opt): a fresh tiny OPT, or hub checkpoints saved locally (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTForCausalLM
    out = {}
    if not cfg.actor_hub:                                   # tiny / smoke: built here, trained from scratch
        tok = load_tokenizer(cfg.tokenizer_dir)
        set_seed(cfg.seed)
        model = OPTForCausalLM(tiny_opt_config(cfg, tok))
        out["base_actor"] = save_model(model, tok, cfg.path("base_actor"))
        return out
    local = Path(cfg.actor_hub).is_dir()
    if not local and not hub_reachable():
        raise ConnectionError(f"the model hub is unreachable, so {cfg.actor_hub} cannot be downloaded: "
                              "use RLHF_PRESET=tiny (trains a small OPT here), or set actor_hub/critic_hub to local dirs")
    for key, name in (("base_actor", cfg.actor_hub), ("base_critic", cfg.critic_hub)):
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load model {name!r}: check the name (e.g. facebook/opt-350m) or the path") from e
        if key == "base_actor":
            tok.save_pretrained(cfg.tokenizer_dir)
        out[key] = save_model(disable_dropout(model), tok, cfg.path(key))
    return out


def save_model(model, tok, path, metrics: dict | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + metrics.json into a temp dir, then swap it in atomically."""
    quiet_hf()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):      # LoRA: save merged weights, so a plain from_pretrained loads them
        import copy
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(tmp)
    if metrics is not None:
        Path(tmp, "metrics.json").write_text(json.dumps(metrics, indent=1))
    _swap_dir(tmp, path)
    return path


def _swap_dir(tmp: Path, path: Path) -> None:
    """Replace directory `path` by `tmp`; at every instant either the old or the new one is complete."""
    old = path.with_name(path.name + ".old")
    recover_dir(path)                         # else the rmtree below could delete the only complete copy
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path) -> None:
    """If a swap was interrupted between its two renames, put the old complete directory back."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)


# ---------------------------------------------------------------------------- stopping cleanly


class TrainingStopped(KeyboardInterrupt):
    """A stage stopped by Ctrl-C, Jupyter's stop button or SIGTERM; the message says what is kept on disk."""


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def kept_model(path) -> str:
    """What a stopped SFT or RM run leaves: nothing of the run, and `path` as it was (the last completed model)."""
    recover_dir(path)
    done = (Path(path) / "config.json").exists()
    there = "still holds the last completed model, untouched" if done else "has no model yet"
    return (f"Nothing of this run was saved ({path} {there}). To train again, re-run the cell that loads the "
            "model, then this one.")


def check_not_stopped(model) -> None:
    """Refuse to train a model object that a stopped run left half-trained (re-running only the training cell)."""
    if getattr(model, "_stopped_midway", False):
        raise RuntimeError("this model was partly trained by a stopped run: re-run the cell that loads it, then this one")


@contextlib.contextmanager
def stop_cleanly(stage: str, cfg: Config, batch_fields=(), kept=lambda: "", model=None):
    """Around a training or generation loop: SIGTERM stops it like Ctrl-C (so no write is cut short by a kill),
    and an interrupt, a NaN loss or CUDA out-of-memory end in one short message saying what is kept on disk,
    instead of a stack trace from inside torch. `model` is marked so that it is not trained on by mistake."""
    import torch
    previous = signal.getsignal(signal.SIGTERM)
    # handlers can only be set in the main thread; None means a handler not set from Python: leave it alone
    install = previous is not None and threading.current_thread() is threading.main_thread()
    if install:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    error = None
    try:
        yield
    except TrainingStopped:
        raise                                 # an inner stop_cleanly has explained it already
    except KeyboardInterrupt:
        error = TrainingStopped(f"{stage} stopped by an interrupt. {kept()}".rstrip())
    except FloatingPointError as e:
        error = FloatingPointError(f"{e}. {kept()}".rstrip())
    except torch.cuda.OutOfMemoryError:
        now = ", ".join(f"{f}={getattr(cfg, f)}" for f in batch_fields)
        half = ", ".join(f"{f}={max(1, getattr(cfg, f) // 2)}" for f in batch_fields)
        fix = f"try util.get_config(PRESET, {half}) in the set-up cell" if batch_fields else "use smaller batches"
        error = MemoryError(f"{stage}: out of GPU memory with {now or 'this batch size'}. Restart the kernel "
                            f"(frees the memory), then {fix}. {kept()}".rstrip())
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)
    if error is None:
        return
    if model is not None:
        model._stopped_midway = True          # its weights are neither the start nor the end of a run
    # raised here, `from None`: the message is not buried under torch's frames
    raise error from None


# ============================================================================ generation


def left_pad(seqs: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) with left padding, as generation wants."""
    import torch
    n = max(len(s) for s in seqs)               # padded as Python lists: one tensor copy, not one per row
    ids = torch.tensor([[pad_id] * (n - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def encode_prompts(tok, prompts: list[str], max_tokens: int):
    """Left-padded prompt batch; over-long prompts keep their last max_tokens tokens."""
    seqs = [p[-max_tokens:] for p in encode_batch(tok, prompts, bos=True)]
    return left_pad(seqs, tok.pad_token_id)


def generate(model, tok, prompts: list[str], cfg: Config, greedy: bool = False, temperature: float | None = None):
    """Batched KV-cached generation: returns (query+response ids [B, Lq+Lr], prompt mask, prompt length)."""
    import torch
    ids, mask = encode_prompts(tok, prompts, cfg.max_prompt_tokens)
    device = next(model.parameters()).device
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature or cfg.temperature,
                                                       top_k=0, top_p=1.0)   # pure temperature sampling
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_response_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True, **kwargs)
    if out.shape[1] == ids.shape[1]:                          # nothing generated at all: keep one pad column
        out = torch.cat([out, torch.full_like(out[:, :1], tok.pad_token_id)], 1)
    return out, mask.to(device), ids.shape[1]


def first_eos_index(responses, eos_id: int):
    """Index of the first EOS in each response; the last index when there is none."""
    import torch
    is_eos = responses == eos_id
    idx = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], responses.shape[1] - 1, dtype=torch.long))
    return idx.long(), is_eos.any(1)


def response_mask(responses, eos_id: int):
    """1 up to and including the first EOS, 0 after it (those tokens are not part of the answer)."""
    import torch
    end, _ = first_eos_index(responses, eos_id)
    return (torch.arange(responses.shape[1], device=responses.device)[None] <= end[:, None]).long()


def decode_responses(tok, responses) -> list[str]:
    """Text of each response, cut at its first EOS."""
    mask = response_mask(responses, tok.eos_token_id)
    return [tok.decode([t for t, m in zip(r.tolist(), mk.tolist()) if m and t != tok.eos_token_id],
                       skip_special_tokens=True) for r, mk in zip(responses, mask)]


def sample_answers(model, tok, prompts: list[str], cfg: Config, greedy: bool = False, batch_size: int = 0,
                   desc: str = "generating"):
    """Answers as text for many prompts, in batches, with a progress bar."""
    out = []
    bs = batch_size or cfg.eval_batch_size
    with stop_cleanly(desc, cfg, () if batch_size else ("eval_batch_size",)):
        for i in progress(range(0, len(prompts), bs), desc=desc, leave=False):
            qr, _, lq = generate(model, tok, prompts[i:i + bs], cfg, greedy=greedy)
            out += decode_responses(tok, qr[:, lq:])
    return out


def logprobs_from_logits(logits, tokens, temperature: float = 1.0):
    """log p(token) under softmax(logits / temperature): the same temperature the tokens were sampled with."""
    import torch
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, query_responses, attention_mask, context_length: int, temperature: float = 1.0):
    """Per-token log-probs of the response part; logits at position t predict token t+1."""
    # the LM head (vocab-wide: the costliest layer per token here) runs only where a response token is predicted,
    # not on the prompt: logits_to_keep keeps the last positions, from the prompt's last token on
    keep = query_responses.shape[1] - context_length + 1
    logits = model(input_ids=query_responses, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]
    return logprobs_from_logits(logits, query_responses[:, context_length:], temperature), logits


# ============================================================================ SFT


def sft_examples(tok, prompts: list[str], responses: list[str], max_prompt: int, max_response: int):
    """[(input_ids, labels)]: labels copy the response tokens and are -100 on the prompt (no loss there)."""
    out = []
    for p, r in zip(encode_batch(tok, prompts, bos=True), encode_batch(tok, responses, eos=True)):
        p, r = p[-max_prompt:], r[:max_response]
        out.append((p + r, [-100] * len(p) + r))
    return out


def row_examples(tok, rows: list[dict], cfg: Config, key: str = "response"):
    """sft_examples of each row's prompt -> row[key], cut to the config's prompt and answer lengths."""
    return sft_examples(tok, [r["prompt"] for r in rows], [r[key] for r in rows], cfg.max_prompt_tokens,
                        cfg.max_response_tokens)


def sft_example(tok, prompt: str, response: str, max_prompt: int, max_response: int):
    """One (input_ids, labels) pair, as sft_examples."""
    return sft_examples(tok, [prompt], [response], max_prompt, max_response)[0]


def right_pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, labels) right-padded; pads get label -100."""
    import torch
    n = max(len(x) for x, _ in examples)        # padded as Python lists: one tensor copy, not one per row
    ids = torch.tensor([x + [pad_id] * (n - len(x)) for x, _ in examples], dtype=torch.long)
    labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in examples], dtype=torch.long)
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in examples], dtype=torch.long)
    return ids, mask, labels


def batches(n: int, batch_size: int, epochs: float, seed: int):
    """Shuffled index batches covering `epochs` passes over n items (a fraction means a partial last pass)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    total = int(math.ceil(n * epochs / batch_size))
    out = []
    while len(out) < total:
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]
    return out[:total]


def make_optimizer(model, lr: float, steps: int, warmup: float = 0.05, weight_decay: float = 0.0):
    """AdamW with a linear warm-up then cosine decay (transformers' scheduler)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    return opt, get_cosine_schedule_with_warmup(opt, int(warmup * steps), steps)


def micro_batches(idx: list, cfg: Config) -> list[list]:
    """A batch's indices cut into micro-batches of cfg.micro_batch_size (one piece when it is 0): gradients add
    up over them, so the optimizer sees the whole batch while memory holds one micro-batch."""
    n = cfg.micro_batch_size or max(len(idx), 1)
    return [idx[i:i + n] for i in range(0, len(idx), n)]


def grad_scaler(cfg: Config, device):
    """fp16's loss scaler (small fp16 gradients underflow to 0 without it); None in bf16 and fp32."""
    import torch
    fp16 = resolve_precision(cfg, device) == "fp16"
    return torch.amp.GradScaler(torch.device(device).type) if fp16 else None


def backward(loss, scaler) -> None:
    """loss.backward(), through accelerate (DDP averages gradients over processes), scaled under fp16."""
    accelerator().backward(scaler.scale(loss) if scaler is not None else loss)


def optimizer_step(pairs, cfg: Config, scaler, what: str, step) -> float:
    """Clip each model's gradient norm to max_grad_norm, then step each (optimizer, model) pair; returns the
    summed norm. A NaN/inf gradient stops the run, except under fp16 loss scaling where it is expected now and
    then: the scaler skips that step and lowers its scale."""
    import torch
    if scaler is not None:
        for opt, _ in pairs:
            scaler.unscale_(opt)                # clip the true gradients, not the scaled ones
    norm = sum(float(torch.nn.utils.clip_grad_norm_(unwrap(m).parameters(), cfg.max_grad_norm))
               for _, m in pairs)
    if scaler is None:
        check_finite(norm, f"{what} gradient norm", step)   # a finite loss can still give inf gradients
    for opt, _ in pairs:
        scaler.step(opt) if scaler is not None else opt.step()
    if scaler is not None:
        scaler.update()
    return norm


def label_logits(model, ids, mask, labels):
    """(logits, predicts): logits at the positions that predict a labelled token only, as one (tokens, vocab)
    tensor, and the (rows, length - 1) mask of those positions. The LM head (vocab-wide: the costliest layer per
    token here) skips the prompt and the pads, most of each row."""
    predicts = labels[:, 1:] != -100            # position t predicts token t+1
    # cut the head's input inside an ordinary forward: through an accelerate (DDP) wrapper, which syncs gradients
    # only that way
    head = unwrap(model).get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: (args[0][:, :-1][predicts],))
    try:
        return model(input_ids=ids, attention_mask=mask).logits, predicts
    finally:
        hook.remove()


def sft_loss(model, batch, device):
    """Mean cross-entropy over response tokens, the label of each position being the next token."""
    import torch.nn.functional as F
    ids, mask, labels = (t.to(device) for t in batch)
    logits, predicts = label_logits(model, ids, mask, labels)
    return F.cross_entropy(logits.float(), labels[:, 1:][predicts])


def eval_sft_loss(model, examples, pad_id: int, device, batch_size: int = 64) -> float:
    """Held-out SFT loss, token-weighted."""
    import torch
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = right_pad_batch(examples[i:i + batch_size], pad_id)
            k = int((b[2][:, 1:] != -100).sum())
            tot, n = tot + float(sft_loss(model, b, device)) * k, n + k
    return tot / n if n else float("nan")      # no held-out answers: no loss to show, not 0


def train_sft(model, tok, train_rows, eval_rows, cfg: Config, device, n_logs: int = 25) -> list[dict]:
    """Supervised fine-tuning on prompt -> response demos; returns the loss history (held-out loss on up to
    200 eval rows, n_logs times)."""
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
    wrapped, scaler = accelerator().prepare(model), grad_scaler(cfg, device)   # DDP only with N processes
    history, run = [], []
    bar = progress(plan, desc="SFT")
    with stop_cleanly("SFT", cfg, ("sft_batch_size",), lambda: kept_model(cfg.path("actor")), model):
        for step, idx in enumerate(bar, 1):
            model.train()
            parts = [right_pad_batch([ex[i] for i in p], tok.pad_token_id) for p in micro_batches(my_share(idx), cfg)]
            n_answer = [int((labels[:, 1:] != -100).sum()) for _, _, labels in parts]
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for b, n in zip(parts, n_answer):
                # each micro-batch's token-mean weighted by its share of the answer tokens: the parts add up
                # to the whole batch's token-mean, and so do their gradients
                part = sft_loss(wrapped, b, device) * (n / max(sum(n_answer), 1))
                check_finite(part, "SFT loss", step)
                backward(part, scaler)
                loss += float(part.detach())
            optimizer_step([(opt, model)], cfg, scaler, "SFT", step)
            sched.step()
            run.append(loss)
            if step % log_every == 0 or step == len(plan):
                rec = {"step": step, "epoch": step * cfg.sft_batch_size / len(ex), "train_loss": sum(run) / len(run),
                       "eval_loss": eval_sft_loss(model, ev, tok.pad_token_id, device)}
                history.append(rec)
                run = []
                bar.set_postfix(train=f"{rec['train_loss']:.3f}", eval=f"{rec['eval_loss']:.3f}", refresh=False)
    model.eval()
    return history


def check_finite(loss, what: str, step) -> None:
    """Stop with a clear message on a NaN/inf loss instead of training on garbage (`step`: a number or a phrase)."""
    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        at = f"step {step}" if isinstance(step, int) else step
        raise FloatingPointError(f"{what} became {value} at {at}, before it reached the weights: "
                                 "lower the learning rate")


# ============================================================================ reward model


def last_token_index(attention_mask):
    """Index of the last real token of each row, for left or right padding (the EOS of the answer)."""
    import torch
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos[None] * attention_mask).argmax(1)


def token_scores(model, input_ids, attention_mask, cache=None):
    """The scalar head applied at every position: per-token values for the PPO critic (fp32)."""
    # the model's own output keeps the last position only, so catch the head's full output during an ordinary
    # forward: the call still goes through an accelerate (DDP) wrapper, which syncs gradients only that way
    seen = []
    hook = unwrap(model).score.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, cache=cache)
    finally:
        hook.remove()
    return seen[-1].squeeze(-1).float()


def at_last_token(per_token, attention_mask):
    """Per-token scores read at the last real token of each row (the EOS, not a pad after it)."""
    import torch
    return per_token[torch.arange(len(per_token), device=per_token.device), last_token_index(attention_mask)]


def reward_scores(model, input_ids, attention_mask, normalized: bool = True):
    """The reward: the head's output read at the last real token, minus the stored offset that makes the SFT
    policy's mean score 0."""
    s = at_last_token(token_scores(model, input_ids, attention_mask), attention_mask)
    return s - getattr(model.config, "reward_offset", 0.0) if normalized else s


def pairwise_loss(r_chosen, r_rejected):
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), averaged."""
    import torch.nn.functional as F
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def mistake_positions(ids_chosen, ids_rejected, mask_chosen, mask_rejected):
    """1 on the rejected tokens from the first one that departs from the chosen answer up to its EOS."""
    import torch
    differs = (ids_chosen != ids_rejected) & ((mask_chosen + mask_rejected) > 0)
    first = differs.int().argmax(1)
    pos = torch.arange(ids_rejected.shape[1], device=ids_rejected.device)[None]
    return ((pos >= first[:, None]) & (mask_rejected > 0)).float()


def rm_batch(tok, rows, cfg: Config, key: str):
    """Right-padded (ids, mask) of prompt + rows[key] + EOS."""
    ids, mask, _ = right_pad_batch(row_examples(tok, rows, cfg, key), tok.pad_token_id)
    return ids, mask


def ranking_examples(tok, rows: list[dict], cfg: Config) -> list[tuple[list[int], list[list[int]]]]:
    """Each row tokenised: its prompt ids and its answers [chosen, rejected, *more_rejected] (up to rm_max_rejected
    rejected ones), each with EOS."""
    answers = [[r["chosen"], r["rejected"], *r.get("more_rejected", [])][:cfg.rm_max_rejected + 1] for r in rows]
    ids = encode_batch(tok, [a for row in answers for a in row], eos=True)     # every answer in one call
    out, i = [], 0
    for p, row in zip(encode_batch(tok, [r["prompt"] for r in rows], bos=True), answers):
        out.append((p[-cfg.max_prompt_tokens:], [a[:cfg.max_response_tokens] for a in ids[i:i + len(row)]]))
        i += len(row)
    return out


def ranking_batch(examples: list[tuple[list[int], list[list[int]]]], pad_id: int):
    """Each prompt once, left-padded, and its answers right-padded: (prompt ids, prompt mask, answer ids, answer
    mask, row of each answer, and for each pair the index of its chosen and of its rejected answer)."""
    import torch
    prompt_ids, prompt_mask = left_pad([p for p, _ in examples], pad_id)
    answers, owner, chosen, rejected = [], [], [], []
    for i, (_, row_answers) in enumerate(examples):
        for j, a in enumerate(row_answers):
            if j:                               # answer 0 is the chosen one, every later one is a rejected one
                chosen.append(len(answers) - j)
                rejected.append(len(answers))
            answers.append(a)
            owner.append(i)
    ids, mask, _ = right_pad_batch([(a, a) for a in answers], pad_id)
    return prompt_ids, prompt_mask, ids, mask, torch.tensor(owner), torch.tensor(chosen), torch.tensor(rejected)


def shared_prompt_scores(model, prompt_ids, prompt_mask, ids, mask, owner):
    """Per-token scores of answers that share prompts: each prompt runs through the model once and its cached
    keys/values serve all its answers (InstructGPT's trick: K answers cost one prompt, not K)."""
    import torch
    full_mask = torch.cat([prompt_mask[owner], mask], 1)
    if unwrap(model).is_activation_checkpointing and unwrap(model).training:
        # gradient checkpointing returns no cache in training: read each prompt again with each of its answers
        ids = torch.cat([prompt_ids[owner], ids], 1)
        return token_scores(model, ids, full_mask)[:, prompt_ids.shape[1]:]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    out.cache.batch_select_indices(owner)       # one copy of the prompt's keys/values per answer
    return token_scores(model, ids, full_mask, cache=out.cache)


def score_texts(model, tok, prompts: list[str], answers: list[str], cfg: Config, device, normalized=True, batch_size=128):
    """Reward of each (prompt, answer) pair."""
    import torch
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            rows = [{"prompt": p, "x": a} for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
            ids, mask = rm_batch(tok, rows, cfg, "x")
            out += reward_scores(model, ids.to(device), mask.to(device), normalized).tolist()
    return out


def score_pairs(model, tok, rows, cfg: Config, device, batch_size: int = 128):
    """(chosen scores, rejected scores), raw, for many rows, no gradient; each prompt is read once."""
    import torch
    one_pair = dataclasses.replace(cfg, rm_max_rejected=1)
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = ranking_batch(ranking_examples(tok, rows[i:i + batch_size], one_pair), tok.pad_token_id)
            prompt_ids, prompt_mask, ids, mask, owner, c, r = (t.to(device) for t in batch)
            s = at_last_token(shared_prompt_scores(model, prompt_ids, prompt_mask, ids, mask, owner), mask)
            chosen += s[c].tolist()
            rejected += s[r].tolist()
    return chosen, rejected


def reward_loss(model, prompt_ids, prompt_mask, ids, mask, owner, c, r, prefix_weight: float = 0.0):
    """(loss, chosen scores, rejected scores) of one ranking_batch: the pairwise loss of every (chosen, rejected)
    pair, plus prefix_weight times the same loss on each rejected prefix that already holds the mistake."""
    import torch
    # every answer of a prompt (chosen, its rejected ones) in one pass that reads the prompt once
    per_token = shared_prompt_scores(model, prompt_ids, prompt_mask, ids, mask, owner)
    s = at_last_token(per_token, mask)
    rc, rr = s[c], s[r]                         # one (chosen, rejected) pair per rejected answer
    loss = pairwise_loss(rc, rr)
    if prefix_weight > 0:
        # rank every rejected prefix that already contains the mistake below the chosen answer too: the model
        # is told *where* the error is, not only that the answer is worse overall
        after = mistake_positions(ids[c], ids[r], mask[c], mask[r])
        pre = -torch.nn.functional.logsigmoid(rc[:, None] - per_token[r])
        loss = loss + prefix_weight * masked_mean(pre, after)
    return loss, rc.detach(), rr.detach()


def train_reward(model, tok, train_rows, eval_rows, cfg: Config, device, n_logs: int = 10) -> list[dict]:
    """Pairwise reward-model training; returns loss/accuracy history (train running, held-out on up to 200 pairs)."""
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
    if cfg.rm_freeze_backbone:                  # train the head only (cheap, less overfitting, weaker)
        for p in getattr(model, model.base_model_prefix).parameters():
            p.requires_grad_(False)
    examples = ranking_examples(tok, train_rows, cfg)      # tokenise once, not once per epoch
    plan = batches(len(train_rows), cfg.rm_batch_size, cfg.rm_epochs, cfg.seed)
    log_every = max(1, len(plan) // n_logs)
    opt, sched = make_optimizer(model, cfg.rm_lr, len(plan))
    wrapped, scaler = accelerator().prepare(model), grad_scaler(cfg, device)   # DDP only with N processes
    history, run = [], []
    bar = progress(plan, desc="reward model")
    with stop_cleanly("reward model", cfg, ("rm_batch_size",), lambda: kept_model(cfg.path("critic")), model):
        for step, idx in enumerate(bar, 1):
            model.train()
            parts = micro_batches(my_share(idx), cfg)
            n_pairs = [sum(len(examples[i][1]) - 1 for i in p) for p in parts]
            opt.zero_grad(set_to_none=True)
            loss, right = 0.0, 0.0
            for p, n in zip(parts, n_pairs):
                batch = (t.to(device) for t in ranking_batch([examples[i] for i in p], tok.pad_token_id))
                part, rc, rr = reward_loss(wrapped, *batch, cfg.rm_prefix_weight)
                # the micro-batch's share of the batch's pairs: exact for the pairwise loss; the prefix term
                # (a mean over mistake positions) is weighted the same way, which is close but not exact
                part = part * (n / sum(n_pairs))
                check_finite(part, "reward loss", step)
                backward(part, scaler)
                loss, right = loss + float(part.detach()), right + float((rc > rr).sum())
            optimizer_step([(opt, model)], cfg, scaler, "reward", step)
            sched.step()
            run.append((loss, right / sum(n_pairs)))
            if step % log_every == 0 or step == len(plan):
                c, r = score_pairs(model, tok, curve_rows, cfg, device)
                rec = {"step": step, "train_loss": sum(x for x, _ in run) / len(run), "train_acc": sum(a for _, a in run) / len(run),
                       "eval_acc": sum(a > b for a, b in zip(c, r)) / len(c) if c else float("nan")}
                history.append(rec)
                run = []
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", eval_acc=f"{rec['eval_acc']:.3f}", refresh=False)
    model.eval()
    return history


def set_reward_offset(model, tok, prompts, policy_answers, cfg: Config, device) -> float:
    """Normalise: store in the config the mean raw score of the SFT policy's answers, so that mean becomes 0."""
    raw = score_texts(model, tok, prompts, policy_answers, cfg, device, normalized=False)
    model.config.reward_offset = float(sum(raw) / len(raw))
    return model.config.reward_offset


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
    import torch
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def place_rewards(scores, kl, mask, end_index, kl_coef: float):
    """Per-token rewards: -kl_coef * KL on every answer token, plus the RM score on the EOS token
    only (not on a pad after it, and not spread over the answer)."""
    import torch
    rewards = -kl_coef * kl * mask
    rewards[torch.arange(len(scores), device=scores.device), end_index] += scores
    return rewards


def gae_advantages(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation, backwards over the answer; nothing flows in after EOS."""
    import torch
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


def rollout(actor, ref, critic, rm, tok, rows, cfg: Config, timings: dict | None = None) -> Rollout:
    """Sample answers with the policy, then score them with the reference, critic and RM."""
    import torch
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
        values = token_scores(critic, qr, attn)[:, lq - 1:-1]   # value before token t sits at t-1
        scores = reward_scores(rm, qr, attn)        # read at the EOS, where the attention mask ends
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
    import torch
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    return masked_mean(losses, mask), ratio


def ppo_value_loss(values, old_values, returns, mask, cliprange_value: float):
    """The critic's clipped squared error, token-mean, halved: a new value may move at most
    cliprange_value from the rollout's value before its error stops counting for it (the larger of
    the two errors is kept)."""
    import torch
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_losses(actor, critic, ro: Rollout, idx, advantages, returns, cfg: Config) -> dict:
    """Policy and value losses of the rollout's answers idx under the actor and critic as they are
    now, with what they are made of: pg_loss, vf_loss, ratio, logprobs, logits, values."""
    m, qr, attn = ro.mask[idx], ro.query_responses[idx], ro.attention_mask[idx]
    logprobs, logits = response_logprobs(actor, qr, attn, ro.context_length, cfg.temperature)
    values = token_scores(critic, qr, attn)[:, ro.context_length - 1:-1]   # before token t: at t-1
    # the ratio is taken against the rollout's log-probs (pi_old): they stay fixed over the epochs
    pg_loss, ratio = ppo_policy_loss(logprobs, ro.logprobs[idx], advantages[idx], m, cfg.cliprange)
    vf_loss = ppo_value_loss(values, ro.values[idx], returns[idx], m, cfg.cliprange_value)
    return {"pg_loss": pg_loss, "vf_loss": vf_loss, "ratio": ratio, "logprobs": logprobs,
            "logits": logits, "values": values}


def minibatch_stats(out: dict, ro: Rollout, idx, cfg: Config) -> dict:
    """What to watch while updating, token-means over the answers idx (0-dim tensors): the losses,
    how often the clips act, the approximate KL to pi_old and the policy's entropy."""
    import torch
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
    import torch
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


def adaptive_kl(kl_coef: float, kl: float, target: float, batch: int, horizon: int = 10000):
    """Ziegler et al.'s controller: nudge the coefficient so the measured KL nears the target."""
    err = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + err * batch / horizon)


def ppo_advantages(ro: Rollout, cfg: Config, kl_coef: float) -> tuple:
    """(kl, rewards, advantages, returns) of a rollout: per-token KL to the reference, rewards (the
    KL penalty on every answer token, the RM score on the EOS), GAE advantages whitened over the
    answer tokens, and the returns the critic learns."""
    import torch
    kl = kl_per_token(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * ro.mask
    scores = ro.scores
    if cfg.whiten_rewards:              # unit spread batch to batch; the mean score is kept
        scores = masked_whiten(scores, torch.ones_like(scores), shift_mean=False)
    rewards = place_rewards(scores, kl, ro.mask, ro.end_index, kl_coef)
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


def optimizer_to_tensors(opt, prefix: str) -> tuple[dict, dict]:
    """(tensors, json-able meta) of an optimizer's state: safetensors instead of a pickle."""
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v.contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"], "keys": sorted(tensors)}


def optimizer_from_tensors(opt, tensors: dict, meta: dict, prefix: str) -> None:
    """Inverse of optimizer_to_tensors."""
    state = {}
    for key in meta["keys"]:
        _, i, k = key.rsplit(".", 2)
        state.setdefault(int(i), {})[k] = tensors[key]
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_ppo_checkpoint(path, models, opts, tok, state: dict) -> None:
    """Actor (top level), critic/, optimizer states (safetensors), state.json; one atomic swap."""
    from safetensors.torch import save_file
    quiet_hf()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    actor = models["actor"]
    if hasattr(actor, "disable_adapter"):   # LoRA: adapters (to resume), merged weights (4_test)
        actor.save_pretrained(tmp / "adapter")
        import copy
        actor = copy.deepcopy(actor).merge_and_unload()
    actor.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    models["critic"].save_pretrained(tmp / "critic", safe_serialization=True)
    ta, ma = optimizer_to_tensors(opts["actor"], "actor")
    tc, mc = optimizer_to_tensors(opts["critic"], "critic")
    save_file({**ta, **tc}, str(tmp / "optimizer.safetensors"))
    full = {**state, "optimizer": {"actor": ma, "critic": mc}}
    Path(tmp, "state.json").write_text(json.dumps(full, indent=1))
    Path(tmp, "metrics.json").write_text(json.dumps(state.get("history", []), indent=1))
    _swap_dir(tmp, path)


def inputs_fingerprint(cfg: Config) -> list:
    """Size and modification time of the SFT and RM weights: a checkpoint of others is stale."""
    files = sorted(p for d in ("actor", "critic") for p in cfg.path(d).glob("*.safetensors"))
    return [[p.parent.name, p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def prompts_digest(rows) -> str:
    """A short hash of the PPO prompts, in order: a checkpoint made on other prompts is stale."""
    import hashlib
    return hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest()[:16]


# Config fields a PPO checkpoint resumes across, as they do not change what PPO computes: where
# files go, how often it saves, the run's length (a larger ppo_iterations continues a run), the
# memory layout (micro-batches, gradient checkpointing: the same sums), evaluation, and the other
# stages' knobs (they reach PPO through the SFT and RM weights, which inputs_fingerprint checks)
PPO_RESUME_IGNORES = ("out_dir", "data_dir", "tokenizer_dir", "save_every", "ppo_iterations",
                      "micro_batch_size", "gradient_checkpointing", "n_eval", "eval_batch_size")
OTHER_STAGES = ("sft_", "rm_", "dpo_", "grpo_")


def ppo_settings(cfg: Config) -> dict:
    """The Config fields that shape a PPO run: a checkpoint resumes only if all of them agree."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in PPO_RESUME_IGNORES and not k.startswith(OTHER_STAGES)}


def settings_changes(old: dict, new: dict) -> list[str]:
    """'field old -> new' for each setting that differs between a checkpoint and this run."""
    return [f"{k} {old[k] if k in old else '(not recorded)'} -> {v}" for k, v in new.items()
            if k not in old or old[k] != v]


def load_ppo_state(path, cfg: Config, rows=None) -> dict | None:
    """The state.json of a PPO checkpoint made with the same settings from the same SFT and RM
    (and prompts: rows as train_ppo fits them), else None after printing why."""
    recover_dir(path)
    f = Path(path, "state.json")
    if not f.exists():
        return None
    state = json.loads(f.read_text())
    if "settings" not in state:
        why = f"the checkpoint in {path} is from an older util.py: it does not record its settings"
    elif changes := settings_changes(state["settings"], ppo_settings(cfg)):
        why = ", ".join(changes)        # a changed knob is a new experiment, never a silent resume
    elif state.get("inputs") != inputs_fingerprint(cfg):
        why = f"{path} holds a PPO run of other models (SFT or RM retrained since)"
    elif rows is not None and state.get("prompts") != prompts_digest(rows):
        why = f"{path} holds a PPO run on other prompts (the data changed)"
    else:
        return state
    print(f"{why}: starting PPO afresh (the checkpoint in {path} is replaced at its first save)")
    return None


def kept_checkpoint(path) -> str:
    """What a stopped PPO run leaves: its last complete checkpoint, which a re-run resumes from."""
    recover_dir(path)
    f = Path(path, "state.json")
    if not f.exists():
        return f"No PPO checkpoint was saved yet in {path}: re-running starts PPO afresh."
    it = json.loads(f.read_text())["iteration"]
    return (f"{path} holds the checkpoint of iteration {it}, intact: re-run this cell to resume "
            f"from it.")


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
        from peft import PeftModel
        sft = load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
        actor = (PeftModel.from_pretrained(sft, out / "adapter", is_trainable=True) if state
                 else add_lora(sft, cfg))
    else:
        actor = load_causal_lm(out if state else cfg.path("actor"), device=device, cfg=cfg)
    models = {"actor": actor,           # the reference is the SFT model, frozen: the KL leash
              "ref": None if cfg.lora_r > 0 else
              load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False),
              # the critic starts from the RM: it already reads answers and scores them
              "critic": load_score_model(out / "critic" if state else cfg.path("critic"),
                                         device=device, cfg=cfg),
              "rm": load_score_model(cfg.path("critic"), device=device,
                                     cfg=cfg).requires_grad_(False)}
    for m in models.values():
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
    import torch
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
            rec = {"iteration": it + 1, **ppo_iteration(models, opts, tok, batch, cfg, kl_coef)}
            history.append(rec)
            if cfg.kl_target > 0:
                kl_coef = adaptive_kl(kl_coef, rec["kl"], cfg.kl_target, cfg.rollout_batch_size)
            bar.set_postfix(score=f"{rec['rm_score']:.2f}", gold=f"{rec['gold_acc']:.2f}",
                            kl=f"{rec['kl']:.2f}", refresh=False)
            if (it + 1) % cfg.save_every == 0 or it + 1 == end:
                state = {**run, "iteration": it + 1, "kl_coef": kl_coef, "history": history}
                save_ppo_checkpoint(out, models, opts, tok, state)
    return history


# ============================================================================ DPO / GRPO


def pair_batch(tok, rows, cfg: Config):
    """One right-padded SFT-style batch: the chosen answers of `rows`, then their rejected answers."""
    return right_pad_batch(row_examples(tok, rows, cfg, "chosen") + row_examples(tok, rows, cfg, "rejected"),
                           tok.pad_token_id)


def answer_logprobs(model, ids, mask, labels):
    """log pi(answer | prompt) of each row: the sum of the log-probs of its labelled (answer) tokens."""
    import torch
    logits, predicts = label_logits(model, ids, mask, labels)
    logp = logprobs_from_logits(logits, labels[:, 1:][predicts])
    row = predicts.nonzero()[:, 0]              # the row each labelled token belongs to
    return torch.zeros(len(ids), dtype=logp.dtype, device=logp.device).index_add(0, row, logp)


def dpo_loss(logp_c, logp_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid"):
    """DPO loss and the implicit rewards beta * log(pi / pi_ref) of chosen and rejected answers."""
    import torch.nn.functional as F
    h = (logp_c - ref_c) - (logp_r - ref_r)       # how much more the policy prefers chosen than the reference does
    if loss_type == "sigmoid":                     # DPO: Bradley-Terry on the implicit rewards
        loss = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":                       # IPO: regress h to 1/(2 beta) instead of pushing it to infinity
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo_loss {loss_type!r}: use 'sigmoid' or 'ipo'")
    return loss.mean(), beta * (logp_c - ref_c).detach(), beta * (logp_r - ref_r).detach()


def dpo_pair_stats(model, ref, tok, rows, cfg: Config, device, batch_size: int = 64) -> dict:
    """Implicit-reward accuracy and margin on held-out pairs, no gradient."""
    import torch
    if not rows:                                # no held-out pairs: nothing measured (not 0)
        return {"eval_reward_acc": float("nan"), "eval_margin": float("nan")}
    acc, margin = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            ids, mask, labels = (t.to(device) for t in pair_batch(tok, part, cfg))
            lp = answer_logprobs(model, ids, mask, labels)
            with reference_model(model, ref) as r:
                rlp = answer_logprobs(r, ids, mask, labels)
            k = len(part)
            _, rc, rr = dpo_loss(lp[:k], lp[k:], rlp[:k], rlp[k:], cfg.dpo_beta, cfg.dpo_loss)
            acc += (rc > rr).tolist()
            margin += (rc - rr).tolist()
    return {"eval_reward_acc": sum(acc) / len(acc), "eval_margin": sum(margin) / len(margin)}


def train_dpo(model, ref, tok, train_rows, eval_rows, cfg: Config, device, n_logs: int = 20) -> list[dict]:
    """Direct preference optimisation on (prompt, chosen, rejected) against a frozen reference (ref=None: the
    model's own weights with LoRA adapters off); returns the history (held-out stats on up to 200 pairs)."""
    import torch
    check_not_stopped(model)
    check_tokenizer_matches(tok, model, cfg)
    pair = ("chosen", "rejected")
    train_rows = fit_rows(tok, with_fields(train_rows, pair, "DPO training pairs"), cfg, pair,
                          "DPO training pairs")
    eval_rows = with_fields(eval_rows[:200], pair, "DPO held-out pairs")
    print(f"DPO: {len(train_rows)} training pairs used, {len(eval_rows)} held-out pairs for the "
          "curve")
    plan = batches(len(train_rows), cfg.dpo_batch_size, cfg.dpo_epochs, cfg.seed)
    log_every = max(1, len(plan) // n_logs)
    opt, sched = make_optimizer(model, cfg.dpo_lr, len(plan))
    wrapped, scaler = accelerator().prepare(model), grad_scaler(cfg, device)   # DDP only with N processes
    history, run = [], []
    bar = progress(plan, desc="DPO")
    with stop_cleanly("DPO", cfg, ("dpo_batch_size",), lambda: kept_model(cfg.path("dpo")), model):
        for step, idx in enumerate(bar, 1):
            model.train()
            mine = my_share(idx)
            opt.zero_grad(set_to_none=True)
            loss_sum, pair_stats = 0.0, []
            for p in micro_batches(mine, cfg):
                part = [train_rows[i] for i in p]
                ids, mask, labels = (t.to(device) for t in pair_batch(tok, part, cfg))
                with reference_model(model, ref) as r:
                    ref_lp = answer_logprobs(r, ids, mask, labels)
                lp = answer_logprobs(wrapped, ids, mask, labels)
                k = len(part)
                loss, rc, rr = dpo_loss(lp[:k], lp[k:], ref_lp[:k], ref_lp[k:], cfg.dpo_beta, cfg.dpo_loss)
                if cfg.dpo_sft_weight > 0:
                    # DPO alone may lower the chosen answer's probability too (only the gap counts); an SFT
                    # term on the chosen answer holds it up (per-token mean, as in SFT)
                    n_tokens = (labels[:k, 1:] != -100).sum(1).clamp(min=1)
                    loss = loss + cfg.dpo_sft_weight * (-lp[:k] / n_tokens).mean()
                loss = loss * (k / len(mine))           # the micro-batch's share of the batch's pairs
                check_finite(loss, "DPO loss", step)
                backward(loss, scaler)
                loss_sum += float(loss.detach())
                pair_stats.append(torch.stack([(rc > rr).float(), rc - rr, rc, rr]))
            optimizer_step([(opt, model)], cfg, scaler, "DPO", step)
            sched.step()
            run.append([loss_sum, *torch.cat(pair_stats, 1).mean(1).tolist()])
            if step % log_every == 0 or step == len(plan):
                mean = [sum(col) / len(run) for col in zip(*run)]
                rec = {"step": step, "epoch": step * cfg.dpo_batch_size / len(train_rows), "train_loss": mean[0],
                       "train_reward_acc": mean[1], "train_margin": mean[2], "chosen_reward": mean[3],
                       "rejected_reward": mean[4], **dpo_pair_stats(model, ref, tok, eval_rows[:200], cfg, device)}
                history.append(rec)
                run = []
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['eval_reward_acc']:.3f}", refresh=False)
    model.eval()
    return history


def exec_rewards(rows, texts) -> list[float]:
    """Verifiable reward: 1 when the answer's result in sqlite equals the gold query's result, else 0."""
    # a row without setup_sql gets 0: the same for its whole group, so GRPO takes no signal from it
    return [float("setup_sql" in r and execution_match(r["setup_sql"], r["chosen"], t))
            for r, t in zip(rows, texts)]


def format_rewards(rows, texts, has_eos) -> list[float]:
    """Format reward: 1 for a single SELECT statement that sqlite runs without error and that ends with EOS."""
    out = []
    for r, t, eos in zip(rows, texts, has_eos):
        ok = (bool(eos) and "setup_sql" in r and t.strip().upper().startswith("SELECT")
              and ";" not in t)
        out.append(float(ok and execute_sql(r["setup_sql"], t) is not None))
    return out


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """GRPO's advantage: each answer's reward minus its group's mean, over the group's std (a group = the
    answers to one prompt); a group whose answers all score the same gives 0, i.e. no signal."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cliprange: float, kl_coef: float):
    """(loss, per-token KL, ratio) of GRPO: PPO's clipped surrogate with one advantage per answer, plus
    kl_coef times the k3 KL to the reference inside the loss; a mean over each answer's tokens, then answers."""
    import torch
    # the log-probs are masked before anything is exponentiated: after the EOS they score pads, and
    # exp(ref - policy) of such a position can overflow to inf, which a mask applied afterwards turns into NaN
    logprobs, old_logprobs, ref_logprobs = logprobs * mask, old_logprobs * mask, ref_logprobs * mask
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]                     # one advantage for every token of an answer
    pg = -torch.min(ratio * a, ratio.clamp(1 - cliprange, 1 + cliprange) * a)
    kl = kl_per_token(logprobs, ref_logprobs, "k3")        # k3 >= 0: a penalty in the loss, not the reward
    loss = masked_mean(pg + kl_coef * kl, mask, dim=1).mean()
    return loss, kl, ratio


def grpo_iteration(actor, ref, rm, opt, tok, rows, cfg: Config, scaler=None) -> dict:
    """One GRPO iteration: sample a group per prompt, reward, group-relative advantages, clipped updates with
    a k3 KL penalty to the reference inside the loss; returns its log record."""
    import torch
    t0 = time.time()
    group = [r for r in rows for _ in range(cfg.grpo_group_size)]      # each prompt repeated G times, adjacent
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
    adv = group_advantages(rewards, cfg.grpo_group_size).to(qr.device)
    t1 = time.time()
    stats = {k: [] for k in ("loss", "kl", "clipfrac")}
    actor.train()
    for epoch in range(cfg.grpo_epochs):
        perm = torch.randperm(len(group))
        for start in range(0, len(group), cfg.grpo_minibatch_size):
            mb = perm[start:start + cfg.grpo_minibatch_size]
            opt.zero_grad(set_to_none=True)
            sums = dict.fromkeys(stats, 0.0)
            for part in micro_batches(mb.tolist(), cfg):
                part = torch.tensor(part)
                m = mask[part]
                logprobs, _ = response_logprobs(actor, qr[part], attn[part], lq, cfg.temperature)
                loss, kl, ratio = grpo_loss(logprobs, old_logprobs[part], ref_logprobs[part], adv[part], m,
                                            cfg.cliprange, cfg.grpo_kl_coef)
                share = len(part) / len(mb)         # answer-means over micro-batches add up to the minibatch's
                check_finite(loss, "GRPO loss", epoch)
                backward(loss * share, scaler)
                sums["loss"] += float(loss.detach()) * share
                sums["kl"] += float(masked_mean(kl.detach(), m, dim=1).mean()) * share
                sums["clipfrac"] += float(masked_mean(((ratio.detach() - 1).abs() > cfg.cliprange).float(), m)) * share
            optimizer_step([(opt, actor)], cfg, scaler, "GRPO", f"epoch {epoch}")
            for k, v in sums.items():
                stats[k].append(v)
    actor.eval()
    zero_std = float((rewards.view(-1, cfg.grpo_group_size).std(1) == 0).float().mean())
    checked = [i for i, r in enumerate(group) if "setup_sql" in r]    # where gold can be judged
    acc, fmt = [acc[i] for i in checked] or [math.nan], [fmt[i] for i in checked] or [math.nan]
    return {"reward": float(rewards.mean()), "gold_acc": sum(acc) / len(acc), "format_rate": sum(fmt) / len(fmt),
            "groups_without_signal": zero_std, "length": float(mask.sum(1).mean()),
            "eos_rate": float(has_eos.float().mean()), **{k: sum(v) / len(v) for k, v in stats.items()},
            "time_generate_score": t1 - t0, "time_train": time.time() - t1, "sample": texts[0]}


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


def train_grpo(cfg: Config, device, rows=None) -> tuple[object, list[dict]]:
    """The GRPO loop from the SFT actor; returns (trained actor, history). Saving is the notebook's job."""
    import torch
    one_process_only("GRPO")
    rows = rows if rows is not None else load_data(cfg, "prompt")
    check_grpo_reward(rows, cfg)                # before anything is loaded: no reward, no learning
    tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
    rows = fit_rows(tok, rows, cfg, (), "GRPO prompts")     # counts (prints) the prompts to be cut
    print(f"GRPO: {len(rows)} prompts, {cfg.grpo_prompts} per iteration")
    actor = add_lora(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
    ref = None if cfg.lora_r > 0 else load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False)
    rm = (load_score_model(_require(cfg.path("critic"), "2_critic.ipynb"), device=device, cfg=cfg)
          if cfg.grpo_rm_weight > 0 else None)
    opt, _ = make_optimizer(actor, cfg.grpo_lr, 1, warmup=0)
    scaler = grad_scaler(cfg, device)
    history = []
    bar = progress(range(cfg.grpo_iterations), desc="GRPO")
    with stop_cleanly("GRPO", cfg, ("grpo_prompts", "grpo_group_size"), lambda: kept_model(cfg.path("grpo")), actor):
        for it in bar:
            set_seed(cfg.seed * 100_003 + it)
            batch = [rows[i] for i in torch.randperm(len(rows))[:cfg.grpo_prompts].tolist()]
            rec = {"iteration": it + 1, **grpo_iteration(actor, ref, rm, opt, tok, batch, cfg, scaler)}
            history.append(rec)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", gold=f"{rec['gold_acc']:.2f}", kl=f"{rec['kl']:.3f}", refresh=False)
    return actor, history


# ============================================================================ evaluation


def evaluate_policy(model, tok, rows, cfg: Config, rm=None, ref=None, desc: str = "eval") -> tuple[dict, list[dict]]:
    """Execution accuracy greedy and sampled (rows with setup_sql), RM score, KL, length, EOS."""
    import torch
    prompts = [r["prompt"] for r in rows]
    greedy = sample_answers(model, tok, prompts, cfg, greedy=True, desc=f"{desc} greedy")
    per_row = []
    bs = cfg.eval_batch_size
    with stop_cleanly(desc, cfg, ("eval_batch_size",)):
        for i in progress(range(0, len(rows), bs), desc=f"{desc} sampled", leave=False):
            part = rows[i:i + bs]
            qr, pmask, lq = generate(model, tok, [r["prompt"] for r in part], cfg)
            resp = qr[:, lq:]
            mask = response_mask(resp, tok.eos_token_id)
            _, has_eos = first_eos_index(resp, tok.eos_token_id)
            attn = torch.cat([pmask, mask], 1)
            with torch.no_grad():
                kl = torch.zeros(len(part))
                if ref is not None:            # KL(policy || ref) estimated on the policy's own samples (k1, summed)
                    lp, _ = response_logprobs(model, qr, attn, lq, cfg.temperature)
                    rlp, _ = response_logprobs(ref, qr, attn, lq, cfg.temperature)
                    kl = ((lp - rlp) * mask).sum(1).cpu()
                score = reward_scores(rm, qr, attn).cpu() if rm is not None else torch.full((len(part),), float("nan"))
            for j, (r, text) in enumerate(zip(part, decode_responses(tok, resp))):
                # the gold metric needs the row's tables and gold SQL: else None, not a guess
                judged = "setup_sql" in r and isinstance(r.get("chosen"), str)

                def ok(answer):
                    return execution_match(r["setup_sql"], r["chosen"], answer) if judged else None
                per_row.append({"prompt": r["prompt"], "family": r.get("family", "?"),
                                "gold": (r.get("chosen") or "").strip(),
                                "greedy": greedy[i + j].strip(), "sampled": text.strip(),
                                "greedy_ok": ok(greedy[i + j]), "sampled_ok": ok(text),
                                "rm_score": float(score[j]), "kl": float(kl[j]), "length": int(mask[j].sum()),
                                "eos": bool(has_eos[j])})
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
        print(f"{desc}: execution accuracy on {len(judged)} of {n} prompts (others lack setup_sql)")
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


def write_json(obj, path) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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
            leakage[kind] = report_leakage(load_data(cfg, kind), evalset, DATA_SOURCES[kind][3])
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
        free_memory()                       # one evaluated model on the GPU at a time
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
              "models": results, "per_family": {n: per_family_accuracy(r) for n, r in rows.items()},
              "data": {"eval": data_source(cfg, "eval"), "leaked_eval_prompts": leakage},
              "not_measured": not_measured}
    write_json(report, cfg.path("report.json"))
    return report, rows


def _json_safe(x):
    """A copy every JSON reader accepts: NaN and inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_run_record(cfg: Config, stage: str, history: list[dict], data: dict | None = None):
    """logs/<stage>.jsonl (the history), <stage>_config.json (the config), <stage>_data.json."""
    logs = cfg.path("logs")
    logs.mkdir(parents=True, exist_ok=True)
    tmp = logs / f"{stage}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(_json_safe(rec)) + "\n" for rec in history))
    os.replace(tmp, logs / f"{stage}.jsonl")
    # the config loads back as it is: `python util.py <stage> --config logs/<stage>_config.json`
    write_json(dataclasses.asdict(cfg), logs / f"{stage}_config.json")
    if data is not None:
        write_json(_json_safe(data), logs / f"{stage}_data.json")
    return logs


# ============================================================================ plotting


def plot_history(history: list[dict], x: str, panels: list[list[str]], title: str = "", path=None):
    """One small plot per panel (several series per panel) of a training history."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for k in keys:
            pts = [(h[x], h[k]) for h in history if h.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
        ax.set_xlabel(x)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig



def show_source(fn) -> None:
    """Show a function's source as it runs: a highlighted code block in a notebook, plain text elsewhere."""
    import inspect
    src = inspect.getsource(fn)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:     # a notebook kernel (or IPython shell)
        display(Markdown(f"```python\n{src}```"))
    else:
        print(src)

# ============================================================================ CLI

STAGES = {"sft": "actor", "rm": "critic", "ppo": "rlhf", "dpo": "dpo", "grpo": "grpo"}
# the kind of data (DATA_SOURCES) each stage trains on
STAGE_DATA = {"sft": "sft", "rm": "pref", "ppo": "prompt", "dpo": "pref", "grpo": "prompt"}


def load_config(path_or_dict=None, preset: str | None = None) -> Config:
    """A Config from a dict or a JSON file of Config fields (its "preset" key picks the preset); unknown keys
    are an error that names them."""
    fields = dict(path_or_dict) if isinstance(path_or_dict, dict) else {}
    if isinstance(path_or_dict, (str, Path)):
        try:
            fields = json.loads(Path(path_or_dict).read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path_or_dict}: line {e.lineno}: not valid JSON ({e.msg})") from None
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path_or_dict}: unknown config field(s) {unknown}; known fields: {sorted(known)}")
    return get_config(preset or fields.pop("preset", None), **{k: v for k, v in fields.items() if k != "preset"})


def run_stage(stage: str, cfg: Config) -> dict:
    """One stage without its notebook: train, save, leave its record in logs/; its last metrics."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {sorted(STAGES)}")
    check_config(cfg)                       # again: a field may have been set after it was made
    device = accelerator().device
    set_seed(cfg.seed)
    kind = STAGE_DATA[stage]
    train = load_data(cfg, kind)
    evalset = load_data(cfg, "eval")
    data = {kind: train.info, "eval": evalset.info,
            "leaked_eval_prompts": report_leakage(train, evalset, DATA_SOURCES[kind][3])}
    t0 = time.time()
    if stage == "ppo":
        history = train_ppo(cfg, device, train)
    elif stage == "sft":
        if not (cfg.path("base_actor") / "config.json").exists() and accelerator().is_main_process:
            prepare_base_models(cfg)
        accelerator().wait_for_everyone()
        tok = load_tokenizer(cfg.path("base_actor"))
        model = load_causal_lm(cfg.path("base_actor"), "0_download.ipynb", device, cfg)
        history = train_sft(model, tok, train, evalset, cfg, device)
    elif stage == "rm":
        tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
        model = load_score_model(cfg.path("base_critic") if cfg.critic_hub else cfg.path("actor"), "1_actor.ipynb",
                                 device, cfg)
        history = train_reward(model, tok, train, evalset, cfg, device)
        prompts = [r["prompt"] for r in train[:256]]
        answers = sample_answers(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), tok, prompts, cfg)
        history[-1]["reward_offset"] = set_reward_offset(model, tok, prompts, answers, cfg, device)
    elif stage == "dpo":
        tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
        model = add_lora(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
        ref = None if cfg.lora_r else load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False)
        history = train_dpo(model, ref, tok, train, evalset, cfg, device)
    else:
        tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
        model, history = train_grpo(cfg, device, train)
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


def main(argv=None) -> int:
    """`python util.py make-dataset | make-tokenizer | stats`, a stage without its notebook or the
    report: `python util.py sft|rm|ppo|dpo|grpo|report [--config file.json] [--preset NAME]`."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("command",
                    choices=["make-dataset", "make-tokenizer", "stats", *STAGES, "report"])
    ap.add_argument("--config", help="JSON file of Config fields (see util.Config), e.g. {\"preset\": \"smoke\", \"lora_r\": 8}")
    ap.add_argument("--preset", help="preset to start from (overrides the file's); default RLHF_PRESET or auto")
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
    elif args.command == "make-dataset":
        print(write_dataset())
    elif args.command == "make-tokenizer":
        tok = train_tokenizer(load_rows(ROOT / "dataset" / "train.json"))
        print(f"tokenizer with {len(tok)} tokens written to {ROOT / 'tokenizer'}")
    else:
        for split in ("train", "eval"):
            print(split, json.dumps(dataset_stats(load_rows(ROOT / "dataset" / f"{split}.json"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
