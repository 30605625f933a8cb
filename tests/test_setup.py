"""Presets, the hub path (with local directories laid out like hub snapshots), device and Colab set-up."""
import re
import sys
import time

import pytest

from rlhf import runtime
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


def colab_snapshot():
    """Package -> version in Colab's runtime as published (constraints/colab-*.txt), its torch too."""
    pins = {}
    for line in (ROOT / "constraints" / "colab-2026-08.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[runtime._norm(name)] = version
    return {**pins, "torch": "2.11.0+cu128"}             # dropped from the file: Colab's CUDA build


def test_colab_plan_on_todays_colab_installs_nothing():
    assert runtime.colab_plan(ROOT / "requirements.txt", colab_snapshot()) == ([], [])


def test_colab_plan_installs_what_is_missing_or_old_and_never_colabs_own():
    colab = colab_snapshot()
    older = {**colab, "transformers": "5.10.0", "pandas": "2.1.4", "torch": "2.3.1",
             "huggingface-hub": "0.30.0", "pytest": "7.0.0"}
    del older["peft"]
    need, warn = runtime.colab_plan(ROOT / "requirements.txt", older)
    assert [re.match(r"[\w-]+", n).group(0) for n in need] == ["transformers", "peft"]
    # pandas and torch: out of range but Colab's own, so a warning, never an install; the tools
    # (pytest, nbval) are not needed in Colab; huggingface_hub is no requirement of ours
    assert [w.split()[0] for w in warn] == ["torch", "pandas"] and "2.1.4 is outside >=2.2" in warn[1]


def test_colab_setup_installs_only_the_plan_and_holds_colabs_packages(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RLHF_COLAB_NO_INSTALL", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch>=2.4\ntransformers>=99  # none has it\npandas>=99\npytest>=99\n")
    calls = []
    assert util.colab_setup(reqs, run=calls.append) == [] and calls == []   # not in Colab: nothing
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert util.colab_setup(ROOT / "requirements.txt", run=calls.append) == [] and calls == []
    assert "Colab set-up: nothing to install" in capsys.readouterr().out    # this env has it all
    cmd = util.colab_setup(reqs, run=calls.append)
    held = tmp_path / "tiny-rlhf-colab-keep.txt"
    assert calls == [cmd] and cmd == [sys.executable, "-m", "pip", "install", "-q", "-c", str(held),
                                      "transformers>=99"]
    from importlib import metadata
    assert f"pandas=={metadata.version('pandas')}" in held.read_text().splitlines()
    assert f"torch=={metadata.version('torch')}" in held.read_text().splitlines()
    out = capsys.readouterr().out
    assert "WARNING pandas" in out and "installed transformers>=99" in out
    monkeypatch.setenv("RLHF_COLAB_NO_INSTALL", "1")                          # tests: never call pip
    assert util.colab_setup(reqs, run=calls.append) == cmd and calls == [cmd]
    assert "would install transformers>=99" in capsys.readouterr().out

