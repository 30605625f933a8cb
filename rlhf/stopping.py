"""Stopping cleanly: Ctrl-C, Jupyter's stop button, SIGTERM, a NaN loss or CUDA out-of-memory end
a stage in one short message saying what is kept on disk. util re-exports these names."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .saving import recover_dir

if TYPE_CHECKING:
    from .config import Config


class TrainingStopped(KeyboardInterrupt):
    """A stage stopped by Ctrl-C, Jupyter's stop button or SIGTERM; the message says what is kept on
    disk."""


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def kept_model(path) -> str:
    """What a stopped SFT or RM run leaves: nothing of the run, and `path` as it was (the last
    completed model)."""
    recover_dir(path)
    done = (Path(path) / "config.json").exists()
    there = "still holds the last completed model, untouched" if done else "has no model yet"
    return (f"Nothing of this run was saved ({path} {there}). "
            "To train again, re-run the cell that loads the model, then this one.")


def check_not_stopped(model) -> None:
    """Refuse to train a model object that a stopped run left half-trained (re-running only the
    training cell)."""
    if getattr(model, "_stopped_midway", False):
        raise RuntimeError("this model was partly trained by a stopped run: "
                           "re-run the cell that loads it, then this one")


@contextlib.contextmanager
def stop_cleanly(stage: str, cfg: Config, batch_fields=(), kept=lambda: "", model=None):
    """Around a training or generation loop: SIGTERM stops it like Ctrl-C (so no write is cut short
    by a kill), and an interrupt, a NaN loss or CUDA out-of-memory end in one short message saying
    what is kept on disk, instead of a stack trace from inside torch. `model` is marked so that it
    is not trained on by mistake."""
    import torch
    previous = signal.getsignal(signal.SIGTERM)
    # handlers can only be set in the main thread; None means a handler not set from Python: leave
    # it alone
    install = previous is not None and threading.current_thread() is threading.main_thread()
    if install:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    error = None
    try:
        yield
    except TrainingStopped:
        raise                                 # an inner stop_cleanly has explained it already
    except KeyboardInterrupt:
        error = TrainingStopped(f"{stage} stopped by an interrupt. {kept()}".rstrip())
    except FloatingPointError as e:
        error = FloatingPointError(f"{e}. {kept()}".rstrip())
    except torch.cuda.OutOfMemoryError:
        now = ", ".join(f"{f}={getattr(cfg, f)}" for f in batch_fields)
        half = ", ".join(f"{f}={max(1, getattr(cfg, f) // 2)}" for f in batch_fields)
        fix = (f"try util.get_config(PRESET, {half}) in the set-up cell" if batch_fields
               else "use smaller batches")
        error = MemoryError(f"{stage}: out of GPU memory with {now or 'this batch size'}. "
                            f"Restart the kernel (frees the memory), then {fix}. {kept()}".rstrip())
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)
    if error is None:
        return
    if model is not None:
        model._stopped_midway = True        # its weights are neither the start nor the end of a run
    # raised here, `from None`: the message is not buried under torch's frames
    raise error from None


def kept_checkpoint(path) -> str:
    """What a stopped PPO run leaves: its last complete checkpoint, which a re-run resumes from."""
    recover_dir(path)
    f = Path(path, "state.json")
    if not f.exists():
        return f"No PPO checkpoint was saved yet in {path}: re-running starts PPO afresh."
    it = json.loads(f.read_text())["iteration"]
    return (f"{path} holds the checkpoint of iteration {it}, intact: re-run this cell to resume "
            f"from it.")
