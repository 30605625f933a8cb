"""The one place that knows transformers' renames (model_files: checkpointing_enable, is_checkpointing,
cache_kwarg, output_cache). `make test` runs these on the newest transformers, `make test-colab` on
Colab's (5.15): on each, no name is missing (an AttributeError, or a cache silently ignored, changes the
scores) and no deprecated one is used (transformers warns with a FutureWarning: an error here)."""
import warnings

import pytest
import torch

import util


@pytest.fixture
def strict():
    """Deprecations are errors: transformers' FutureWarnings, and the deprecation notes its logger
    writes once per process (the old cache names), collected here and asserted absent."""
    import logging
    from transformers.utils import logging as hf_logging
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root, level = logging.getLogger("transformers"), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()      # "once": said before this test, say it again
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert not [m for m in seen if "deprecat" in m.lower()], seen


def test_checkpointing_on_and_seen_under_this_versions_name(micro_dirs, strict):
    cfg = util.get_config("smoke", out_dir=micro_dirs.out_dir, gradient_checkpointing=True)
    plain = util.load_score_model(micro_dirs.path("critic"))
    assert util.is_checkpointing(plain) is False
    model = util.load_score_model(micro_dirs.path("critic"), cfg=cfg)   # ready_model turns it on
    assert util.is_checkpointing(model) is True
    # and it is real: the decoder layers checkpoint, and a training step runs through them
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    util.token_scores(model, ids, torch.ones_like(ids)).sum().backward()
    assert model.score.weight.grad is not None


def test_a_cached_prompt_scores_like_the_whole_sequence(micro_dirs, strict):
    """shared_prompt_scores passes the prompt's KV cache under this version's keyword: a cache under a
    name the model ignores would score the answers without their prompt."""
    rm = util.load_score_model(micro_dirs.path("critic"))
    g = torch.Generator().manual_seed(0)
    p_ids = torch.randint(5, 200, (2, 6), generator=g)
    p_mask = torch.ones_like(p_ids)
    ids = torch.randint(5, 200, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    owner = torch.tensor([0, 0, 1])
    with torch.no_grad():
        out = rm(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
        assert util.output_cache(out) is not None
        shared = util.shared_prompt_scores(rm, p_ids, p_mask, ids, mask, owner)
        full = util.token_scores(rm, torch.cat([p_ids[owner], ids], 1),
                                 torch.cat([p_mask[owner], mask], 1))[:, p_ids.shape[1]:]
    assert torch.allclose(shared * mask, full * mask, atol=1e-5)
    assert util.cache_kwarg(rm) in ("cache", "past_key_values")
