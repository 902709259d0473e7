"""Human-readable outputs: markdown tables and PNG plots of scores, allocations, expert layouts, evaluations.

Scores of different tasks live on different scales, so plots and the side-by-side table
also show each profile normalised to sum 1 ("share of the total"), which is what the
allocations depend on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from layerif_plugins.errors import ConfigError
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
    if len(series) > 1:  # outside the axes, right: it never hides a bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
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


# ---------------------------------------------------------------- allocations, expert layouts, evaluations


def _series_table(series: Mapping[str, Sequence[float | int]], first: str = "layer") -> str:
    """Layers as rows, one column per named series (missing entries left blank)."""
    n = max(len(v) for v in series.values())
    rows = [[i] + [v[i] if i < len(v) else "" for v in series.values()] for i in range(n)]
    return markdown_table([first, *series], rows)


def allocations_markdown(allocations: Mapping[str, Sequence[float]], with_mean: bool = True) -> str:
    """Per-layer sparsity ratios of several methods side by side, plus their unweighted mean."""
    if not allocations:
        raise ConfigError("no allocations to tabulate")
    table = _series_table({k: [float(x) for x in v] for k, v in allocations.items()})
    if with_mean:
        means = [sum(v) / len(v) if len(v) else 0.0 for v in allocations.values()]
        table += "\n| mean | " + " | ".join(f"{m:.4g}" for m in means) + " |"
    return table


def plot_allocations(
    allocations: Mapping[str, Sequence[float]], path: str | Path, title: str = "per-layer sparsity",
    ylabel: str = "sparsity",
) -> Path:
    """Grouped bars: the sparsity of every decoder layer under each method."""
    if not allocations:
        raise ConfigError("no allocations to plot")
    return plot_bars([list(map(float, v)) for v in allocations.values()], list(allocations), path, title, ylabel)


def experts_markdown(layouts: Mapping[str, Sequence[int]], top_k: Mapping[str, Sequence[int]] | None = None) -> str:
    """Experts per layer for each layout (``n (top-k)`` when top-k is given) and each layout's total."""
    if not layouts:
        raise ConfigError("no expert layouts to tabulate")
    series: dict[str, list[str | int]] = {}
    for name, counts in layouts.items():
        ks = (top_k or {}).get(name)
        series[name] = [f"{c} (top-{ks[i]})" if ks else int(c) for i, c in enumerate(counts)]
    n = max(len(v) for v in series.values())
    rows: list[list[object]] = [[i] + [v[i] if i < len(v) else "" for v in series.values()] for i in range(n)]
    rows.append(["total", *(sum(int(c) for c in layouts[k]) for k in series)])
    return markdown_table(["layer", *series], rows)


def plot_expert_layouts(
    layouts: Mapping[str, Sequence[int]], path: str | Path, title: str = "LoRA experts per layer"
) -> Path:
    if not layouts:
        raise ConfigError("no expert layouts to plot")
    return plot_bars([list(map(float, v)) for v in layouts.values()], list(layouts), path, title, "experts")


def _task_metrics(result: Any) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from an lm-eval adapter EvalResult, its ``to_dict()``, or that mapping itself."""
    tasks = result.tasks if hasattr(result, "tasks") else result.get("tasks", result)
    out = {}
    for name, t in tasks.items():
        metrics = t.metrics if hasattr(t, "metrics") else t.get("metrics", t)
        out[name] = {m: float(v) for m, v in metrics.items()}
    return out


def eval_markdown(
    results: Mapping[str, Any],
    metrics: Sequence[str] | None = None,
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """One row per model, one column per ``task metric`` (all of them unless ``metrics`` filters).

    ``results`` maps a model label to an EvalResult (or its dict); ``extra`` adds columns
    per model (e.g. measured sparsity) before the metrics.
    """
    if not results:
        raise ConfigError("no evaluation results to tabulate")
    per_model = {label: _task_metrics(r) for label, r in results.items()}
    columns: list[tuple[str, str]] = []
    for tasks in per_model.values():
        for task, ms in tasks.items():
            for m in ms:
                if (metrics is None or m in metrics) and (task, m) not in columns and not m.endswith("_stderr"):
                    columns.append((task, m))
    extra_cols = list(dict.fromkeys(k for e in (extra or {}).values() for k in e))
    header = ["model", *extra_cols, *(f"{t} {m}" for t, m in columns)]
    rows = []
    for label, tasks in per_model.items():
        row: list[object] = [label, *((extra or {}).get(label, {}).get(c, "") for c in extra_cols)]
        row += [tasks.get(t, {}).get(m, "") for t, m in columns]
        rows.append(row)
    return markdown_table(header, rows)


def plot_metric(
    values: Mapping[str, float], path: str | Path, title: str, ylabel: str, reference: float | None = None,
    reference_label: str = "chance",
) -> Path:
    """One bar per model for one metric (e.g. word perplexity); an optional horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not values:
        raise ConfigError("no values to plot")
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(values)), 3.4))
    ax.bar(range(len(values)), list(values.values()), color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), list(values), rotation=15)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def plot_sweep(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str, xlabel: str, ylabel: str,
    logy: bool = False, reference: float | None = None, reference_label: str = "",
) -> Path:
    """One line per method through ``(x, y)`` points, e.g. perplexity against sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series:
        raise ConfigError("no series to plot")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, points in series.items():
        xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label or None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def sweep_markdown(
    values: Mapping[str, Mapping[float, float]], lower_is_better: bool = True, xfmt: str = "{:.0%}",
    first: str = "method",
) -> str:
    """Methods as rows, x values (e.g. sparsities) as columns; the best value of each column in bold."""
    if not values:
        raise ConfigError("no values to tabulate")
    xs = sorted({x for v in values.values() for x in v})
    best = {}
    for x in xs:
        col = [v[x] for v in values.values() if x in v]
        if len(set(col)) > 1:  # a column of equal values (e.g. the shared dense baseline) has no winner
            best[x] = min(col) if lower_is_better else max(col)
    rows = []
    for name, v in values.items():
        cells: list[object] = [name]
        for x in xs:
            if x not in v:
                cells.append("")
            else:
                cell = f"{v[x]:.4g}"
                cells.append(f"**{cell}**" if x in best and v[x] == best[x] else cell)
        rows.append(cells)
    return markdown_table([first, *(xfmt.format(x) for x in xs)], rows)
