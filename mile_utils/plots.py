"""The plots and browsers the chapters share (matplotlib + seaborn): each takes records or a tidy DataFrame
and returns the ``Axes``/``Figure`` it drew; every axis names its unit; sizes keep labels legible at the
book's page width (about 8 inches)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

METRIC_LABELS = {"open": "open", "closed": "closed", "global": "global (all questions)"}
METHOD_PALETTE = {"F": "#9e9e9e", "T": "#3b3b98", "lora": "#e15759", "prefix": "#59a14f", "ia3": "#f28e2b",
                  "ptv2": "#76b7b2", "mixed": "#b07aa1"}  # one colour per adaptation, the same in every chapter
SPEC_LABEL = "configuration (ViT / JTM / decoder)"


def set_style() -> None:
    """The book's plot style: seaborn's whitegrid, fonts legible at page width."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=1.0)
    plt.rcParams.update({"figure.figsize": (8, 4), "figure.dpi": 100, "axes.titleweight": "bold",
                         "axes.titlesize": 12, "legend.fontsize": 10})


def sample_grid(samples: Sequence[Mapping[str, Any]], ncols: int = 4, width: float = 2.2, wrap: int = 30) -> Figure:
    """Images (``image``) with ``question``, ``answer`` and, when present, ``prediction`` and types."""
    if not samples:
        raise ValueError("sample_grid: no samples to show")
    ncols = min(ncols, len(samples))
    nrows = -(-len(samples) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * nrows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(sample["image"], cmap="gray")  # a PIL image or an (H, W[, 3]) array
        lines = textwrap.wrap(f"Q: {sample['question']}", wrap)[:3] + [f"A: {sample['answer']}"]
        if "prediction" in sample:
            lines.append(f"predicted: {sample['prediction']}")
        ax.set_title(" · ".join(str(sample[k]) for k in ("content_type", "answer_type") if sample.get(k)),
                     fontsize=9)
        ax.text(0.0, -0.04, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9)
    fig.tight_layout()
    return fig


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str | None, legend: str | None = None) -> Axes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(ax.get_legend_handles_labels()[1]) > 1:  # a one-entry legend says nothing the title does not
        ax.legend(title=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    elif ax.get_legend() is not None:
        ax.get_legend().remove()
    if title:
        ax.set_title(title)
    return ax


def count_bars(values: Iterable[Any], xlabel: str, ylabel: str = "questions", top: int | None = None,
               hue: Iterable[Any] | None = None, hue_label: str | None = None, title: str | None = None,
               horizontal: bool = False) -> Axes:
    """Counts of each value (question types, answers), most frequent first; ``top`` keeps the top ones."""
    frame = pd.DataFrame({"value": list(values)})
    if hue is not None:
        frame[hue_label or "group"] = list(hue)
    order = frame["value"].value_counts().index.tolist()[:top]
    frame = frame[frame["value"].isin(order)]
    ax = plt.subplots(figsize=(8, 0.3 * len(order) + 1.2) if horizontal else (8, 4))[1]
    kwargs = {"hue": hue_label or "group"} if hue is not None else {"color": "#4e79a7"}
    sns.countplot(data=frame, order=order, ax=ax, **{"y" if horizontal else "x": "value"}, **kwargs)
    if not horizontal:
        ax.tick_params(axis="x", rotation=30)
        plt.setp(ax.get_xticklabels(), horizontalalignment="right")
    return _finish(ax, ylabel if horizontal else xlabel, xlabel if horizontal else ylabel, title, hue_label)


def accuracy_bars(table: pd.DataFrame, label: str = "run", metrics: Sequence[str] = ("open", "closed", "global"),
                  title: str | None = None, floors: Mapping[str, float] | None = None) -> Axes:
    """Horizontal grouped bars: accuracy (%) of each configuration (``label``) on open, closed and all
    questions; ``floors`` ({name: accuracy}) are drawn as dashed reference lines (e.g. the majority answer)."""
    missing = [c for c in (label, *metrics) if c not in table.columns]
    if missing:
        raise ValueError(f"accuracy_bars: table has no column(s) {missing}; columns are {list(table.columns)}")
    long = table.melt(id_vars=[label], value_vars=list(metrics), var_name="questions", value_name="accuracy")
    long["questions"] = long["questions"].map(lambda m: METRIC_LABELS.get(m, m))
    ax = plt.subplots(figsize=(8, max(3.0, 0.75 * len(table) + 1.4)))[1]
    sns.barplot(data=long, y=label, x="accuracy", hue="questions", ax=ax, palette="Set2")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=9, padding=2)
    for (name, value), style in zip(({} if floors is None else floors).items(), ("--", ":"), strict=False):
        ax.axvline(value, ls=style, color="black", lw=1, label=f"{name} ({value:.1f}%)")
    ax.set_xlim(0, 109)
    return _finish(ax, "accuracy (%)", SPEC_LABEL if label in ("run", "spec") else label, title, "questions")


def grouped_bars(table: pd.DataFrame, x: str, y: str, hue: str, xlabel: str, ylabel: str,
                 title: str | None = None, ylim: tuple[float, float] | None = (0, 105), fmt: str = "%.1f") -> Axes:
    """Bars of ``y`` for each ``x``, one colour per ``hue`` (e.g. accuracy per configuration and rank)."""
    ax = plt.subplots(figsize=(min(9.0, max(6.0, 1.1 * table[x].nunique() + 2)), 4))[1]
    sns.barplot(data=table.assign(**{hue: table[hue].astype(str)}), x=x, y=y, hue=hue, ax=ax, palette="Set2")
    for container in ax.containers:
        ax.bar_label(container, fmt=fmt, fontsize=9, padding=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if table[x].astype(str).str.len().max() > 8:
        ax.tick_params(axis="x", rotation=25)
        plt.setp(ax.get_xticklabels(), horizontalalignment="right")
    return _finish(ax, xlabel, ylabel, title, hue if table[hue].nunique() > 1 else None)


def accuracy_heatmap(table: pd.DataFrame, index: str, columns: str, value: str = "global",
                     title: str | None = None, cbar_label: str | None = None) -> Axes:
    """A heatmap of ``value`` (accuracy, %) by ``index`` x ``columns``; the colour scale spans the data's range
    (rounded out to 5 points) so that differences of a few points are visible."""
    grid = table.pivot_table(index=index, columns=columns, values=value, aggfunc="mean", sort=False)
    lo, hi = np.floor(np.nanmin(grid.values) / 5) * 5, np.ceil(np.nanmax(grid.values) / 5) * 5
    ax = plt.subplots(figsize=(min(8.0, 1.3 * grid.shape[1] + 3.5), 0.4 * grid.shape[0] + 1.6))[1]
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", vmin=lo, vmax=max(hi, lo + 5), ax=ax,
                linewidths=0.5, cbar_kws={"label": cbar_label or f"{METRIC_LABELS.get(value, value)} accuracy (%)"})
    return _finish(ax, columns, index, title)


def tradeoff(table: pd.DataFrame, x: str, y: str = "global", hue: str | None = "method", label: str = "run",
             xlabel: str | None = None, logx: bool = False, title: str | None = None,
             floors: Mapping[str, float] | None = None) -> Axes:
    """Accuracy against a cost (trainable %, memory), one point per run, coloured by ``hue``. Only the runs
    on the Pareto front (no cheaper run is as accurate) are labelled, so labels do not pile up."""
    ax = plt.subplots(figsize=(8, 4.5))[1]
    palette = METHOD_PALETTE if hue and set(table[hue]) <= set(METHOD_PALETTE) else None
    sns.scatterplot(data=table, x=x, y=y, hue=hue, style=hue, s=70, ax=ax, palette=palette)
    best = -np.inf
    for _, row in table.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            best = row[y]
            ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(5, 5), fontsize=9)
    for (name, value), style in zip(({} if floors is None else floors).items(), ("--", ":"), strict=False):
        ax.axhline(value, ls=style, color="black", lw=1, label=f"{name} ({value:.1f}%)")
    if logx:
        ax.set_xscale("log")
    return _finish(ax, xlabel or x, f"{METRIC_LABELS.get(y, y)} accuracy (%)", title, hue or " ")


def paper_comparison(table: pd.DataFrame, label: str = "run", ours_label: str = "this book",
                     paper_label: str = "paper (published)", title: str | None = None) -> Axes:
    """Paired horizontal bars: our global accuracy (``ours``) and the paper's (``paper``) per configuration."""
    long = table.melt(id_vars=[label], value_vars=["ours", "paper"], var_name="source", value_name="accuracy")
    long["source"] = long["source"].map({"ours": ours_label, "paper": paper_label})
    ax = plt.subplots(figsize=(8, 0.45 * len(table) + 1.5))[1]
    sns.barplot(data=long, y=label, x="accuracy", hue="source", ax=ax,
                palette={ours_label: "#4e79a7", paper_label: "#bab0ac"})
    ax.set_xlim(0, 100)
    return _finish(ax, "global accuracy (%)", SPEC_LABEL, title, "source")


def loss_curves(histories: Mapping[str, Sequence[float]], title: str | None = None,
                ylabel: str = "training loss (label-smoothed CE)") -> Axes:
    """One line per run: its per-epoch loss history, keyed by the run's label; epochs on integer ticks."""
    ax = plt.subplots(figsize=(8, 4))[1]
    for name, values in histories.items():
        ax.plot(range(1, len(values) + 1), list(values), marker="o", ms=4, label=name)
    ax.set_xlim(0.5, max(map(len, histories.values()), default=1) + 0.5)  # whole epochs, even for one
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(ax, "epoch", ylabel, title, "run")


def samples_table(samples: Sequence[Mapping[str, Any]], by: str = "content_type", per_group: int = 2,
                  columns: Sequence[str] = ("question", "answer")) -> pd.DataFrame:
    """The first ``per_group`` samples of each ``by`` group as a table: the static stand-in for a browser."""
    frame = pd.DataFrame([{by: s[by], **{c: s.get(c) for c in columns}} for s in samples])
    return frame.groupby(by, sort=True).head(per_group).sort_values(by, kind="stable").set_index(by)


def sample_browser(samples: Sequence[Mapping[str, Any]], by: str = "content_type", per_page: int = 4,
                   load_image: Any = None, columns: Sequence[str] = ("question", "answer"),
                   interactive: bool = True) -> Any:
    """An ipywidgets browser (choose a ``by`` group, page through its samples), or with ``interactive=False``
    its static stand-in, :func:`samples_table`, which headless runs (papermill, nbval) must ask for: nbclient can
    deadlock on widgets. Pages are PNGs in an ``Image`` widget (no ``Output`` widget, no ``clear_output``);
    ``load_image(sample)`` supplies images when samples carry none (loaded per page)."""
    if not interactive:
        return samples_table(samples, by=by, columns=columns)
    import ipywidgets as widgets

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        groups.setdefault(str(s[by]), []).append(s)
    if not groups:
        raise ValueError("sample_browser: no samples")
    choice = widgets.Dropdown(options=sorted(groups), description=by.replace("_", " "))
    page = widgets.IntSlider(min=0, max=0, description="page")
    caption, picture = widgets.HTML(), widgets.Image(format="png")

    def draw(*_: Any) -> None:
        items = groups[choice.value]
        page.max = max(0, (len(items) - 1) // per_page)
        shown = items[page.value * per_page:(page.value + 1) * per_page]
        fig = sample_grid([{**s, "image": load_image(s)} if load_image else s for s in shown], ncols=per_page)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        caption.value = f"{len(items)} samples with {by} = <b>{choice.value}</b>"
        picture.value = buffer.getvalue()

    choice.observe(draw, names="value")
    page.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([choice, page]), caption, picture])


def run_labels(table: pd.DataFrame) -> pd.Series:
    """A short label per run: the spec, plus the rank for LoRA runs (``F/lora/lora r4``)."""
    def label(row: pd.Series) -> str:
        if "lora" in str(row["spec"]).split("/") and pd.notna(row.get("rank")):
            return f"{row['spec']} r{int(row['rank'])}"
        return str(row["spec"])

    return table.apply(label, axis=1)
