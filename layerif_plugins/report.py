"""Human-readable outputs: markdown tables and PNG plots of scores and allocations.

Scores of different tasks live on different scales, so plots and the side-by-side table
also show each profile normalised to sum 1 ("share of the total"), which is what the
allocations depend on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layerif_plugins.io import atomic_file
from layerif_plugins.scores import LayerScores


def normalized(scores: Sequence[float]) -> list[float]:
    total = sum(scores)
    return [s / total if total else 0.0 for s in scores]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align_right: bool = True) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits."""

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    sep = "|" + "|".join(("---:" if align_right else "---") for _ in header) + "|"
    lines = ["| " + " | ".join(header) + " |", sep]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def scores_markdown(scores: Sequence[LayerScores], labels: Sequence[str]) -> str:
    """Layers as rows; per file the raw score and its share of the total."""
    n_layers = scores[0].num_layers
    header = ["layer"]
    for label in labels:
        header += [f"{label} score", f"{label} share"]
    rows = []
    for layer in range(n_layers):
        row: list[object] = [layer]
        for s in scores:
            share = normalized(s.scores)
            row += [s.scores[layer], share[layer]] if layer < s.num_layers else ["", ""]
        rows.append(row)
    return markdown_table(header, rows)


def plot_bars(
    series: Sequence[Sequence[float]], labels: Sequence[str], path: str | Path, title: str, ylabel: str
) -> Path:
    """Grouped bar chart, one group per layer, one bar per series; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = max(len(s) for s in series)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n_layers * max(len(series), 1)), 3.6))
    for k, (values, label) in enumerate(zip(series, labels, strict=True)):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(values))]
        ax.bar(xs, values, width=width, label=label)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def plot_layer_scores(scores: Sequence[LayerScores], labels: Sequence[str], path: str | Path) -> Path:
    """Per-layer scores of several files side by side (each normalised to sum 1)."""
    return plot_bars(
        [normalized(s.scores) for s in scores],
        labels,
        path,
        title=f"{scores[0].method} per-layer scores ({scores[0].model.name_or_path.split('/')[-1]})",
        ylabel="share of total score",
    )
