"""One stage without its notebook: what `python util.py sft|rm|ppo|dpo|grpo` runs (the command
line itself: cli.py). A stage is trained from the models before it, saved and logged in logs/.
util re-exports these names.

The training loops live in util, which imports this module: they are imported inside the
functions here, when they run."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from config_checks import check_config
from data_files import DATA_SOURCES, load_data, report_leakage, validation_prompts
from model_files import (_require, load_causal_lm, load_score_model, load_tokenizer,
                         prepare_base_models)
from runtime import accelerator, set_seed, unwrap
from saving import save_model, write_json, write_run_record

if TYPE_CHECKING:
    from util import Config


# the folder under out_dir each stage writes
STAGES = {"sft": "actor", "rm": "critic", "ppo": "rlhf", "dpo": "dpo", "grpo": "grpo"}
# the kind of data (DATA_SOURCES) each stage trains on
STAGE_DATA = {"sft": "sft", "rm": "pref", "ppo": "prompt", "dpo": "pref", "grpo": "prompt"}


def train_stage(stage: str, cfg: Config, device, train, evalset) -> tuple:
    """(model, tokenizer, history) of one stage trained from the models before it; PPO saves its own
    checkpoints and returns (None, None, history)."""
    from util import (add_lora, sample_answers, set_reward_scale, train_dpo, train_grpo,
                      train_more_reward_models, train_ppo, train_reward, train_sft)
    if stage == "ppo":
        return None, None, train_ppo(cfg, device, train)
    if stage == "sft":
        if not (cfg.path("base_actor") / "config.json").exists() and accelerator().is_main_process:
            prepare_base_models(cfg)
        accelerator().wait_for_everyone()
        tok = load_tokenizer(cfg.path("base_actor"))
        model = load_causal_lm(cfg.path("base_actor"), "0_download.ipynb", device, cfg)
        return model, tok, train_sft(model, tok, train, evalset, cfg, device)
    tok = load_tokenizer(_require(cfg.path("actor"), "1_actor.ipynb"))
    if stage == "rm":
        model = load_score_model(cfg.path("base_critic") if cfg.critic_hub else cfg.path("actor"),
                                 "1_actor.ipynb", device, cfg)
        history = train_reward(model, tok, train, evalset, cfg, device)
        prompts = validation_prompts(cfg)
        sft = load_causal_lm(cfg.path("actor"), device=device, cfg=cfg)
        answers = sample_answers(sft, tok, prompts, cfg)
        history[-1].update(set_reward_scale(model, tok, prompts, answers, cfg, device))
        if cfg.rm_ensemble > 1:             # critic_2/ ... critic_N/
            history[-1]["ensemble"] = train_more_reward_models(cfg, tok, train, evalset, prompts,
                                                               answers, device)
        return model, tok, history
    if stage == "dpo":
        model = add_lora(load_causal_lm(cfg.path("actor"), device=device, cfg=cfg), cfg)
        ref = (None if cfg.lora_r else
               load_causal_lm(cfg.path("actor"), device=device, cfg=cfg).requires_grad_(False))
        # its curves on the validation split: eval.json is the test set, never a training signal
        val = load_data(cfg, "pref", split="val")
        return model, tok, train_dpo(model, ref, tok, train, val, cfg, device)
    model, history = train_grpo(cfg, device, train)
    return model, tok, history


def run_stage(stage: str, cfg: Config) -> dict:
    """One stage without its notebook: train, save, leave its record in logs/; its last metrics."""
    from util import PRESETS
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {sorted(STAGES)}")
    check_config(cfg, PRESETS)              # again: a field may have been set after it was made
    device = accelerator().device
    set_seed(cfg.seed)
    kind = STAGE_DATA[stage]
    train = load_data(cfg, kind)
    evalset = load_data(cfg, "eval")
    data = {kind: train.info, "eval": evalset.info,
            "leaked_eval_prompts": report_leakage(train, evalset, DATA_SOURCES[kind][3])}
    t0 = time.time()
    model, tok, history = train_stage(stage, cfg, device, train, evalset)
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
