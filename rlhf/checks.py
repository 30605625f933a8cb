"""The two errors a user's input raises (ConfigError: a Config field; DataError: a row of a data
file), and the checks of a Config: each field's type, range and name, and the limits fields set
each other. Config.__post_init__ calls check_config, so every Config is checked when made."""
from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
    """A Config field of the wrong type, out of its range or not one of its names."""


class DataError(ValueError):
    """A bad row in a data file; the message names file, line and field."""


# allowed ranges, (text, test); a field not listed takes any value of its type
_POSITIVE, _NON_NEGATIVE = ("> 0", lambda v: v > 0), (">= 0", lambda v: v >= 0)
_AT_LEAST_1, _AT_LEAST_2 = (">= 1", lambda v: v >= 1), (">= 2", lambda v: v >= 2)
_UNIT, _OPEN_UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1), ("in (0, 1)", lambda v: 0 < v < 1)
CONFIG_RANGES = {
    **dict.fromkeys(["seed", "micro_batch_size", "d_model", "n_layers", "n_heads", "n_train",
                     "n_eval", "rm_prefix_weight", "kl_coef", "kl_target", "vf_coef", "reward_clip",
                     "ensemble_penalty", "missing_eos_penalty", "dpo_sft_weight", "grpo_kl_coef",
                     "grpo_format_weight", "grpo_rm_weight", "lora_r"], _NON_NEGATIVE),
    **dict.fromkeys(["sft_epochs", "rm_epochs", "dpo_epochs", "sft_lr", "rm_lr", "ppo_lr",
                     "ppo_vf_lr", "dpo_lr", "grpo_lr", "temperature", "cliprange_value",
                     "max_grad_norm", "dpo_beta"], _POSITIVE),
    **dict.fromkeys(["max_positions", "max_prompt_tokens", "max_response_tokens",
                     "sft_batch_size", "rm_batch_size", "rm_max_rejected", "ppo_iterations",
                     "rollout_batch_size", "ppo_minibatch_size", "ppo_epochs", "save_every",
                     "kl_horizon", "rm_ensemble", "dpo_batch_size", "grpo_iterations",
                     "grpo_prompts", "grpo_minibatch_size",
                     "grpo_epochs", "lora_alpha", "eval_batch_size"], _AT_LEAST_1),
    "gamma": _UNIT, "lam": _UNIT,
    "val_fraction": ("in [0, 0.5]", lambda v: 0 <= v <= 0.5),
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


def check_config(cfg, presets) -> object:
    """Check each field's type, range and name, and the limits fields set each other."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, problem = _field_problem(f.name, str(f.type), getattr(cfg, f.name))
        if problem:
            problems.append(f"Config.{f.name}={getattr(cfg, f.name)!r}: {problem}")
        else:
            object.__setattr__(cfg, f.name, value)
    if not problems:                            # relations, once each field is right on its own
        if cfg.preset not in presets:
            problems.append(f"Config.preset={cfg.preset!r}: choose one of {sorted(presets)}")
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
