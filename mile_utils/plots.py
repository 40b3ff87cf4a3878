"""The chapters' plots and browsers (matplotlib + seaborn): each returns the ``Axes``/``Figure`` it drew; every
axis names its unit, every accuracy has its 95 % interval; sizes keep labels legible at the page's 8 inches."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# one colour per adaptation, the same in every chapter; chapter 10's newer methods: tab10 less the paper's colours
PALETTE = {"F": "#9e9e9e", "T": "#3b3b98", "lora": "#e15759", "prefix": "#59a14f", "ia3": "#f28e2b", "ptv2": "#76b7b2",
           "dora": "#1f77b4", "vera": "#9467bd", "loha": "#8c564b", "lokr": "#e377c2", "adalora": "#17becf",
           "oft": "#bcbd22", "ln": "#000000"}
SPEC_LABEL = "configuration (ViT / JTM / decoder)"


def sample_grid(samples: Sequence[Mapping[str, Any]], ncols: int = 4) -> Figure:
    """Images (``image``) with ``question``, ``answer`` and, when present, ``prediction`` and types."""
    if not samples:
        raise ValueError("sample_grid: no samples to show")
    ncols, nrows = min(ncols, len(samples)), -(-len(samples) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 3.52 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(sample["image"], cmap="gray")  # a PIL image or an (H, W[, 3]) array
        lines = textwrap.wrap(f"Q: {sample['question']}", 30)[:3] + [f"A: {sample['answer']}"] + (
            [f"predicted: {sample['prediction']}"] if "prediction" in sample else [])
        ax.set_title(" · ".join(str(sample[k]) for k in ("content_type", "answer_type") if sample.get(k)), fontsize=9)
        ax.text(0.0, -0.04, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9)
    fig.tight_layout()
    return fig


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str | None, legend: str | None = None) -> Axes:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:  # seaborn's own: replaced by one under the plot
        ax.get_legend().remove()
    if len(labels) > 1:  # under the plot (beside it, it would shrink the fonts at page width); one entry says nothing
        ax.figure.set_layout_engine("constrained")
        ax.figure.legend(handles, labels, title=legend, loc="outside lower center", frameon=False,
                         ncol=max(1, min(4, len(labels), 80 // (max(map(len, labels)) + 8))))  # within the width
    return ax


def _floor_lines(ax: Axes, floors: Mapping[str, float] | None, vertical: bool = True) -> None:
    for (name, value), style in zip(({} if floors is None else floors).items(), ("--", ":"), strict=False):
        (ax.axvline if vertical else ax.axhline)(value, ls=style, color="black", lw=1, label=f"{name} ({value:.1f}%)")


def accuracy_bars(table: pd.DataFrame, label: str = "run", metrics: Sequence[str] = ("open", "closed", "global"),
                  title: str | None = None, floors: Mapping[str, float] | None = None, hue: str | None = None) -> Axes:
    """Horizontal bars of accuracy (%) per ``label`` with 95 % error bars (``<metric>_low/_high``; NaN: none, as
    a published number), one per metric or per ``hue`` group of the one metric; ``floors`` ({name: %}) as lines."""
    if missing := [c for c in (label, hue or label, *(m + e for m in metrics for e in ("", "_low", "_high")))
                   if c not in table.columns]:
        raise ValueError(f"accuracy_bars: table has no column(s) {missing}; columns are {list(table.columns)}")
    groups = ([(str(g), part, metrics[0]) for g, part in table.groupby(hue, sort=False)] if hue else
              [("global (all questions)" if m == "global" else m, table, m) for m in metrics])
    rows, height = list(dict.fromkeys(table[label].astype(str))), 0.8 / len(groups)
    ax = plt.subplots(figsize=(8, max(2.5, (0.2 + 0.18 * len(groups)) * len(rows) + 1.2)))[1]
    for i, ((name, part, m), colour) in enumerate(zip(groups, sns.color_palette("Set2"), strict=False)):
        y = np.array([rows.index(str(v)) for v in part[label]]) + (i - (len(groups) - 1) / 2) * height
        acc = part[m].to_numpy(float)
        err = np.abs([acc - part[m + "_low"].to_numpy(float), part[m + "_high"].to_numpy(float) - acc])
        ax.barh(y, acc, height, xerr=err, color=colour, label=name, error_kw={"lw": 1, "capsize": 2})
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlim=(0, 100), ylim=(len(rows) - 0.5, -0.5))  # first row on top
    _floor_lines(ax, floors)
    return _finish(ax, "accuracy (%), 95% interval", SPEC_LABEL if label in ("run", "spec") else label, title,
                   hue or "questions")


def tradeoff(table: pd.DataFrame, x: str, y: str = "global", hue: str = "method", style: str | None = None,
             label: str | None = "run", xlabel: str | None = None, logx: bool = False, title: str | None = None,
             floors: Mapping[str, float] | None = None) -> Axes:
    """Accuracy (95 % interval: ``<y>_low/_high``) against a cost, a point per run (colour ``hue``, marker ``style``).
    With ``label`` only the Pareto front (no cheaper run as accurate) is labelled, so labels stay apart."""
    ax = plt.subplots(figsize=(8, 5.5 if style else 4.5))[1]
    ax.errorbar(table[x], table[y], yerr=np.abs([table[y] - table[y + "_low"], table[y + "_high"] - table[y]]),
                fmt="none", ecolor="#bbbbbb", lw=1, zorder=1)
    sns.scatterplot(data=table, x=x, y=y, hue=hue, style=style or hue, s=70, ax=ax, zorder=2,  # the book's colours
                    palette=PALETTE if set(table[hue]) <= set(PALETTE) else None)  # where every point has one
    if label:
        ranked = table.sort_values([x, y], ascending=[True, False])
        for _, row in ranked[ranked[y] > ranked[y].cummax().shift(fill_value=-np.inf)].iterrows():  # Pareto front
            ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(5, 5), fontsize=9)
    _floor_lines(ax, floors, vertical=False)
    if logx:  # plain numbers on the decades ("0.1", "10"), not 10^-1
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter("{x:g}")
    return _finish(ax, xlabel or x, f"{y} accuracy (%), 95% interval", title, None if style else hue)


def loss_curves(runs: pd.DataFrame, label: str = "run", title: str | None = None) -> Axes:
    """One line per run of a :func:`mile_utils.book.run` table: its per-epoch ``losses``, named by ``label``."""
    ax = plt.subplots(figsize=(8, 4))[1]
    for name, values in zip(runs[label], runs["losses"], strict=True):
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=4, label=name)
    ax.set_xlim(0.5, max(map(len, runs["losses"]), default=1) + 0.5)  # whole epochs, even for one
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(ax, "epoch", "training loss (label-smoothed CE)", title, label)


def sample_browser(samples: Sequence[Mapping[str, Any]], by: str = "content_type", per_page: int = 4,
                   load_image: Any = None, columns: Sequence[str] = ("question", "answer"),
                   interactive: bool = True) -> Any:
    """An ipywidgets browser of ``by`` groups (PNG pages in an ``Image`` widget, not ``Output``; ``load_image(sample)``
    for samples without images), or with ``interactive=False`` a table: nbclient can deadlock on widgets."""
    if not samples:
        raise ValueError("sample_browser: no samples")
    if not interactive:  # the first two samples of each group
        frame = pd.DataFrame([{by: s[by], **{c: s.get(c) for c in columns}} for s in samples])
        return frame.groupby(by, sort=True).head(2).sort_values(by, kind="stable").set_index(by)
    import ipywidgets as widgets
    groups = {g: [s for s in samples if str(s[by]) == g] for g in sorted({str(s[by]) for s in samples})}
    choice = widgets.Dropdown(options=list(groups), description=by.replace("_", " "))
    page, caption, picture = widgets.IntSlider(min=0, max=0, description="page"), widgets.HTML(), widgets.Image()

    def draw(*_: Any) -> None:
        items = groups[choice.value]
        page.max = max(0, (len(items) - 1) // per_page)
        shown = items[page.value * per_page:(page.value + 1) * per_page]
        fig = sample_grid([{**s, "image": load_image(s)} if load_image else s for s in shown], ncols=per_page)
        fig.savefig(buffer := io.BytesIO(), format="png", bbox_inches="tight")
        plt.close(fig)
        caption.value, picture.value = f"{len(items)} samples with {by} = <b>{choice.value}</b>", buffer.getvalue()
    for widget in (choice, page):
        widget.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([choice, page]), caption, picture])


def run_labels(table: pd.DataFrame) -> pd.Series:
    """A short label per run: the spec, plus the rank for LoRA runs (``F/lora/lora r4``)."""
    ranks = table["rank"] if "rank" in table.columns else [None] * len(table)
    return pd.Series([f"{s} r{int(r)}" if "lora" in str(s).split("/") and pd.notna(r) else str(s)
                      for s, r in zip(table["spec"], ranks, strict=True)], index=table.index)
