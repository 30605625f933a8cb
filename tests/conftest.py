import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests never write into the user's model/ directory
os.environ.setdefault("RLHF_OUT", tempfile.mkdtemp(prefix="rlhf-test-"))
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs every notebook (about a minute); -m 'not slow' skips it")


@pytest.fixture(scope="session")
def tok():
    import util
    return util.load_tokenizer(ROOT / "tokenizer")


@pytest.fixture(scope="session")
def rows():
    import util
    return util.load_rows(ROOT / "dataset" / "train.json", limit=48)


@pytest.fixture(scope="session")
def micro_dirs(tok, tmp_path_factory):
    """A micro actor (causal LM) and critic (score model) saved like the notebooks save them."""
    import torch
    from transformers import AutoModelForSequenceClassification, OPTForCausalLM
    import util
    out = tmp_path_factory.mktemp("micro")
    cfg = util.get_config("smoke", out_dir=str(out))
    torch.manual_seed(0)
    actor = OPTForCausalLM(util.tiny_opt_config(cfg, tok))
    util.save_model(actor, tok, cfg.path("actor"))
    torch.manual_seed(1)
    critic_config = actor.config.__class__(**{**actor.config.to_dict(), "num_labels": 1})
    critic = AutoModelForSequenceClassification.from_config(critic_config)
    critic.config.reward_offset = 0.0
    util.save_model(critic, tok, cfg.path("critic"))
    return cfg
