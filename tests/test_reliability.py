"""Reliability: bad data, stages run out of order, an unreachable hub, interruptions (Ctrl-C, SIGTERM, a cut
save), NaN, out of memory, pickle-free loading, determinism, the Colab set-up cell, and the notebooks run in a
real Jupyter server. Every fault must end in a clear message and lose no completed model or checkpoint."""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from rlhf import model_files
from rlhf import saving
import util
from conftest import ROOT


def digest(path) -> str:
    """sha256 over the names and bytes of every file under a directory."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def assert_plain_traceback(excinfo):
    """The user's traceback stops in util: no torch/transformers frames, no chained torch traceback below it."""
    files = [f.filename for f in traceback.extract_tb(excinfo.value.__traceback__)]
    assert not [f for f in files if "site-packages" in f], files
    assert excinfo.value.__suppress_context__


@pytest.fixture
def stage(micro_dirs, tmp_path):
    """An output dir holding base_actor, a previous completed actor and critic (the micro models)."""
    for src, dst in (("actor", "base_actor"), ("actor", "actor"), ("critic", "critic")):
        shutil.copytree(micro_dirs.path(src), tmp_path / dst)
    return util.get_config("smoke", out_dir=str(tmp_path), sft_batch_size=8, rm_batch_size=8, ppo_iterations=3,
                           rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=2, save_every=1,
                           max_response_tokens=24, eval_batch_size=8)


# ================================================================ data

ROW = {"prompt": "Human: q Assistant:", "chosen": " SELECT 1", "rejected": " SELECT 2", "response": " SELECT 1"}


def _jsonl(path, recs):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return path


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "p", "output": "c", "bad": "r"},
     r"bad.jsonl:2: field 'prompt' is missing \(accepted names: \['prompt', 'question', 'query'\]; "
     r"this row has: \['bad', 'instruction', 'output'\]\)"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "bad.jsonl:2: field 'prompt' must be a string, got NoneType"),
    ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "bad.jsonl:2: field 'chosen' must be a string, got list"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "bad.jsonl:2: field 'rejected' is empty"),
])
def test_unknown_names_and_non_string_fields(tmp_path, bad, message):
    with pytest.raises(util.DataError, match=message):
        util.load_rows(_jsonl(tmp_path / "bad.jsonl", [ROW, bad]))


def test_empty_and_undecodable_files(tmp_path, capsys):
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(util.DataError, match="blank.jsonl: the file is empty"):
        util.load_rows(tmp_path / "blank.jsonl")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(util.DataError, match="none.json: no usable rows"):
        util.load_rows(tmp_path / "none.json")
    path = _jsonl(tmp_path / "allbad.jsonl", ['{"prompt": ', {"prompt": "p"}])
    with pytest.raises(util.DataError, match="allbad.jsonl: no usable rows"):
        util.load_rows(path, skip_bad=True)
    assert "skipped 2 bad row(s) of allbad.jsonl; first: " in capsys.readouterr().out
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(ROW).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(util.DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte \d+\): save the file as UTF-8"):
        util.load_rows(tmp_path / "latin1.jsonl")


def test_over_long_rows_are_counted_skipped_or_cut(tok, capsys):
    cfg = util.get_config("smoke", max_prompt_tokens=40, max_response_tokens=12)
    long_answer = {**ROW, "response": " SELECT " + ", ".join(f"c{i}" for i in range(20)) + " FROM t"}
    long_prompt = {**ROW, "prompt": "Human: " + "word " * 60 + "Assistant:"}
    kept = util.fit_rows(tok, [ROW, long_answer, long_prompt, ROW], cfg, ("response",), "SFT rows")
    assert kept == [ROW, long_prompt, ROW]
    out = capsys.readouterr().out
    assert "SFT rows: 1 of 4 prompts are longer than max_prompt_tokens=40: cut to their last 40 tokens" in out
    assert ("SFT rows: skipped 1 of 4 rows whose response is longer than max_response_tokens=12 tokens with EOS "
            "(raise it to keep them)") in out
    with pytest.raises(util.DataError, match="every row is longer than max_response_tokens=12"):
        util.fit_rows(tok, [long_answer], cfg, ("response",), "SFT rows")
    with pytest.raises(util.DataError, match="SFT rows: row 0 has no 'response' field"):
        util.fit_rows(tok, [{"prompt": "p", "chosen": "c", "rejected": "r"}], cfg, ("response",), "SFT rows")
    capsys.readouterr()
    # the shipped data fits the presets: nothing is skipped or cut
    assert util.fit_rows(tok, util.load_rows(ROOT / "dataset" / "eval.json"), util.get_config("smoke"),
                         ("chosen", "rejected", "response")) and not capsys.readouterr().out


# ================================================================ order and mismatches

def test_each_stage_run_too_early_names_the_notebook_to_run(stage, tmp_path):
    empty = util.get_config("smoke", out_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="run 0_download.ipynb first"):       # 1_actor first
        util.load_tokenizer(empty.path("base_actor"))
    with pytest.raises(FileNotFoundError, match="run 1_actor.ipynb first"):          # 2_critic / 4_test first
        util.load_tokenizer(empty.path("actor"))
    with pytest.raises(FileNotFoundError, match="run 1_actor.ipynb first"):          # 3_rlhf first
        util.train_ppo(empty, "cpu")
    with pytest.raises(FileNotFoundError, match="run 2_critic.ipynb first"):         # 4_test before 2_critic
        util.load_score_model(empty.path("critic"))
    with pytest.raises(FileNotFoundError, match="run 3_rlhf.ipynb first"):
        util.load_causal_lm(empty.path("rlhf"))
    shutil.rmtree(stage.path("critic"))
    with pytest.raises(FileNotFoundError, match="critic has no model: run 2_critic.ipynb first"):
        util.train_ppo(stage, "cpu")                                                 # 3_rlhf before 2_critic


def test_tokenizer_and_model_that_do_not_match(tok, stage, rows):
    from transformers import OPTForCausalLM
    conf = util.tiny_opt_config(stage, tok)
    conf.vocab_size = 100
    small = OPTForCausalLM(conf)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's embedding has 100"):
        util.check_tokenizer_matches(tok, small)
    with pytest.raises(ValueError, match="embedding has 100"):    # before any step: not an IndexError from torch
        util.train_sft(small, tok, rows[:16], rows[16:24], stage, "cpu")
    model = util.load_causal_lm(stage.path("actor"))
    util.check_tokenizer_matches(tok, model, stage)             # the real pair passes
    for name in ("pad_token_id", "eos_token_id"):
        other = util.load_causal_lm(stage.path("actor"))
        setattr(other.config, name, 7)
        with pytest.raises(ValueError, match=f"{name}: tokenizer says {getattr(tok, name)}, model config says 7"):
            util.check_tokenizer_matches(tok, other)
    too_long = util.get_config("smoke", max_prompt_tokens=180, max_response_tokens=24)
    with pytest.raises(ValueError, match="max_prompt_tokens \\+ max_response_tokens = 204 but the model has 192 positions"):
        util.check_tokenizer_matches(tok, model, too_long)


# ================================================================ hub

@pytest.fixture
def hanging_dns(monkeypatch):
    """Every connection attempt hangs for 30 s, like a DNS lookup with no answer."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("timed out")
    monkeypatch.setattr(socket, "create_connection", hang)
    yield
    release.set()


def test_unreachable_hub_is_decided_within_5_s(hanging_dns, monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_PRESET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)    # a GPU: opt would be chosen with a hub
    t0 = time.time()
    assert util.default_preset() == "tiny"                           # the fallback
    assert time.time() - t0 < 5.0
    cfg = util.get_config("opt", out_dir=str(tmp_path))
    t0 = time.time()
    with pytest.raises(ConnectionError, match="unreachable, so facebook/opt-350m cannot be downloaded: use RLHF_PRE"):
        util.prepare_base_models(cfg)                                # opt asked for explicitly: a clear error
    assert time.time() - t0 < 5.0


def test_model_id_that_does_not_exist(monkeypatch, tmp_path):
    """A hub that answers 404 (RepoNotFound), as huggingface.co does for an unknown id."""
    import http.server
    import huggingface_hub.constants as hub

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_HEAD

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(hub, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(model_files, "hub_reachable", lambda *a, **k: True)
    cfg = util.get_config("opt", actor_hub="facebook/opt-does-not-exist", out_dir=str(tmp_path),
                          tokenizer_dir=str(tmp_path / "tok"))
    t0 = time.time()
    try:
        with pytest.raises(OSError, match="could not load model 'facebook/opt-does-not-exist': check the name"):
            util.prepare_base_models(cfg)
    finally:
        server.shutdown()
    assert time.time() - t0 < 20
    assert not list(tmp_path.glob("base_*"))


# ================================================================ interruptions

def _sigterm_self():
    # without a handler SIGTERM would end pytest itself: fail loudly instead
    assert signal.getsignal(signal.SIGTERM) is util._sigterm_to_interrupt, "no SIGTERM handler during training"
    os.kill(os.getpid(), signal.SIGTERM)


def _fail_on_call(n, action, real=None):
    """A stand-in that calls `real` but runs `action` (raise, or send a signal) on its n-th call."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            out = action()
            if out is not None:
                return out
        return real(*args, **kwargs)
    return wrapper


def _interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("stage_name, how", [("SFT", "SIGTERM"), ("SFT", "Ctrl-C"), ("reward model", "SIGTERM"),
                                             ("reward model", "Ctrl-C")])
def test_interrupted_sft_or_rm_keeps_the_previous_model(stage, rows, tok, monkeypatch, stage_name, how):
    out = stage.path("actor" if stage_name == "SFT" else "critic")
    before = digest(out)
    action = _sigterm_self if how == "SIGTERM" else _interrupt
    handler = signal.getsignal(signal.SIGTERM)

    def load():
        return (util.load_causal_lm(stage.path("base_actor")) if stage_name == "SFT"
                else util.load_score_model(stage.path("actor")))
    train = util.train_sft if stage_name == "SFT" else util.train_reward
    hook = "sft_loss" if stage_name == "SFT" else "token_scores"
    model = load()
    with monkeypatch.context() as m:
        m.setattr(util, hook, _fail_on_call(2, action, getattr(util, hook)))
        with pytest.raises(util.TrainingStopped) as err:
            train(model, tok, rows[:32], rows[32:40], stage, "cpu")
    assert str(err.value) == (f"{stage_name} stopped by an interrupt. Nothing of this run was saved ({out} still holds "
                              "the last completed model, untouched). To train again, re-run the cell that loads the "
                              "model, then this one.")
    assert_plain_traceback(err)
    assert signal.getsignal(signal.SIGTERM) == handler                # our SIGTERM handler is gone again
    assert digest(out) == before                                      # nothing lost, nothing half-written
    assert not list(Path(stage.out_dir).glob("*.tmp"))
    with pytest.raises(RuntimeError, match="partly trained by a stopped run: re-run the cell that loads it"):
        train(model, tok, rows[:32], rows[32:40], stage, "cpu")       # re-running only the training cell
    assert train(load(), tok, rows[:32], rows[32:40], stage, "cpu")  # re-running from the loading cell works


def test_save_model_cut_short_keeps_the_previous_model(stage, tok):
    out = stage.path("actor")
    before = digest(out)
    model = util.load_causal_lm(stage.path("base_actor"))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)                            # a different, "newly trained" model

    class CutTokenizer:                                               # killed while the tokenizer files are written
        def save_pretrained(self, path):
            tok.save_pretrained(path)
            Path(path, "tokenizer.json").write_text('{"trunc')
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        util.save_model(model, CutTokenizer(), out)
    assert digest(out) == before and Path(str(out) + ".tmp").exists()
    util.load_tokenizer(out), util.load_causal_lm(out)               # the previous model loads
    # killed between the two renames of the swap: only actor.old is there; loading puts it back
    os.replace(out, str(out) + ".old")
    assert util.load_causal_lm(out) is not None and digest(out) == before
    util.save_model(model, tok, out)                                 # the next save replaces it cleanly
    assert digest(out) != before
    assert not [p for p in Path(stage.out_dir).iterdir() if p.name.endswith((".tmp", ".old"))]


def _ppo_files_complete(path):
    """A checkpoint whose every part loads and agrees: actor, critic, optimizer, state and metrics."""
    from safetensors.torch import load_file
    state = json.loads(Path(path, "state.json").read_text())
    assert len(state["history"]) == state["iteration"] == len(json.loads(Path(path, "metrics.json").read_text()))
    assert set(load_file(str(Path(path, "optimizer.safetensors")))) == set(state["optimizer"]["actor"]["keys"]) | set(
        state["optimizer"]["critic"]["keys"])
    util.load_causal_lm(path), util.load_score_model(Path(path, "critic"))
    return state


def test_ppo_killed_by_sigterm_then_resumed(stage, rows, capsys):
    """A real process, stopped with SIGTERM mid-run (as a shut-down kernel or a CI timeout does)."""
    out = stage.path("rlhf")
    child = ("import sys, util\n"
             "cfg = util.get_config('smoke', out_dir=sys.argv[1], ppo_iterations=1000, save_every=1, "
             "rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=2, max_response_tokens=24)\n"
             "util.train_ppo(cfg, 'cpu', rows=util.load_rows(util.ROOT / 'dataset' / 'train.json', limit=48))\n")
    log = Path(stage.out_dir, "child.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", child, stage.out_dir], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "state.json").read_text())["iteration"] >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        proc.kill()
    text = log.read_text()
    assert proc.returncode not in (0, -signal.SIGTERM), text          # stopped by our handler, not killed outright
    msg = re.search(r"TrainingStopped: PPO stopped by an interrupt\. (\S+) holds the checkpoint of iteration (\d+), "
                    r"intact: re-run this cell to resume from it\.", text)
    assert msg, text
    k = int(msg.group(2))
    assert msg.group(1) == str(out) and k >= 2
    assert "site-packages" not in text.split("TrainingStopped")[0].split("Traceback")[-1]   # no torch frames
    state = _ppo_files_complete(out)                                  # nothing half-written in the checkpoint
    assert state["iteration"] == k
    # the child's settings (its 1000 iterations shape the learning-rate schedule): one more iteration
    child_cfg = dataclasses.replace(stage, ppo_iterations=1000, save_every=1, rollout_batch_size=8,
                                    ppo_minibatch_size=4, ppo_epochs=2, max_response_tokens=24)
    resumed = util.train_ppo(child_cfg, "cpu", rows=rows, stop_after=1)
    assert f"resuming PPO from iteration {k}" in capsys.readouterr().out
    assert len(resumed) == k + 1 and resumed[:k] == state["history"]
    assert not [p for p in Path(stage.out_dir).iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("cut", ["while writing", "between the renames"])
def test_ppo_checkpoint_cut_short_keeps_the_previous_one(stage, rows, monkeypatch, capsys, cut):
    out = stage.path("rlhf")
    with monkeypatch.context() as m:
        if cut == "while writing":   # SIGTERM arrives while the 2nd checkpoint's optimizer state is written
            m.setattr(saving, "optimizer_to_tensors", _fail_on_call(3, _sigterm_self, saving.optimizer_to_tensors))
        else:                        # the old checkpoint is renamed away, then the process dies
            def cut_swap(tmp, path):
                os.replace(path, path.with_name(path.name + ".old"))
                raise KeyboardInterrupt
            m.setattr(saving, "_swap_dir", _fail_on_call(2, lambda: cut_swap(out.with_name("rlhf.tmp"), out), saving._swap_dir))
        with pytest.raises(util.TrainingStopped, match=f"{out} holds the checkpoint of iteration 1, intact: re-run"):
            util.train_ppo(stage, "cpu", rows=rows)
    assert _ppo_files_complete(out)["iteration"] == 1
    capsys.readouterr()
    assert len(util.train_ppo(stage, "cpu", rows=rows)) == 3
    assert "resuming PPO from iteration 1" in capsys.readouterr().out
    assert not [p for p in Path(stage.out_dir).iterdir() if p.name.endswith((".tmp", ".old"))]


# ================================================================ numerics

def test_check_finite():
    for bad in (float("nan"), float("inf"), torch.tensor(-float("inf")), torch.tensor(float("nan"), requires_grad=True)):
        with pytest.raises(FloatingPointError, match="SFT loss became (nan|inf|-inf) at step 3"):
            util.check_finite(bad, "SFT loss", 3)
    util.check_finite(torch.tensor(2.5), "SFT loss", 3)


@pytest.mark.parametrize("fault", ["SFT loss", "SFT gradient norm"])
def test_nan_stops_sft_and_keeps_the_model(stage, rows, tok, monkeypatch, fault):
    before = digest(stage.path("actor"))
    model = util.load_causal_lm(stage.path("base_actor"))
    real, steps = util.sft_loss, []

    def nan_at_step_2(model, batch, device):
        loss = real(model, batch, device)
        steps.append(model.training)                                 # held-out losses are computed in eval mode
        if steps.count(True) != 2 or not model.training:
            return loss
        if fault == "SFT loss":
            return loss * float("nan")
        p = next(model.parameters())                                 # a finite loss whose gradient is NaN:
        return loss + 0.0 * (p - p.detach()).abs().sqrt().sum()      # d sqrt(|x|)/dx at x = 0 is infinite
    monkeypatch.setattr(util, "sft_loss", nan_at_step_2)
    with pytest.raises(FloatingPointError) as err:
        util.train_sft(model, tok, rows[:32], rows[32:40], stage, "cpu")
    assert str(err.value).startswith(f"{fault} became nan at step 2, before it reached the weights: lower the "
                                     f"learning rate. Nothing of this run was saved ({stage.path('actor')} still holds")
    assert_plain_traceback(err)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert digest(stage.path("actor")) == before


def test_nan_in_ppo_keeps_the_last_good_checkpoint(stage, rows, monkeypatch):
    monkeypatch.setattr(util, "reward_scores", _fail_on_call(
        2, lambda: torch.full((stage.rollout_batch_size,), float("nan")), util.reward_scores))
    with pytest.raises(FloatingPointError) as err:
        util.train_ppo(stage, "cpu", rows=rows)
    assert str(err.value) == ("PPO loss became nan at epoch 0, before it reached the weights: lower the learning rate. "
                              f"{stage.path('rlhf')} holds the checkpoint of iteration 1, intact: re-run this cell to "
                              "resume from it.")
    assert_plain_traceback(err)
    state = _ppo_files_complete(stage.path("rlhf"))
    assert state["iteration"] == 1 and all(v == v for v in state["history"][0].values() if isinstance(v, float))


# ================================================================ out of memory

def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _oom_unless_greedy(real):
    def generate(*args, greedy=False, **kwargs):
        return real(*args, greedy=True, **kwargs) if greedy else _oom()
    return generate


@pytest.mark.parametrize("where, fields", [
    ("SFT", "sft_batch_size=8. .* try util.get_config\\(PRESET, sft_batch_size=4\\)"),
    ("reward model", "rm_batch_size=8. .* try util.get_config\\(PRESET, rm_batch_size=4\\)"),
    ("PPO", "rollout_batch_size=8, ppo_minibatch_size=4. .* "
            "util.get_config\\(PRESET, rollout_batch_size=4, ppo_minibatch_size=2\\)"),
    ("SFT answers", "eval_batch_size=8. .* eval_batch_size=4\\)"),
    ("eval", "eval_batch_size=8. .* eval_batch_size=4\\)"),
])
def test_cuda_out_of_memory_names_the_batch_size_to_try(stage, rows, tok, monkeypatch, where, fields):
    model = util.load_causal_lm(stage.path("actor"))
    rm = util.load_score_model(stage.path("critic"))
    if where == "SFT":                                               # the allocation fails inside the forward pass
        monkeypatch.setattr(model, "forward", _oom)
    elif where == "reward model":
        monkeypatch.setattr(getattr(rm, rm.base_model_prefix), "forward", _oom)
    else:         # in generation; for evaluation on sampling only, so it gets past its greedy pass into its own loop
        monkeypatch.setattr(util, "generate", _oom if where != "eval" else _oom_unless_greedy(util.generate))
    calls = {"SFT": lambda: util.train_sft(model, tok, rows[:16], rows[16:24], stage, "cpu"),
             "reward model": lambda: util.train_reward(rm, tok, rows[:16], rows[16:24], stage, "cpu"),
             "PPO": lambda: util.train_ppo(stage, "cpu", rows=rows),
             "SFT answers": lambda: util.sample_answers(model, tok, [r["prompt"] for r in rows], stage, desc="SFT answers"),
             "eval": lambda: util.evaluate_policy(model, tok, rows[:8], stage)}
    with pytest.raises(MemoryError, match=f"^{where}: out of GPU memory with {fields}") as err:
        calls[where]()
    assert "Restart the kernel (frees the memory)" in str(err.value)
    assert_plain_traceback(err)


# ================================================================ loading: no pickle

def test_nothing_is_ever_unpickled(stage, rows, tok, monkeypatch, tmp_path):
    import pickle
    root = Path(util.__file__).parent                                    # util and its plumbing
    source = "".join(p.read_text() for p in [*root.glob("*.py"), *root.glob("rlhf/*.py")])
    assert "torch.load" not in source and "import pickle" not in source
    util.train_ppo(stage, "cpu", rows=rows, stop_after=1)
    suffixes = {p.suffix for p in Path(stage.out_dir).rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, suffixes

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, forbidden)
    util.load_tokenizer(stage.path("actor"))
    util.load_score_model(stage.path("critic"))
    assert len(util.train_ppo(stage, "cpu", rows=rows, stop_after=1)) == 2       # resume: weights and optimizer
    monkeypatch.undo()
    # a directory holding only a pickled .bin is refused, not unpickled
    shutil.copytree(stage.path("actor"), tmp_path / "pickled")
    state = util.load_causal_lm(tmp_path / "pickled").state_dict()
    for p in (tmp_path / "pickled").glob("*.safetensors"):
        p.unlink()
    torch.save(state, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled has a config but no .safetensors weights"):
        util.load_causal_lm(tmp_path / "pickled")


# ================================================================ determinism

def _run_stages(micro_dirs, rows, tok, out, seed):
    """SFT, RM and two PPO iterations on the micro models; every metric except wall times."""
    for d in ("actor", "critic"):
        shutil.copytree(micro_dirs.path(d), out / d)
    cfg = util.get_config("smoke", out_dir=str(out), seed=seed, sft_batch_size=8, rm_batch_size=8, ppo_iterations=2,
                          rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=2)
    util.set_seed(seed)
    sft = util.train_sft(util.load_causal_lm(out / "actor"), tok, rows[:32], rows[32:40], cfg, "cpu")
    util.set_seed(seed)
    rm = util.train_reward(util.load_score_model(out / "actor"), tok, rows[:32], rows[32:40], cfg, "cpu")
    ppo = util.train_ppo(cfg, "cpu", rows=rows)
    return sft, rm, [{k: v for k, v in h.items() if not k.startswith("time_")} for h in ppo]


def test_same_seed_same_metrics(micro_dirs, rows, tok, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        runs.append(_run_stages(micro_dirs, rows, tok, tmp_path / name, seed))
    assert all(runs[0]) and runs[0] == runs[1]                        # exactly equal, not approximately
    for x, y in zip(runs[0], runs[2]):                                # and the comparison can fail: seed 1 differs
        assert x != y


# ================================================================ Colab

def test_colab_setup_cell_installs_before_torch_and_holds_colabs_packages(tmp_path):
    setups = set()
    for nb in sorted(ROOT.glob("[0-9]_*.ipynb")):
        # the code cells up to the set-up cell (cfg = ...), without the parameters cell: the Colab
        # bootstrap (it finds util.py in the cwd here and calls runtime.colab_setup) and the set-up
        # (import util)
        cells = [c for c in json.loads(nb.read_text())["cells"]
                 if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])]
        end = next(i for i, c in enumerate(cells) if "util.get_config(" in "".join(c["source"]))
        setups.add("\n".join("".join(c["source"]) for c in cells[:end + 1]))
    assert len(setups) == 1 and "colab_setup" in next(iter(setups))  # every notebook has the same set-up
    script = tmp_path / "colab.py"
    script.write_text(
        "import importlib.machinery, json, subprocess, sys, types\n"
        "google = types.ModuleType('google'); google.colab = types.ModuleType('google.colab')\n"
        "for m in (google, google.colab):\n"
        "    m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)\n"
        "sys.modules.update({'google': google, 'google.colab': google.colab})   # what Colab's runtime has\n"
        "from rlhf import runtime   # as if Colab lacked transformers (the cell has it today: no install)\n"
        "runtime.colab_plan = lambda *a: (['transformers>=5.15'], [])\n"
        "calls = []\n"
        "subprocess.check_call = lambda cmd: calls.append({'cmd': cmd, 'loaded': sorted(\n"
        "    m for m in ('torch', 'numpy', 'transformers', 'accelerate', 'pandas', 'util')\n"
        "    if m in sys.modules)})\n"
        "PRESET = 'smoke'\n"
        f"exec({setups.pop()!r})\n"
        "print('RESULT', json.dumps({'calls': calls, 'preset': cfg.preset}))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert len(result["calls"]) == 1 and result["preset"] == "smoke"
    call = result["calls"][0]
    # pip runs before torch or anything is imported, util (which imports torch) included
    assert call["loaded"] == []
    assert call["cmd"][:6] == [sys.executable, "-m", "pip", "install", "-q", "-c"]
    assert call["cmd"][7:] == ["transformers>=5.15"]
    from importlib import metadata
    held = Path(call["cmd"][6]).read_text().split()       # pip may not move Colab's own packages
    assert {f"{m}=={metadata.version(m)}" for m in ("torch", "pandas", "numpy")} <= set(held)
    assert "(Google Colab)" in proc.stdout


# ================================================================ a real Jupyter server

@pytest.mark.slow
def test_notebooks_run_in_a_real_jupyter_server(tmp_path):
    """Start `jupyter server`, open a session per notebook over its REST API and run every code cell over the
    kernel websocket, in `make run`'s order (smoke preset, outputs in a temp dir); no cell may raise."""
    import secrets
    import socket
    import urllib.request
    import uuid

    import websocket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RLHF_PRESET": "smoke", "RLHF_OUT": str(tmp_path / "out"), "TQDM_DISABLE": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "IPYTHONDIR": str(tmp_path / "ipython")}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
                               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.open_browser=False",
                               "--allow-root",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)

    def api(method, path, body=None):
        req = urllib.request.Request(base + path, method=method, headers={"Authorization": f"token {token}"},
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")
    try:
        for _ in range(600):
            try:
                api("GET", "/api/status")
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
        ran = {}
        order = ("0_download", "1_actor", "2_critic", "3_rlhf", "5_dpo", "6_grpo", "4_test")   # as `make run`
        for nb in (f"{name}.ipynb" for name in order):
            cells = [c["source"] for c in api("GET", f"/api/contents/{nb}?content=1")["content"]["cells"]
                     if c["cell_type"] == "code"]
            session = api("POST", "/api/sessions", {"path": nb, "name": nb, "type": "notebook",
                                                     "kernel": {"name": "python3"}})
            sid = uuid.uuid4().hex
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{session['kernel']['id']}/channels"
                                             f"?session_id={sid}", header=[f"Authorization: token {token}"], timeout=300)
            try:
                for i, code in enumerate(cells):
                    mid = uuid.uuid4().hex
                    ws.send(json.dumps({"header": {"msg_id": mid, "msg_type": "execute_request", "session": sid,
                                                   "username": "test", "version": "5.3"},
                                        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                                        "content": {"code": code, "silent": False, "store_history": True,
                                                    "user_expressions": {}, "allow_stdin": False,
                                                    "stop_on_error": True}}))
                    reply, idle, errors = None, False, []
                    while reply is None or not idle:
                        msg = json.loads(ws.recv())
                        if msg.get("parent_header", {}).get("msg_id") != mid:
                            continue
                        kind = msg["header"]["msg_type"]
                        if kind == "execute_reply":
                            reply = msg["content"]
                        elif kind == "error":
                            errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
                        elif kind == "status" and msg["content"]["execution_state"] == "idle":
                            idle = True
                    assert reply["status"] == "ok" and not errors, (nb, i, code[:200], errors, reply)
            finally:
                ws.close()
                api("DELETE", f"/api/sessions/{session['id']}")
            ran[nb] = len(cells)
        assert all(ran.values()) and len(ran) == 7
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["preset"] == "smoke" and set(report["models"]) == {"SFT", "RLHF (PPO)", "DPO", "GRPO"}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
