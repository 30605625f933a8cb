"""Files written so that a crash or a kill never leaves half of one: atomic model saves (a temp dir
swapped in), JSON writes, the run record in logs/, and PPO's checkpoint (weights, optimizer states,
the settings and inputs it resumes across). util re-exports these names."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .runtime import quiet_hf

if TYPE_CHECKING:
    from .config import Config


def save_model(model, tok, path, metrics: dict | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + metrics.json into a temp dir, then swap it in
    atomically."""
    quiet_hf()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # LoRA: save merged weights, so a plain from_pretrained loads them
    if hasattr(model, "merge_and_unload"):
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
    """Replace directory `path` by `tmp`; at every instant either the old or the new one is
    complete."""
    old = path.with_name(path.name + ".old")
    # else the rmtree below could delete the only complete copy
    recover_dir(path)
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


def write_jsonl(rows: list[dict], path) -> None:
    """Write JSON lines atomically (tmp file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(obj, path) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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

# ---------------------------------------------------------------------------- PPO checkpoint files


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
    dirs = ["actor", "critic", *(f"critic_{k}" for k in range(2, cfg.rm_ensemble + 1))]
    files = sorted(p for d in dirs for p in cfg.path(d).glob("*.safetensors"))
    return [[p.parent.name, p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def prompts_digest(rows) -> str:
    """A short hash of the PPO prompts, in order: a checkpoint made on other prompts is stale."""
    import hashlib
    return hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest()[:16]


# Config fields a PPO checkpoint resumes across, as they do not change what PPO computes: where
# files go, how often it saves, the memory layout (micro-batches, gradient checkpointing: the same
# sums), evaluation, and the other stages' knobs (they reach PPO through the SFT and RM weights,
# which inputs_fingerprint checks). Not ppo_iterations: the learning rate anneals over the run
PPO_RESUME_IGNORES = ("out_dir", "data_dir", "tokenizer_dir", "save_every", "micro_batch_size",
                      "gradient_checkpointing", "n_eval", "eval_batch_size")
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
