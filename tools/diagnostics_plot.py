"""Plots of the per-layer optimizer diagnostics (``train.diagnostics``) of several runs side by side.

``plot_diagnostic(runs, name, path)`` draws one diagnostic of every run in ``runs`` ({label: workdir}):

- ``name`` = a metric (``update_ratio``): one panel per kind of parameter group (embeddings, attention qkv,
  ..., norms), each run's mean over the layers as a line and the range over the layers as a band;
- ``name`` = ``metric/group`` (``update_ratio/attn_qkv.03``): that group alone, one line per run.

``tools.compare`` draws the ones named in ``compare.diagnostics`` for each optimizer's best rate (seed 0).
"""
from __future__ import annotations

import math
from collections import defaultdict

from infra.files import save_figure
from train.diagnostics import KINDS, METRICS


def check_name(name: str) -> None:
    """A ValueError unless ``name`` is a diagnostic metric, optionally with a group."""
    metric = name.partition("/")[0]
    if metric not in METRICS:
        raise ValueError(f"{name!r} is not a diagnostic: the metrics are {', '.join(METRICS)} (optionally "
                         f"/<group>, e.g. update_ratio/attn_qkv.00)")


def read_series(workdir: str, metric: str) -> dict[str, list[tuple[int, float]]]:
    """{group: [(step, value), ...]} of one metric in a run's metrics.jsonl."""
    from infra.metrics import read_metrics

    series = defaultdict(list)
    for row in read_metrics(workdir):
        for key, value in row.items():
            if key.startswith(metric + "/"):
                series[key.split("/", 1)[1]].append((row["step"], value))
    return dict(series)


def _panels(series: dict, group: str) -> dict[str, list[str]]:
    """{panel title: the groups it aggregates}: the one group asked for, else one panel per kind."""
    if group:
        return {group: [group]} if group in series else {}
    by_kind = {kind: sorted(g for g in series if g.split(".")[0] == kind) for kind in KINDS}
    return {kind: groups for kind, groups in by_kind.items() if groups}


def plot_diagnostic(runs: dict[str, str], name: str, path: str) -> None:
    """One diagnostic of every run (see the module docstring) into ``path`` (PNG); a ValueError when no run
    logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    check_name(name)
    metric, _, group = name.partition("/")
    series = {label: read_series(workdir, metric) for label, workdir in runs.items()}
    panels = {}
    for s in series.values():
        panels.update(_panels(s, group))
    if not panels:
        raise ValueError(f"no run logged {name}: train with --config.diagnostics_every=N")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, _) in zip(axes.flat, panels.items()):
        for label, s in series.items():
            groups = _panels(s, group).get(title, [])
            if not groups:
                continue
            steps = sorted(set.intersection(*(set(step for step, _ in s[g]) for g in groups)))
            values = np.array([[dict(s[g])[step] for step in steps] for g in groups])
            line, = ax.plot(steps, values.mean(0), label=label)
            if len(groups) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        ax.set(title=title, xlabel="step", yscale="linear" if metric == "update_cos" else "log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    how = "" if group else ": mean over layers, band = range over layers"
    fig.suptitle(f"{metric}{how}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
