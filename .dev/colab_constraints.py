"""Writes constraints/colab-<YYYY-MM>.txt from Colab's published package list.

Colab publishes its runtime's packages in the public repository googlecolab/backend-info
(pip-freeze.gpu.txt, os-info-gpu.txt). To refresh the snapshot when Colab moves:

    python .dev/colab_constraints.py path/to/pip-freeze.gpu.txt --date 2026-08-19 --commit a724079

then point COLAB_CONSTRAINTS in the Makefile at the new file and run `make test-colab`.
Kept: every `name==version` line. Dropped: torch and its CUDA builds (torchvision, torchaudio, triton,
nvidia-*, cuda-*), which a CPU machine replaces by its own torch; pip, setuptools and wheel, the
installer's own tools (the local torch 2.13 needs setuptools>=77, Colab has 75.2); and lines installed
from a URL or a file (`name @ ...`: google-colab itself, Colab's kernel gateway), which no registry serves."""
import argparse
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DROP = re.compile(r"(torch\w*|triton|nvidia-[\w-]+|cuda-[\w-]+|jax-cuda[\w-]+|pip|setuptools|wheel)==", re.I)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("freeze")
    ap.add_argument("--date", required=True, help="the freeze's commit date, YYYY-MM-DD")
    ap.add_argument("--commit", required=True, help="its commit in googlecolab/backend-info")
    a = ap.parse_args()
    lines = Path(a.freeze).read_text().splitlines()
    keep = [ln.strip() for ln in lines if "==" in ln and " @ " not in ln and not DROP.match(ln.strip())]
    dropped = sorted({ln.split("==")[0].split(" @ ")[0] for ln in lines
                      if ln.strip() and not ln.startswith("#") and ln.strip() not in keep})
    head = [f"# Google Colab's GPU runtime as published on {a.date} (googlecolab/backend-info, commit",
            f"# {a.commit}, pip-freeze.gpu.txt; Python 3.13 there). Written by .dev/colab_constraints.py.",
            *textwrap.wrap("Not here: " + ", ".join(dropped) + ".", 98, initial_indent="# ",
                           subsequent_indent="# ", break_on_hyphens=False),
            "# (torch and its CUDA packages: a CPU machine keeps its own torch; pip/setuptools/wheel: the",
            "# installer's tools; URL installs: no registry.)"]
    out = ROOT / "constraints" / f"colab-{a.date[:7]}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(head + keep) + "\n")
    print(f"{out.relative_to(ROOT)}: {len(keep)} pins, {len(dropped)} dropped")


if __name__ == "__main__":
    main()
