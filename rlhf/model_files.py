"""Models and the tokenizer on disk: built here (the tiny OPT, the BPE tokenizer), downloaded (hub
checkpoints, saved locally in fp32), loaded ready to train (dropout off, fp32 weights, forwards in
the config's precision), and checked against each other. util re-exports these names."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import resolve_precision
from .runtime import ROOT, hub_reachable, quiet_hf, set_seed
from .saving import recover_dir, save_model

if TYPE_CHECKING:
    from .config import Config


# which notebook writes each folder under out_dir: a missing folder names the notebook to run first
MADE_BY = {"base_actor": "0_download.ipynb", "base_critic": "0_download.ipynb",
           "actor": "1_actor.ipynb", "critic": "2_critic.ipynb", "rlhf": "3_rlhf.ipynb"}


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>"}


def train_tokenizer(rows: list[dict], out_dir=ROOT / "tokenizer", vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on the dataset's text; every digit is its own token (so
    any number can be copied digit by digit), and pad is its own token, distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected", "response")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path):
    """AutoTokenizer from a directory (ours, or a hub model's saved copy)."""
    from transformers import AutoTokenizer
    recover_dir(path)
    if not Path(path, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer in {path}: "
                                f"run {MADE_BY.get(Path(path).name, '0_download.ipynb')} first")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ValueError(f"tokenizer in {path} needs a pad token distinct from EOS "
                         f"(pad={tok.pad_token!r})")
    return tok


def check_tokenizer_matches(tok, model, cfg: Config | None = None) -> None:
    """Raise a clear error when a tokenizer and a model do not belong together (or the lengths do
    not fit)."""
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > emb:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's embedding has {emb}: "
                         "they come from different runs; re-run 0_download.ipynb")
    for name in ("pad_token_id", "eos_token_id"):
        m, t = getattr(model.config, name, None), getattr(tok, name)
        if m is not None and m != t:
            raise ValueError(f"{name}: tokenizer says {t}, model config says {m}; "
                             "re-run 0_download.ipynb")
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if cfg is not None and n_pos and cfg.max_prompt_tokens + cfg.max_response_tokens > n_pos:
        raise ValueError("max_prompt_tokens + max_response_tokens = "
                         f"{cfg.max_prompt_tokens + cfg.max_response_tokens} "
                         f"but the model has {n_pos} positions: "
                         "lower them (or max_positions before 0_download)")


def tiny_opt_config(cfg: Config, tok):
    """An OPTConfig sized by the preset; dropout off (RL needs identical forward passes)."""
    from transformers import OPTConfig
    return OPTConfig(vocab_size=len(tok), hidden_size=cfg.d_model, word_embed_proj_dim=cfg.d_model,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     ffn_dim=4 * cfg.d_model,
                     max_position_embeddings=cfg.max_positions, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, layerdrop=0.0, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


DROPOUT_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "layerdrop")


def disable_dropout(model):
    """Dropout off for real, so train-mode and eval-mode forwards agree (PPO's first ratio is
    exactly 1)."""
    import torch
    # hub OPT checkpoints ship dropout 0.1: OPT layers call F.dropout(p=self.dropout) with rates
    # copied from the config into plain float attributes, which no nn.Dropout module holds; so zero
    # the config, the attributes and the modules (the saved config then says 0 too, for whoever
    # loads it next)
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


# ---------------------------------------------------------------------------- transformers versions
# The one place that knows transformers moves: Colab ships 5.15, the registry 5.25. In 5.24 the KV
# cache `past_key_values` became `cache` and gradient checkpointing became "activation
# checkpointing"; the old names still work there with a deprecation warning (until 5.40). We look
# for the feature, not the version number: the new name where the model has it, else the old one,
# so neither end warns or breaks.


def checkpointing_enable(model):
    """Turn on gradient (activation) checkpointing, non-reentrant, under the name this version
    uses."""
    kwargs = {"use_reentrant": False}         # non-reentrant: works with frozen inputs and autocast
    if hasattr(type(model), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on, under the name this version uses."""
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(model.is_activation_checkpointing if new else model.is_gradient_checkpointing)


def cache_kwarg(model) -> str:
    """The forward's keyword for a KV cache: `cache` from transformers 5.24, `past_key_values`
    before."""
    import inspect
    params = inspect.signature(type(model).forward).parameters   # the class's: ours wraps forward
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a forward with use_cache=True returned (`out.cache`, or `past_key_values`
    before)."""
    cache = out.get("cache")                 # a ModelOutput is a dict of the fields that are set
    return cache if cache is not None else out["past_key_values"]


def run_in_precision(model, precision: str):
    """Every forward of `model` (training, generation, scoring) runs under autocast in `precision`,
    while its weights stay fp32: the master copy the optimizer updates (fp16 weights would lose
    small updates)."""
    import types
    import torch
    if precision == "fp32":
        return model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device_type = next(model.parameters()).device.type

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return type(self).forward(self, *args, **kwargs)
    # a bound method: deepcopy rebinds it to the copy
    model.forward = types.MethodType(forward, model)
    return model


def ready_model(model, cfg: Config | None, device):
    """A loaded model made ready to train or score: dropout off, on the device, gradient
    checkpointing if the config asks, forwards in the config's precision (fp32 without a config)."""
    model = disable_dropout(model).to(device or "cpu")
    if cfg is None:
        return model
    if cfg.gradient_checkpointing:
        checkpointing_enable(model)
    return run_in_precision(model, resolve_precision(cfg, next(model.parameters()).device))


def _require(path, stage: str | None = None) -> Path:
    """The path, or a clear error saying which notebook makes it (by default the one that writes
    that folder)."""
    path = Path(path)
    # a save cut between its two renames left the complete copy in .old
    recover_dir(path)
    stage = stage or MADE_BY.get(path.name, "the notebook that writes it")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no model: run {stage} first")
    # we never unpickle a .bin: it could run arbitrary code
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has a config but no .safetensors weights: "
                                f"run {stage} again")
    return path


def load_causal_lm(path, stage: str | None = None, device=None, cfg: Config | None = None):
    """A causal LM from a save_pretrained directory (safetensors only) in fp32, made ready by
    ready_model."""
    import torch
    from transformers import AutoModelForCausalLM
    quiet_hf()
    # fp32 whatever the checkpoint holds: transformers 5 keeps a hub checkpoint's float16, and AdamW
    # on fp16 weights turns them into NaN within a step
    model = AutoModelForCausalLM.from_pretrained(_require(path, stage), use_safetensors=True,
                                                 dtype=torch.float32)
    return ready_model(model, cfg, device)


def load_score_model(path, stage: str | None = None, device=None, cfg: Config | None = None):
    """A backbone + scalar head (AutoModelForSequenceClassification, num_labels=1) in fp32, made
    ready."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    quiet_hf()
    level = hf_logging.get_verbosity()
    # a fresh head on a causal-LM checkpoint is expected, not a warning
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            _require(path, stage), num_labels=1, use_safetensors=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    model.config.pad_token_id = (model.config.pad_token_id
                                 if model.config.pad_token_id is not None else 1)
    return ready_model(model, cfg, device)


def prepare_base_models(cfg: Config) -> dict:
    """model/base_actor (and base_critic for opt): a fresh tiny OPT, or hub checkpoints saved
    locally (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTForCausalLM
    out = {}
    if not cfg.actor_hub:                   # tiny / smoke: built here, trained from scratch
        tok = load_tokenizer(cfg.tokenizer_dir)
        set_seed(cfg.seed)
        model = OPTForCausalLM(tiny_opt_config(cfg, tok))
        out["base_actor"] = save_model(model, tok, cfg.path("base_actor"))
        return out
    local = Path(cfg.actor_hub).is_dir()
    if not local and not hub_reachable():
        raise ConnectionError(f"the model hub is unreachable, so {cfg.actor_hub} "
                              "cannot be downloaded: "
                              "use RLHF_PRESET=tiny (trains a small OPT here), "
                              "or set actor_hub/critic_hub to local dirs")
    for key, name in (("base_actor", cfg.actor_hub), ("base_critic", cfg.critic_hub)):
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load model {name!r}: "
                          "check the name (e.g. facebook/opt-350m) or the path") from e
        if key == "base_actor":
            tok.save_pretrained(cfg.tokenizer_dir)
        out[key] = save_model(disable_dropout(model), tok, cfg.path(key))
    return out
