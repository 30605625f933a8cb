"""`make bench`'s workers on our side, one short run each on the quick spec (smoke preset): the bench
calls util's functions directly, so a change to one of their signatures breaks it here, not in the
next full benchmark. TRL's sides need bench/.venv (`make bench`); the generation worker runs with
two stand-ins for the TRL functions it compares against."""
import importlib.util
import sys
import types

import pytest

import util

_spec = importlib.util.spec_from_file_location("bench_harness", util.ROOT / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = bench            # its dataclasses look their module up
_spec.loader.exec_module(bench)
SPEC = bench.SPECS["quick"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The shared starting points (base model, SFT actor, reward model) as `make bench` trains them."""
    start = tmp_path_factory.mktemp("bench") / "start"
    setup = bench.w_setup(SPEC, 0, start, start)
    assert 0 <= setup["rm_start_pair_acc"] <= 1 and (start / "critic" / "config.json").exists()
    return start


@pytest.mark.parametrize("task, side", [(t, s) for t, s in bench.WORKERS
                                        if s != "trl" and (t, s) not in {("setup", "ours"), ("gen", "ours")}])
def test_our_side_of_each_pair_runs(start, tmp_path, task, side):
    res = bench.WORKERS[task, side](SPEC, 0, tmp_path, start)
    assert res["seconds"] > 0 and res["units"] > 0     # what the orchestrator divides by


def test_the_generation_worker_runs(start, tmp_path, monkeypatch):
    """w_gen times util.generate and util.rollout beside TRL's batch_generation (here: bare generate) and
    checks util.reward_scores against TRL's get_reward (here: util.reward_scores itself)."""
    def batch_generation(model, ids, n, pad_id, gen_cfg):
        return model.generate(input_ids=ids, attention_mask=(ids != pad_id).long(), generation_config=gen_cfg), None

    def get_reward(model, qr, pad_id, lq):
        return None, util.reward_scores(model, qr, (qr != pad_id).long(), normalized=False), None
    for name, attrs in {"trl": {}, "trl.experimental": {}, "trl.experimental.ppo": {},
                        "trl.experimental.ppo.ppo_trainer": {"batch_generation": batch_generation},
                        "trl.experimental.utils": {"get_reward": get_reward}}.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    res = bench.w_gen(SPEC, 0, tmp_path, start)
    assert res["ours_equals_bare_tokens"] and set(res["variants"]) >= {"ours_generate", "ours_rollout"}
