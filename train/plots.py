"""Loss-curve plots of a run, written next to its metrics."""
from __future__ import annotations


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from infra.files import join, resolve, save_figure  # noqa: E402
from infra.metrics import read_metrics  # noqa: E402


def plot_losses(workdir: str, reference: float | None = None, title: str = "") -> str:
    """Train and eval loss vs step into ``<workdir>/loss.png`` (``workdir`` may be a URI); ``reference``
    draws a horizontal line (the corpus's unigram entropy)."""
    rows = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=4)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=f"unigram entropy {reference:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or resolve(workdir).rstrip("/").rpartition("/")[2])
    ax.grid(alpha=0.3)
    ax.legend()
    path = join(workdir, "loss.png")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
