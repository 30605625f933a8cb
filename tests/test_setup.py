"""Presets, the hub path (with local directories laid out like hub snapshots), device and Colab set-up."""
import sys
import time

import pytest

import util
from conftest import ROOT


def test_presets_and_env(monkeypatch):
    monkeypatch.setenv("RLHF_PRESET", "smoke")
    assert util.default_preset() == "smoke"
    cfg = util.get_config(None, n_eval=3)
    assert cfg.preset == "smoke" and cfg.n_eval == 3
    assert util.get_config("opt").tokenizer_dir.endswith("tokenizer/opt")
    with pytest.raises(ValueError, match="unknown preset"):
        util.get_config("huge")


def test_hub_check_is_bounded():
    t0 = time.time()
    util.hub_reachable(timeout=2.0)               # offline here: must give up within its timeout
    assert time.time() - t0 < 3.0


def test_opt_path_from_local_snapshot(tok, tmp_path):
    from transformers import OPTForCausalLM
    hub = tmp_path / "hub"
    for name, d in (("actor", 32), ("critic", 16)):
        cfg_small = util.get_config("smoke", d_model=d)
        OPTForCausalLM(util.tiny_opt_config(cfg_small, tok)).save_pretrained(hub / name)
        tok.save_pretrained(hub / name)
    cfg = util.get_config("opt", actor_hub=str(hub / "actor"), critic_hub=str(hub / "critic"),
                          out_dir=str(tmp_path / "out"), tokenizer_dir=str(tmp_path / "tok"))
    paths = util.prepare_base_models(cfg)
    assert set(paths) == {"base_actor", "base_critic"}
    actor = util.load_causal_lm(paths["base_actor"])
    critic = util.load_score_model(paths["base_critic"])
    assert actor.config.hidden_size == 32 and critic.config.hidden_size == 16
    assert (tmp_path / "tok" / "tokenizer_config.json").exists()
    assert list((tmp_path / "out" / "base_actor").glob("*.safetensors"))


def test_missing_model_names_it(tmp_path):
    cfg = util.get_config("opt", actor_hub=str(tmp_path / "no-such-model"), critic_hub="x",
                          out_dir=str(tmp_path / "out"))
    (tmp_path / "no-such-model").mkdir()
    with pytest.raises(OSError, match="no-such-model"):
        util.prepare_base_models(cfg)


def test_stage_order_errors_say_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run 1_actor.ipynb first"):
        util.load_causal_lm(tmp_path / "actor")
    with pytest.raises(FileNotFoundError, match="run 0_download.ipynb first"):
        util.load_tokenizer(tmp_path)


def test_device_is_printed(capsys):
    dev = util.get_device()
    assert str(dev) in capsys.readouterr().out


def test_colab_setup_installs_everything_but_torch(monkeypatch):
    monkeypatch.delenv("RLHF_COLAB_NO_INSTALL", raising=False)
    calls = []
    assert util.colab_setup(ROOT / "requirements.txt", run=calls.append) == []      # not in Colab: nothing
    monkeypatch.setitem(sys.modules, "google.colab", object())
    cmd = util.colab_setup(ROOT / "requirements.txt", run=calls.append)
    assert calls == [cmd] and cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert not any(c.startswith("torch") for c in cmd) and any(c.startswith("transformers") for c in cmd)
    monkeypatch.setenv("RLHF_COLAB_NO_INSTALL", "1")                                  # tests: never call pip
    assert util.colab_setup(ROOT / "requirements.txt", run=calls.append) == cmd and calls == [cmd]
