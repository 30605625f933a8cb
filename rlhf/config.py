"""Config: every knob of the pipeline, the presets (smoke, tiny, opt) that fill it, the ways to
make one (get_config, load_config; RLHF_PRESET, RLHF_CONFIG, RLHF_OUT, RLHF_SEED), and
Config.precision made concrete for a device (resolve_precision). util re-exports these;
util.Config is this Config."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .checks import CONFIG_CHOICES, ConfigError, DataError, check_config
from .runtime import ROOT, hub_reachable


# ============================================================================ config / presets


@dataclasses.dataclass
class Config:
    """Every knob of the pipeline; a preset fills it, a notebook or env var may override fields."""
    preset: str = "tiny"
    seed: int = 0
    # precision and memory: the weights and optimizer states stay fp32 whatever dtype a checkpoint
    # is stored in
    # auto = bf16 on a GPU that has it, fp16 on older CUDA, else fp32
    precision: str = "auto"
    # > 0: each optimizer batch runs in micro-batches of this size
    micro_batch_size: int = 0
    # recompute activations in the backward pass: less memory, slower
    gradient_checkpointing: bool = False
    data_dir: str = str(ROOT / "dataset")
    # data sources, "" = the shipped files (<data_dir>/train.json, eval.json). A source is a file
    # (.json, .jsonl, .parquet; .txt = one prompt a line, for prompt_data and eval_data) or a hub
    # dataset id ("hf:owner/name", or "owner/name" when no such file exists; ":split" after it)
    sft_data: str = ""                          # demonstrations: prompt + response (or chosen)
    pref_data: str = ""                         # pairs (prompt, chosen, rejected): RM and DPO
    prompt_data: str = ""                       # prompts for PPO and GRPO
    eval_data: str = ""                         # held-out rows: curves in training, the report
    columns: dict = dataclasses.field(default_factory=dict)   # {our field: the source's column}
    # share of the training prompts held out of every stage (chosen by a hash of the prompt): the
    # validation split. The reward scale and any choice of a setting are made on it, never on the
    # evaluation rows, which are the test set
    val_fraction: float = 0.05
    out_dir: str = str(ROOT / "model")          # RLHF_OUT moves it (tests use a temp dir)
    tokenizer_dir: str = str(ROOT / "tokenizer")
    # models: tiny = a small OPT trained from scratch; opt = hub checkpoints (or local dirs laid out
    # like them)
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
    # rejected answers per prompt: the row's own, then its more_rejected
    rm_max_rejected: int = 1
    # the reward PPO sees: (score - mean) / std of the SFT policy's answers to validation prompts,
    # then clipped to +- reward_clip, so one outlier answer cannot dominate a batch
    reward_clip: float = 5.0
    # reward models PPO averages, an ensemble: 1 = critic/ alone; N adds critic_2/ ... critic_N/,
    # each trained as the first from another seed (its head, its batch order) and on its own fixed
    # scale, so an answer that one RM wrongly likes earns less when the others disagree
    rm_ensemble: int = 1
    # the ensemble's reward: mean - ensemble_penalty * std over its models (0 = the plain mean)
    ensemble_penalty: float = 0.0
    # PPO
    ppo_iterations: int = 60
    rollout_batch_size: int = 64
    ppo_minibatch_size: int = 16
    ppo_epochs: int = 4
    ppo_lr: float = 3e-5
    ppo_vf_lr: float = 1e-4
    ppo_anneal_lr: bool = True                  # both learning rates fall linearly to 0 by the end
    # rollouts and sampled evaluation use the same temperature
    temperature: float = 0.7
    # the KL penalty's start (and its value with no target), on the reward's fixed scale (SFT
    # answers 0 +- 1): 0.05 nat of penalty costs as much as 0.05 std of reward
    kl_coef: float = 0.05
    kl_estimator: str = "k1"                    # "k1" (log-ratio) or "k3" (unbiased, always >= 0)
    # the adaptive KL controller (Ziegler et al. 2019) steers kl_coef so the rollouts' KL to SFT
    # (nats per answer) nears kl_target; 0 = a fixed kl_coef. 0.8: the KL this run length
    # reaches, so a target the controller can hold; targets 0.5 to 2 score alike on the
    # validation split (docs/kl_sweep.json), while the gold accuracy falls once the KL runs far
    kl_target: float = 0.8
    # episodes over which the controller corrects an error (Ziegler et al.: 10,000 for long runs):
    # a sixth of the 3,840-episode run, so kl_coef can move up to 2 % per iteration
    kl_horizon: int = 640
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    missing_eos_penalty: float = 1.0
    # True: the per-token rewards (RM score on the EOS and the KL penalty) scaled to unit spread
    # over the batch's answer tokens, their mean kept, as TRL's whiten_rewards
    whiten_rewards: bool = False
    save_every: int = 20
    # DPO: offline, on the preference pairs, against the frozen SFT model
    dpo_epochs: float = 1.0
    dpo_batch_size: int = 32
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    # "ipo" (Azar et al. 2023) or "sigmoid" (DPO). IPO pulls each pair's log-ratio gap to
    # 1/(2 beta) instead of pushing it up forever, which here lets plain DPO drift 7-8 nats from
    # SFT and lose question families; IPO keeps every family within 0.05 of SFT on the
    # validation split over 3 seeds (.dev/dpo_sweep.py, docs/dpo_sweep.md)
    dpo_loss: str = "ipo"
    # > 0 adds the SFT loss on the chosen answers (RPO), which holds their probability up
    dpo_sft_weight: float = 0.0
    # GRPO: a group of sampled answers per prompt, advantages relative to the group, no critic
    grpo_iterations: int = 40
    grpo_prompts: int = 16                      # prompts per iteration
    grpo_group_size: int = 8                    # answers sampled per prompt
    grpo_minibatch_size: int = 32
    grpo_epochs: int = 2
    grpo_lr: float = 5e-5
    grpo_kl_coef: float = 0.04
    # weight of the format reward beside execution accuracy
    grpo_format_weight: float = 0.2
    # > 0 adds the reward model's score to the verifiable rewards
    grpo_rm_weight: float = 0.0
    # LoRA (peft) for the actor in PPO, DPO and GRPO: 0 = full fine-tuning
    lora_r: int = 0
    lora_alpha: int = 16
    # evaluation
    eval_batch_size: int = 128

    def __post_init__(self):
        """Every Config is checked when made: get_config, load_config, dataclasses.replace."""
        check_config(self, PRESETS)

    def path(self, *parts) -> Path:
        """A path under the output directory."""
        return Path(self.out_dir, *parts)


PRESETS = {
    # seconds: only checks that every stage runs end to end
    "smoke": dict(d_model=32, n_layers=1, n_heads=2, n_train=64, n_eval=16, sft_epochs=1,
                  sft_batch_size=16, rm_epochs=1, rm_batch_size=16, ppo_iterations=2,
                  rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=2, save_every=1,
                  max_response_tokens=24, eval_batch_size=16, dpo_epochs=1, dpo_batch_size=16,
                  grpo_iterations=2, grpo_prompts=4, grpo_group_size=4, grpo_minibatch_size=8),
    # minutes on a laptop CPU: a small OPT trained from scratch on the shipped data
    "tiny": dict(),
    # a GPU and a reachable hub: real OPT checkpoints, fine-tuned. Micro-batches of 8 keep every
    # stage inside a 16 GB T4 (opt-350m actor + opt-125m critic, fp32 weights and AdamW states)
    # while the global batches stay
    "opt": dict(actor_hub="facebook/opt-350m", critic_hub="facebook/opt-125m", n_layers=0,
                d_model=0,
                max_positions=2048, micro_batch_size=8, eval_batch_size=64,
                # SFT and RM: Simple_RLHF's OPT recipe (actor lr 2e-5, critic lr 1e-5, 1 RM epoch);
                # DeepSpeed-Chat trains OPT SFT at 9.65e-6 and its RMs at 5e-5, so these sit inside
                # the published range
                sft_epochs=2, sft_batch_size=32, sft_lr=2e-5, rm_epochs=1, rm_batch_size=32,
                rm_lr=1e-5,
                # PPO: DeepSpeed-Chat's step 3 uses actor 9.65e-6 / critic 5e-6 for OPT-1.3b / 350m;
                # a 350 M actor with full fine-tuning and 4 PPO epochs per rollout drifts fast, so
                # the actor gets 1e-6 (as summarize_from_feedback_details' 1 B runs use 3e-6) and
                # the critic, a fresh head, 1e-5
                ppo_lr=1e-6, ppo_vf_lr=1e-5,
                # DPO: Rafailov et al. 2023 (sigmoid loss, lr 1e-6, batch 64, beta 0.1), also TRL's
                # DPOConfig default lr; tiny's IPO was chosen on tiny's validation split only
                dpo_loss="sigmoid", dpo_lr=1e-6, dpo_batch_size=64,
                # GRPO: Shao et al. 2024 (DeepSeekMath) lr 1e-6 and KL coefficient 0.04, as TRL's
                # GRPOConfig
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
    """The config of a preset (default_preset() when None), with RLHF_CONFIG (a JSON object of
    fields), RLHF_OUT, RLHF_SEED and explicit overrides applied."""
    preset = preset or default_preset()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    env = {}
    if os.environ.get("RLHF_CONFIG"):               # `make seeds` passes its --set fields so
        try:
            env = json.loads(os.environ["RLHF_CONFIG"])
        except json.JSONDecodeError as e:
            raise ConfigError(f"RLHF_CONFIG is not a JSON object of Config fields: {e}") from None
        if not isinstance(env, dict):
            raise ConfigError(f"RLHF_CONFIG is not a JSON object of Config fields: {env!r}")
        unknown = sorted(set(env) - {f.name for f in dataclasses.fields(Config)})
        if unknown:
            raise ConfigError(f"RLHF_CONFIG: unknown Config field(s) {unknown}")
    fields = {**PRESETS[preset], **env, **overrides}
    if os.environ.get("RLHF_OUT"):
        fields.setdefault("out_dir", os.environ["RLHF_OUT"])
    if os.environ.get("RLHF_SEED"):                 # `make seeds` runs the notebooks with it
        if not os.environ["RLHF_SEED"].isdigit():
            raise ConfigError(f"RLHF_SEED={os.environ['RLHF_SEED']!r}: must be an integer >= 0")
        fields.setdefault("seed", int(os.environ["RLHF_SEED"]))
    # the hub tokenizer is saved here, beside the shipped one
    if preset == "opt":
        fields.setdefault("tokenizer_dir", str(ROOT / "tokenizer" / "opt"))
    return Config(preset=preset, **fields)


def load_config(path_or_dict=None, preset: str | None = None) -> Config:
    """A Config from a dict or a JSON file of Config fields (its "preset" key picks the preset);
    unknown keys are an error that names them."""
    fields = dict(path_or_dict) if isinstance(path_or_dict, dict) else {}
    if isinstance(path_or_dict, (str, Path)):
        try:
            fields = json.loads(Path(path_or_dict).read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path_or_dict}: line {e.lineno}: not valid JSON ({e.msg})") from None
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path_or_dict}: unknown config field(s) {unknown}; known fields: "
                         f"{sorted(known)}")
    return get_config(preset or fields.pop("preset", None),
                      **{k: v for k, v in fields.items() if k != "preset"})


PRECISIONS = CONFIG_CHOICES["precision"]


def resolve_precision(cfg: Config, device) -> str:
    """Config.precision made concrete for a device: auto = bf16 on a GPU that has it (Ampere and
    later), fp16 with loss scaling on an older CUDA GPU (a T4 has no bf16), fp32 on a CPU
    (autocast would only slow it)."""
    import torch
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"Config.precision={cfg.precision!r}: choose one of {PRECISIONS}")
    if cfg.precision != "auto":
        return cfg.precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "fp32"
