"""The `opt` preset's real code path, on OPT snapshots stored the way the hub stores facebook/opt-350m and
opt-125m: float16 weights and `dtype: float16` in config.json, dropout 0.1, the shipped tokenizer saved beside
them; only the dimensions are small. A fixture kinder than that (fp32, dropout 0) hid two bugs before: AdamW
turned fp16 weights into NaN at the first step, and dropout made PPO's first ratio differ from 1."""
import json

import pytest
import torch

import util

# opt-350m projects its 1024-wide layers to 512-wide embeddings and normalises after each block; opt-125m does not
SHAPES = {"actor": dict(hidden_size=48, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=96, do_layer_norm_before=False),
          "critic": dict(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1, num_attention_heads=4,
                         ffn_dim=64, do_layer_norm_before=True)}


@pytest.fixture(scope="module")
def hub(tok, tmp_path_factory):
    """Two local snapshots laid out like the hub's: float16 safetensors, dropout 0.1, tokenizer inside."""
    from safetensors import safe_open
    from transformers import OPTConfig, OPTForCausalLM
    root = tmp_path_factory.mktemp("hub")
    for seed, (name, shape) in enumerate(SHAPES.items()):
        conf = OPTConfig(vocab_size=len(tok), max_position_embeddings=256, dropout=0.1, attention_dropout=0.0,
                         activation_dropout=0.0, layerdrop=0.0, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="float16", **shape)
        torch.manual_seed(seed)
        OPTForCausalLM(conf).to(torch.float16).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        stored = json.loads((root / name / "config.json").read_text())
        assert stored["dropout"] == 0.1 and "float16" in (stored.get("dtype"), stored.get("torch_dtype"))
        with safe_open(str(root / name / "model.safetensors"), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    return root


def opt_config(hub, out, **overrides):
    """The opt preset pointed at the local snapshots; only the data sizes and step counts are cut."""
    return util.get_config("opt", actor_hub=str(hub / "actor"), critic_hub=str(hub / "critic"), out_dir=str(out),
                           tokenizer_dir=str(out / "tokenizer"), n_train=96, n_eval=16, **overrides)


def test_hub_snapshot_loads_in_fp32_with_dropout_off(hub, tmp_path):
    from transformers import AutoModelForCausalLM
    ids = torch.randint(4, 200, (2, 12))
    # the hazard is real: loaded plainly, the snapshot is float16 and two train-mode forwards disagree
    plain = AutoModelForCausalLM.from_pretrained(hub / "actor").train()
    assert next(plain.parameters()).dtype == torch.float16
    assert (plain(ids).logits - plain(ids).logits).abs().max() > 0
    cfg = opt_config(hub, tmp_path)
    for load in (util.load_causal_lm, util.load_score_model):
        model = load(hub / "actor", cfg=cfg).train()
        assert {p.dtype for p in model.parameters()} == {torch.float32}      # fp32 master weights
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits)        # train mode: identical forwards
            train_mode = model(ids).logits
            assert torch.equal(train_mode, model.eval()(ids).logits)        # and equal to eval mode
        assert model.config.dropout == 0.0 and model.config.attention_dropout == 0.0


def test_opt_preset_runs_every_stage_on_hub_snapshots(hub, tmp_path):
    """SFT, RM, PPO, DPO, GRPO and the evaluation, a few steps each, through util.run_stage as the CLI runs them."""
    cfg = opt_config(hub, tmp_path, sft_lr=1e-3, sft_epochs=4, rm_epochs=2, ppo_iterations=2, grpo_iterations=2,
                     rollout_batch_size=32, grpo_prompts=8)
    assert (cfg.micro_batch_size, cfg.sft_batch_size) == (8, 32)        # the preset accumulates 4 micro-batches
    sft = json.loads((util.run_stage("sft", cfg) and cfg.path("actor", "metrics.json")).read_text())["history"]
    losses = [h["eval_loss"] for h in sft]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0] - 0.03, losses
    saved = json.loads(cfg.path("actor", "config.json").read_text())
    assert saved["dropout"] == 0.0 and saved.get("dtype", saved.get("torch_dtype")) == "float32"
    rm = util.run_stage("rm", cfg)
    assert all(torch.isfinite(torch.tensor([rm["train_loss"], rm["reward_offset"]])))
    ppo = util.run_stage("ppo", cfg)
    history = json.loads(cfg.path("rlhf", "metrics.json").read_text())
    assert len(history) == 2 and all(h["ratio_first_minibatch_max_dev"] < 1e-6 for h in history)
    assert all(torch.isfinite(torch.tensor([h[k] for h in history for k in ("pg_loss", "vf_loss", "kl")])))
    assert ppo["iteration"] == 2
    dpo = util.run_stage("dpo", cfg)
    assert torch.isfinite(torch.tensor(dpo["train_loss"]))
    grpo = util.run_stage("grpo", cfg)
    assert torch.isfinite(torch.tensor([grpo["loss"], grpo["kl"]])).all()
    tok = util.load_tokenizer(cfg.path("actor"))
    model = util.load_causal_lm(cfg.path("grpo"), cfg=cfg)
    summary, _ = util.evaluate_policy(model, tok, util.load_rows(util.ROOT / "dataset" / "eval.json", limit=8), cfg,
                                      rm=util.load_score_model(cfg.path("critic"), cfg=cfg),
                                      ref=util.load_causal_lm(cfg.path("actor"), cfg=cfg))
    assert summary["n_prompts"] == 8 and summary["kl_to_sft"] == summary["kl_to_sft"]   # not NaN


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_weights_and_trains(hub, tmp_path, precision):
    """bf16 autocast, and fp16 autocast with loss scaling, as a GPU runs them (on the CPU here)."""
    cfg = opt_config(hub, tmp_path, precision=precision, sft_epochs=1, sft_lr=1e-3, rm_epochs=0.5,
                     ppo_iterations=1, rollout_batch_size=16, ppo_epochs=1)
    util.run_stage("sft", cfg)
    model = util.load_causal_lm(cfg.path("actor"), cfg=cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.randint(4, 200, (2, 12))
    assert model(ids).logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]   # autocast on
    assert (util.grad_scaler(cfg, "cpu") is not None) == (precision == "fp16")
    history = json.loads((cfg.path("actor", "metrics.json")).read_text())["history"]
    assert all(torch.isfinite(torch.tensor([h["train_loss"] for h in history])))
    util.run_stage("rm", cfg)
    util.run_stage("ppo", cfg)
    ppo = json.loads(cfg.path("rlhf", "metrics.json").read_text())[0]
    assert torch.isfinite(torch.tensor([ppo["pg_loss"], ppo["vf_loss"]])).all()


def test_precision_auto_and_errors():
    cfg = util.get_config("smoke")
    assert util.resolve_precision(cfg, "cpu") == "fp32"
    with pytest.raises(ValueError, match="Config.precision='half'"):
        util.resolve_precision(util.get_config("smoke", precision="half"), "cpu")


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_micro_batches_and_checkpointing_give_the_whole_batch_loss(micro_dirs, tmp_path, rows, stage):
    """Gradient accumulation and gradient checkpointing change memory, not the arithmetic: the same logged
    losses with micro-batches of 5 (uneven parts), and with activations recomputed (the RM then reads each prompt
    with each answer instead of from a cache), as in one piece. A part weighted by its row count instead of its
    token count, or summed instead of averaged, changes the loss."""
    import shutil
    shutil.copytree(micro_dirs.path("actor"), tmp_path / "actor")
    tok = util.load_tokenizer(tmp_path / "actor")
    out = {}
    for micro, ckpt in ((0, False), (5, False), (0, True)):
        cfg = util.get_config("smoke", out_dir=str(tmp_path), micro_batch_size=micro, gradient_checkpointing=ckpt,
                              sft_batch_size=16,
                              rm_batch_size=16, dpo_batch_size=16, sft_epochs=0.7, rm_epochs=0.7, dpo_epochs=0.7,
                              rm_max_rejected=3, rm_prefix_weight=0.0)   # the prefix term: see reward_loss
        if stage == "sft":
            model = util.load_causal_lm(tmp_path / "actor", cfg=cfg)
            out[micro, ckpt] = util.train_sft(model, tok, rows, rows[:8], cfg, "cpu")
        elif stage == "rm":
            model = util.load_score_model(tmp_path / "actor", cfg=cfg)
            torch.manual_seed(0)
            model.score.reset_parameters()
            out[micro, ckpt] = util.train_reward(model, tok, rows, rows[:8], cfg, "cpu")
        else:
            model = util.load_causal_lm(tmp_path / "actor", cfg=cfg)
            ref = util.load_causal_lm(tmp_path / "actor", cfg=cfg).requires_grad_(False)
            # no sampled curve: its samples depend on the random state, not on the arithmetic
            out[micro, ckpt] = util.train_dpo(model, ref, tok, rows, rows[:8], cfg, "cpu", n_sampled=0)
        assert util.is_checkpointing(model) == ckpt
    assert len(out[0, False]) >= 2
    for other in ((5, False), (0, True)):
        for a, b in zip(out[0, False], out[other]):
            for k, v in a.items():
                # a log-ratio is a small difference of two sums of ~100 nats: float32 leaves 1e-5 of noise
                tol = 1e-4 if k.endswith("logratio") else 1e-6
                assert b[k] == pytest.approx(v, rel=1e-4, abs=tol), (other, k, a, b)


def test_ppo_and_grpo_refuse_several_processes(monkeypatch, micro_dirs):
    """Started under torchrun with N processes they would each run the whole loop and write one folder."""
    class TwoProcesses:
        num_processes = 2
    monkeypatch.setattr(util, "accelerator", lambda: TwoProcesses())
    for train in (util.train_ppo, util.train_grpo):
        with pytest.raises(RuntimeError, match="runs in one process.*started with 2"):
            train(micro_dirs, "cpu")
    assert not micro_dirs.path("rlhf").exists()
