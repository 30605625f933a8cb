"""Where the code runs: the device and processes (accelerate), seeds, Colab's set-up, the hub
probe, progress bars, transformers' quiet mode. util re-exports these names. It imports neither
torch nor numpy at the top: Colab's first cell runs colab_setup (pip) before they are loaded."""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project: util.py, dataset/, tokenizer/


def hub_reachable(host: str = "huggingface.co", timeout: float = 4.0) -> bool:
    """True if a TCP connection to the hub opens within `timeout` seconds (DNS included), never
    longer."""
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)                           # a hanging DNS lookup cannot hold us past the timeout
    return bool(result and result[0])


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


# Colab's runtime is theirs: the first cell installs only what it lacks or has outside our ranges,
# and never these. torch: Colab's own CUDA build (pip's would be another). pandas, numpy, pyarrow,
# matplotlib, huggingface_hub: Colab's tools pin them (google-colab pins pandas exactly) and its
# kernel has imported some before the first cell runs, so a new version needs a restart and can
# break Colab.
COLAB_KEEP = ("torch", "pandas", "numpy", "pyarrow", "matplotlib", "huggingface_hub")
# the tools of make run / make test (Colab runs its own Jupyter): not needed there, never installed
COLAB_TOOLS = ("jupyter", "jupyter_server", "jupyter_client", "ipykernel", "ipython", "notebook",
               "nbclient", "nbformat", "papermill", "nbval", "pytest", "websocket-client")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def colab_plan(requirements=ROOT / "requirements.txt",
               installed=None) -> tuple[list[str], list[str]]:
    """(what to pip-install, warnings): each requirement missing here or out of its range, except
    the tools (skipped) and COLAB_KEEP (a warning, never installed)."""
    from importlib import metadata
    from packaging.requirements import Requirement
    if installed is None:
        installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()
                     if d.metadata["Name"]}
    keep, tools = {_norm(n) for n in COLAB_KEEP}, {_norm(n) for n in COLAB_TOOLS}
    need, warn = [], []
    for line in Path(requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name, have = _norm(req.name), installed.get(_norm(req.name))
        if name in tools or (have is not None and req.specifier.contains(have, prereleases=True)):
            continue
        if name in keep:
            found = f"{have} is outside" if have else "is missing, needs"
            warn.append(f"{req.name} {found} {req.specifier}: Colab's own, left as it is "
                        "(if a cell fails, see README, 'Colab')")
        else:
            need.append(str(req))
    return need, warn


def colab_setup(requirements=ROOT / "requirements.txt", run=None) -> list[str]:
    """In Colab, pip-install what colab_plan finds missing (today's Colab: nothing), with COLAB_KEEP
    held at Colab's versions; print what was installed and how long it took. Elsewhere do nothing.
    Returns the pip command ([] when none). RLHF_COLAB_NO_INSTALL=1 prints and returns it without
    running it (tests/test_colab.py runs the notebooks' Colab cell offline that way)."""
    import time
    if not in_colab():
        return []
    t0 = time.perf_counter()
    need, warn = colab_plan(requirements)
    for w in warn:
        print("Colab set-up: WARNING", w)
    if not need:
        print(f"Colab set-up: nothing to install, Colab has every package at a supported version "
              f"({time.perf_counter() - t0:.1f} s)")
        return []
    # pip may not move what Colab keeps while it installs the rest: a constraint per kept package
    # (else upgrading transformers could pull a new huggingface_hub or numpy with it)
    from importlib import metadata
    pins = []
    for name in COLAB_KEEP + COLAB_TOOLS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    held = Path(os.environ.get("TMPDIR", "/tmp"), "tiny-rlhf-colab-keep.txt")
    held.write_text("\n".join(pins) + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", str(held), *need]
    if os.environ.get("RLHF_COLAB_NO_INSTALL") not in (None, "", "0"):
        print("Colab set-up: would install", " ".join(need), "(RLHF_COLAB_NO_INSTALL is set)")
        return cmd
    import subprocess
    (run or subprocess.check_call)(cmd)
    print(f"Colab set-up: installed {' '.join(need)} ({time.perf_counter() - t0:.0f} s)")
    return cmd


def progress(iterable, **kwargs):
    """A progress bar: a notebook widget when interactive, plain text lines under `make run`
    (RLHF_TEXT_PROGRESS=1), so saved notebooks show the final state instead of an empty widget."""
    from accelerate import PartialState
    # under `accelerate launch` one bar, not one per process
    if not PartialState().is_main_process:
        kwargs["disable"] = True
    if os.environ.get("RLHF_TEXT_PROGRESS"):
        from tqdm import tqdm as text_tqdm
        return text_tqdm(iterable, file=sys.stdout, mininterval=30, ncols=110, **kwargs)
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def quiet_hf() -> None:
    """Hide transformers' own per-load progress bars (loading and writing a tiny model needs
    none)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------- device and processes


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    from transformers import set_seed as hf_set_seed
    hf_set_seed(seed)


def get_device():
    """CUDA, else Apple MPS, else CPU (accelerate decides); printed so the reader knows."""
    from accelerate import PartialState
    device = PartialState().device
    extra = " (Google Colab)" if in_colab() else ""
    print(f"device: {device}{extra}")
    return device


_ACCELERATOR = []


def accelerator():
    """The run's accelerate.Accelerator. In a notebook (one process) it changes nothing; under
    `accelerate launch` or torchrun it wraps the model for data parallelism over processes (DDP)."""
    if not _ACCELERATOR:
        from accelerate import Accelerator
        # precision is ours (Config.precision, see run_in_precision), not a launcher's: one
        # autocast, one scaler
        _ACCELERATOR.append(Accelerator(mixed_precision="no"))
    return _ACCELERATOR[0]


def unwrap(model):
    """The model inside an accelerate/DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def my_share(idx: list) -> list:
    """This process's part of a batch: with N processes each takes every N-th example, so the
    global batch (and the learning-rate schedule) stays what the config says."""
    acc = accelerator()
    return idx[acc.process_index::acc.num_processes]


def global_sum(n: int) -> int:
    """n summed over every process (n itself when there is one)."""
    acc = accelerator()
    if acc.num_processes == 1:
        return n
    import torch
    return int(acc.reduce(torch.tensor(n, device=acc.device), reduction="sum"))


def free_memory() -> None:
    """Give back what deleted models held: Python's garbage, accelerate's references, CUDA's cached
    blocks (the next stage, or a notebook run after this one in the same runtime, gets the GPU
    memory back)."""
    import gc
    import torch
    accelerator().free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
