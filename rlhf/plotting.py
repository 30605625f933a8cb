"""What a notebook shows besides numbers: a training history as small plots, a function's source,
and a sentence about a run checked against that run (expect). util re-exports these names."""
from __future__ import annotations


def plot_history(history: list[dict], x: str, panels: list[list[str]], title: str = "", path=None):
    """One small plot per panel (several series per panel) of a training history."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for k in keys:
            pts = [(h[x], h[k]) for h in history if h.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
        ax.set_xlabel(x)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def show_source(fn) -> None:
    """Show a function's source as it runs: a highlighted code block in a notebook, plain text
    elsewhere."""
    import inspect
    src = inspect.getsource(fn)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    # a notebook kernel (or IPython shell)
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(f"```python\n{src}```"))
    else:
        print(src)


# the words expect() prints: tests/test_notebook_claims.py fails on a committed notebook that
# shows MISSED, so a recipe change that makes a sentence false fails make test
SEEN, MISSED = "seen in this run:", "NOT seen in this run:"


def expect(holds, claim: str, otherwise: str = "") -> bool:
    """A notebook's sentence about its run, checked on the run's own numbers: prints the claim as
    seen, or as not seen with what that means (a message, not an error that stops the notebook)."""
    holds = bool(holds)
    why = f" ({otherwise})" if otherwise and not holds else ""
    print(f"{SEEN if holds else MISSED} {claim}{why}")
    return holds
