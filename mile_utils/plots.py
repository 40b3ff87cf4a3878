"""The few plots and displays that several chapters of the book share (matplotlib + seaborn).

Each function takes plain records or a tidy ``pandas.DataFrame`` and returns the matplotlib ``Axes`` or
``Figure`` it drew, so a notebook can adjust a title or save the figure. Every axis carries a label with its
unit.
:class:`Provenance` renders the box that names the profile, dataset, hardware and versions behind a chapter's
numbers; it reads them from the runs' ``results.json``, never from the notebook.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

METRIC_LABELS = {"open": "open", "closed": "closed", "global": "global (all questions)"}
# one colour per adaptation, the same in every chapter
METHOD_PALETTE = {
    "F": "#9e9e9e",
    "T": "#3b3b98",
    "lora": "#e15759",
    "prefix": "#59a14f",
    "ia3": "#f28e2b",
    "ptv2": "#76b7b2",
    "mixed": "#b07aa1",
}


def set_style() -> None:
    """The book's plot style: seaborn's whitegrid, readable sizes, figures that fit the page width."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    plt.rcParams.update({"figure.figsize": (8, 4), "figure.dpi": 100, "axes.titleweight": "bold"})


def _image_array(image: Any) -> np.ndarray:
    """An (H, W) or (H, W, 3) float array in [0, 1] from a PIL image, array or CHW tensor."""
    if hasattr(image, "detach"):  # torch tensor, CHW
        image = image.detach().cpu().float().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = np.moveaxis(image, 0, -1)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def sample_grid(samples: Sequence[Mapping[str, Any]], ncols: int = 4, width: float = 3.0,
                wrap: int = 34) -> Figure:
    """Images with their question and answer underneath.

    ``samples``: mappings with ``image`` (PIL image, array or CHW tensor), ``question`` and ``answer``
    (optional ``content_type``, ``answer_type`` and ``prediction``, shown when present).
    """
    import textwrap

    if not samples:
        raise ValueError("sample_grid: no samples to show")
    ncols = min(ncols, len(samples))
    nrows = -(-len(samples) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * nrows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(_image_array(sample["image"]), cmap="gray", vmin=0, vmax=1)
        lines = textwrap.wrap(f"Q: {sample['question']}", wrap)[:3] + [f"A: {sample['answer']}"]
        if "prediction" in sample:
            lines.append(f"predicted: {sample['prediction']}")
        tags = [str(sample[k]) for k in ("content_type", "answer_type") if sample.get(k)]
        if tags:
            ax.set_title(" · ".join(tags), fontsize=9)
        ax.text(0.0, -0.04, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8.5)
    fig.tight_layout()
    return fig


def count_bars(values: Iterable[Any], xlabel: str, ylabel: str = "questions", top: int | None = None,
               hue: Iterable[Any] | None = None, hue_label: str | None = None, ax: Axes | None = None,
               horizontal: bool = False) -> Axes:
    """Counts of each value (question types, answers), most frequent first; ``top`` keeps the top ones."""
    frame = pd.DataFrame({"value": list(values)})
    if hue is not None:
        frame[hue_label or "group"] = list(hue)
    order = frame["value"].value_counts().index.tolist()[:top]
    frame = frame[frame["value"].isin(order)]
    if ax is None:
        ax = plt.subplots(figsize=(8, 0.28 * len(order) + 1.2) if horizontal else None)[1]
    kwargs = {"hue": hue_label or "group"} if hue is not None else {"color": "#4e79a7"}
    if horizontal:
        sns.countplot(data=frame, y="value", order=order, ax=ax, **kwargs)
        ax.set_xlabel(ylabel)
        ax.set_ylabel(xlabel)
    else:
        sns.countplot(data=frame, x="value", order=order, ax=ax, **kwargs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    return ax


def accuracy_bars(table: pd.DataFrame, label: str = "spec",
                  metrics: Sequence[str] = ("open", "closed", "global"), ax: Axes | None = None,
                  title: str | None = None, baseline: float | None = None,
                  baseline_label: str = "majority answer") -> Axes:
    """Grouped bars: accuracy (%) of each configuration (``label`` column) on open, closed and all questions.

    ``table`` holds one row per configuration with one column per metric (accuracy in percent). ``baseline``
    draws a dashed reference line (e.g. the majority-answer accuracy of the test split).
    """
    missing = [c for c in (label, *metrics) if c not in table.columns]
    if missing:
        raise ValueError(f"accuracy_bars: table has no column(s) {missing}; "
                         f"columns are {list(table.columns)}")
    long = table.melt(id_vars=[label], value_vars=list(metrics), var_name="questions", value_name="accuracy")
    long["questions"] = long["questions"].map(lambda m: METRIC_LABELS.get(m, m))
    ax = ax if ax is not None else plt.subplots(figsize=(max(6.0, 1.3 * len(table) + 2), 4))[1]
    sns.barplot(data=long, x=label, y="accuracy", hue="questions", ax=ax, palette="Set2")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=8, padding=1)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="black", lw=1, label=f"{baseline_label} ({baseline:.1f}%)")
    ax.set_ylim(0, 105)
    ax.set_xlabel("configuration (ViT / JTM / decoder)" if label == "spec" else label)
    ax.set_ylabel("accuracy (%)")
    ax.legend(title="questions", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return ax


def grouped_bars(table: pd.DataFrame, x: str, y: str, hue: str, xlabel: str, ylabel: str,
                 ax: Axes | None = None, title: str | None = None,
                 ylim: tuple[float, float] | None = (0, 105), fmt: str = "%.1f",
                 palette: str | Mapping[Any, str] | None = "Set2") -> Axes:
    """Bars of ``y`` for each ``x``, one colour per ``hue`` (e.g. accuracy per configuration and rank)."""
    ax = ax if ax is not None else plt.subplots(figsize=(max(6.0, 1.2 * table[x].nunique() + 2), 4))[1]
    frame = table.assign(**{hue: table[hue].astype(str)})
    sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax, palette=palette)
    for container in ax.containers:
        ax.bar_label(container, fmt=fmt, fontsize=8, padding=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(title=hue, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return ax


def accuracy_heatmap(table: pd.DataFrame, index: str, columns: str, value: str = "global",
                     ax: Axes | None = None, title: str | None = None, fmt: str = ".1f",
                     cbar_label: str | None = None) -> Axes:
    """A heatmap of ``value`` (accuracy, %) by ``index`` x ``columns``, e.g. configuration x question type."""
    grid = table.pivot_table(index=index, columns=columns, values=value, aggfunc="mean", sort=False)
    if ax is None:
        ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3, 0.42 * grid.shape[0] + 1.5))[1]
    sns.heatmap(grid, annot=True, fmt=fmt, cmap="viridis", vmin=0, vmax=100, ax=ax, linewidths=0.5,
                cbar_kws={"label": cbar_label or f"{METRIC_LABELS.get(value, value)} accuracy (%)"})
    ax.set_xlabel(columns)
    ax.set_ylabel(index)
    if title:
        ax.set_title(title)
    return ax


def tradeoff(table: pd.DataFrame, x: str, y: str = "global", hue: str | None = "method",
             label: str | None = "spec", ax: Axes | None = None, xlabel: str | None = None,
             ylabel: str | None = None, logx: bool = False, title: str | None = None) -> Axes:
    """Accuracy against a cost (trainable %, peak memory, time), one point per run, labelled by ``label``."""
    ax = ax if ax is not None else plt.subplots(figsize=(7, 4.5))[1]
    palette = METHOD_PALETTE if hue and set(table[hue]) <= set(METHOD_PALETTE) else None
    sns.scatterplot(data=table, x=x, y=y, hue=hue, style=hue, s=80, ax=ax, palette=palette)
    if label:
        for _, row in table.iterrows():
            ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or f"{METRIC_LABELS.get(y, y)} accuracy (%)")
    ax.set_ylim(-2, 102)
    if hue:
        ax.legend(title=hue, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return ax


def paper_comparison(table: pd.DataFrame, label: str = "spec", ours: str = "ours", paper: str = "paper",
                     ours_label: str = "this book", paper_label: str = "paper (published)",
                     metric_label: str = "global accuracy (%)", ax: Axes | None = None,
                     title: str | None = None) -> Axes:
    """Paired horizontal bars: our accuracy and the paper's published one for each configuration."""
    long = table.melt(id_vars=[label], value_vars=[ours, paper], var_name="source", value_name="accuracy")
    long["source"] = long["source"].map({ours: ours_label, paper: paper_label})
    ax = ax if ax is not None else plt.subplots(figsize=(8, 0.45 * len(table) + 1.5))[1]
    sns.barplot(data=long, y=label, x="accuracy", hue="source", ax=ax,
                palette={ours_label: "#4e79a7", paper_label: "#bab0ac"})
    ax.set_xlim(0, 100)
    ax.set_xlabel(metric_label)
    ax.set_ylabel("configuration (ViT / JTM / decoder)" if label == "spec" else label)
    ax.legend(title=None, loc="lower right", frameon=True)
    if title:
        ax.set_title(title)
    return ax


def loss_curves(histories: Mapping[str, Sequence[float]], ax: Axes | None = None, xlabel: str = "epoch",
                ylabel: str = "training loss (label-smoothed cross-entropy, per question)",
                title: str | None = None) -> Axes:
    """One line per run: a per-epoch (or per-step) loss history, keyed by the run's label."""
    ax = ax if ax is not None else plt.subplots(figsize=(7, 4))[1]
    for name, values in histories.items():
        ax.plot(range(1, len(values) + 1), list(values), marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title)
    return ax


def _get(mapping: Mapping[str, Any], dotted: str) -> Any:
    value: Any = mapping
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


class Provenance:
    """The provenance box of a results chapter: what produced its numbers, read from the runs' results.

    ``Provenance(results)`` takes the ``results.json`` dicts of the chapter's runs and lists, for profile,
    dataset and each ``environment`` entry (device, library versions, ...), every distinct value found, so a
    chapter mixing runs from two machines says so. Displays as a styled box in Jupyter and in the book.
    """

    def __init__(self, results: Sequence[Mapping[str, Any]], title: str = "Provenance of these numbers"):
        if not results:
            raise ValueError("Provenance: no results to describe (did the runs of this chapter finish?)")
        self.title = title
        self.runs = len(results)
        rows: dict[str, list[str]] = {"profile": [], "dataset": []}
        for res in results:
            for key in ("profile", "dataset"):
                rows[key].append(str(_get(res, f"config.{key}")))
            env = res.get("environment") or {}
            for key, value in _flatten(env).items():
                rows.setdefault(key, []).append(str(value))
        self.rows = {k: sorted(set(v)) for k, v in rows.items() if v}

    def as_frame(self) -> pd.DataFrame:
        """The box's content as a two-column table (what, value)."""
        return pd.DataFrame({"what": list(self.rows), "value": [", ".join(v) for v in self.rows.values()]})

    @property
    def is_paper_reproduction(self) -> bool:
        """True only when every run used the paper profile on a real benchmark (SLAKE or VQA-RAD)."""
        datasets = self.rows.get("dataset", [])
        return self.rows.get("profile") == ["paper"] and all(d in ("slake", "vqa-rad") for d in datasets)

    def _verdict(self) -> str:
        if self.is_paper_reproduction:
            return "Paper profile on a real benchmark: these numbers can be compared with the paper's."
        return ("These runs use the small <code>tiny</code> profile and/or the built-in dataset: they show "
                "how the methods behave, they are <b>not</b> a reproduction of the paper's GPU numbers.")

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td style='padding:2px 10px 2px 0'><b>{html.escape(k)}</b></td>"
            f"<td style='padding:2px 0'><code>{html.escape(', '.join(v))}</code></td></tr>"
            for k, v in self.rows.items()
        )
        return (
            "<div class='admonition note' style='border-left:4px solid #4e79a7;padding:6px 12px;"
            "background:rgba(78,121,167,0.06)'>"
            "<p class='admonition-title' style='font-weight:bold;margin:0 0 4px 0'>"
            f"{html.escape(self.title)} "
            f"({self.runs} run{'s' if self.runs != 1 else ''})</p>"
            f"<table style='border:none;font-size:0.9em'>{cells}</table>"
            f"<p style='margin:6px 0 0 0'>{self._verdict()}</p></div>"
        )

    def __repr__(self) -> str:
        lines = [f"{self.title} ({self.runs} runs)"]
        lines += [f"  {k}: {', '.join(v)}" for k, v in self.rows.items()]
        return "\n".join(lines)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def samples_table(samples: Sequence[Mapping[str, Any]], by: str = "content_type", per_group: int = 2,
                  columns: Sequence[str] = ("question", "answer")) -> pd.DataFrame:
    """The first ``per_group`` samples of each ``by`` group as a table: the static stand-in for a browser."""
    frame = pd.DataFrame([{by: s[by], **{c: s.get(c) for c in columns}} for s in samples])
    if frame.empty:
        raise ValueError("samples_table: no samples")
    return frame.groupby(by, sort=True).head(per_group).sort_values(by, kind="stable").set_index(by)


def sample_browser(samples: Sequence[Mapping[str, Any]], by: str = "content_type", per_page: int = 4,
                   load_image: Any = None) -> Any:
    """An ipywidgets browser: choose a ``by`` group (question type, configuration), page through its samples.

    ``samples`` as for :func:`sample_grid`; ``load_image(sample)`` supplies the image when samples carry none
    (images are loaded only for the page on screen). Needs a live kernel: the static book shows
    :func:`samples_table` instead.
    """
    import ipywidgets as widgets
    from IPython.display import display

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        groups.setdefault(str(s[by]), []).append(s)
    if not groups:
        raise ValueError("sample_browser: no samples")
    choice = widgets.Dropdown(options=sorted(groups), description=by.replace("_", " "))
    page = widgets.IntSlider(min=0, max=0, description="page")
    out = widgets.Output()

    def draw(*_: Any) -> None:
        items = groups[choice.value]
        page.max = max(0, (len(items) - 1) // per_page)
        shown = items[page.value * per_page:(page.value + 1) * per_page]
        if load_image is not None:
            shown = [{**s, "image": load_image(s)} for s in shown]
        out.clear_output(wait=True)
        with out:
            print(f"{len(items)} samples with {by} = {choice.value!r}")
            fig = sample_grid(shown, ncols=per_page)
            display(fig)
            plt.close(fig)

    choice.observe(draw, names="value")
    page.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([choice, page]), out])


def run_labels(table: pd.DataFrame) -> pd.Series:
    """A short label per run: the spec, plus the rank for LoRA runs (``F/lora/lora r4``)."""
    def label(row: pd.Series) -> str:
        lora = "lora" in str(row["spec"]).split("/")
        if lora and pd.notna(row.get("rank")):
            return f"{row['spec']} r{int(row['rank'])}"
        return str(row["spec"])

    return table.apply(label, axis=1)
