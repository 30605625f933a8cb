"""What every training loop does around its loss: shuffled index batches, micro-batches, AdamW and
its schedule, fp16's loss scaler, backward through accelerate, the clipped optimizer step and the
check that stops on a NaN. util re-exports these names."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .config import resolve_precision
from .runtime import accelerator, unwrap

if TYPE_CHECKING:
    from .config import Config


def batches(n: int, batch_size: int, epochs: float, seed: int):
    """Shuffled index batches covering `epochs` passes over n items (a fraction means a partial last
    pass)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    total = int(math.ceil(n * epochs / batch_size))
    out = []
    while len(out) < total:
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]
    return out[:total]


def make_optimizer(model, lr: float, steps: int, warmup: float = 0.05, weight_decay: float = 0.0):
    """AdamW with a linear warm-up then cosine decay (transformers' scheduler)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup
    params = [p for p in model.parameters() if p.requires_grad]
    # betas (0.9, 0.95): the GPT-3 / nanoGPT choice, a shorter memory of the second moment than
    # torch's 0.999, so a burst of large gradients fades sooner; eps is torch's 1e-8 (cleanRL's
    # PPO uses 1e-5, which damps steps on parameters with tiny gradients; not tuned here)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    return opt, get_cosine_schedule_with_warmup(opt, int(warmup * steps), steps)


def micro_batches(idx: list, cfg: Config) -> list[list]:
    """A batch's indices cut into micro-batches of cfg.micro_batch_size (one piece when it is 0):
    gradients add up over them, so the optimizer sees the whole batch while memory holds one
    micro-batch."""
    n = cfg.micro_batch_size or max(len(idx), 1)
    return [idx[i:i + n] for i in range(0, len(idx), n)]


def grad_scaler(cfg: Config, device):
    """fp16's loss scaler (small fp16 gradients underflow to 0 without it); None in bf16 and fp32.
    """
    import torch
    fp16 = resolve_precision(cfg, device) == "fp16"
    return torch.amp.GradScaler(torch.device(device).type) if fp16 else None


def backward(loss, scaler) -> None:
    """loss.backward(), through accelerate (DDP averages gradients over processes), scaled under
    fp16."""
    accelerator().backward(scaler.scale(loss) if scaler is not None else loss)


def optimizer_step(pairs, cfg: Config, scaler, what: str, step) -> float:
    """Clip each model's gradient norm to max_grad_norm, then step each (optimizer, model) pair;
    returns the summed norm. A NaN/inf gradient stops the run, except under fp16 loss scaling where
    it is expected now and then: the scaler skips that step and lowers its scale."""
    import torch
    if scaler is not None:
        for opt, _ in pairs:
            scaler.unscale_(opt)                # clip the true gradients, not the scaled ones
    norm = sum(float(torch.nn.utils.clip_grad_norm_(unwrap(m).parameters(), cfg.max_grad_norm))
               for _, m in pairs)
    if scaler is None:
        # a finite loss can still give inf gradients
        check_finite(norm, f"{what} gradient norm", step)
    for opt, _ in pairs:
        scaler.step(opt) if scaler is not None else opt.step()
    if scaler is not None:
        scaler.update()
    return norm


def check_finite(loss, what: str, step) -> None:
    """Stop with a clear message on a NaN/inf loss instead of training on garbage (`step`: a number
    or a phrase)."""
    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        at = f"step {step}" if isinstance(step, int) else step
        raise FloatingPointError(f"{what} became {value} at {at}, before it reached the weights: "
                                 "lower the learning rate")
