"""What the book's chapters share: their setup, the settings and floors tables, the summary and provenance."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import transformers
from IPython.display import HTML, Markdown

from . import plots
from .experiments import RunConfig, load_results, paper_rows, pretrained_stand_in, run_grid

# how the chapters' run tables round (accuracy in %: 1 decimal)
ROUNDING = {"trainable_pct": 3, "open": 1, "closed": 1, "global": 1, "final_loss": 3, "wall_s": 0}
SETTINGS = ("profile", "dataset", "size", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "seed", "eval_method")


def setup(profile: str, dataset: str, data_dir: str = "", checkpoint: str = "", runs_dir: str = "../runs",
          epochs: int | None = None, batch_size: int | None = None, size: str | int = "small", seed: int = 0,
          progress: bool = True, stand_in: bool = True) -> tuple[RunConfig, Path]:
    """A chapter's base RunConfig (from its parameters) and its runs folder ``runs_dir/<profile>-<dataset>``.
    Tiny profile, no ``checkpoint``: ``stand_in`` starts from chapter 2's stand-in for pretrained MISS."""
    plots.set_style()
    if not progress:  # transformers' own bars too ("Loading weights" is a widget in a notebook)
        transformers.utils.logging.disable_progress_bar()
    if stand_in and profile == "tiny" and not checkpoint:
        checkpoint = pretrained_stand_in(runs_dir, seed=seed, data_seed=seed, size=size, progress=progress)
    source = {"path": data_dir} if data_dir and Path(data_dir).is_file() else {"root": data_dir or None}
    base = RunConfig(profile=profile, dataset=dataset, size=size if dataset == "synthetic" else None,
                     epochs=epochs, batch_size=batch_size, seed=seed, data_seed=seed,
                     checkpoint=checkpoint or None, **source)
    return base, Path(runs_dir) / f"{profile}-{dataset}"


def settings(base: RunConfig, *spec_fields: str) -> pd.DataFrame:
    """The chapters' shared settings (profile defaults filled in) and the method's ``spec_fields``."""
    values = {k: getattr(base.resolved(), k) for k in SETTINGS} | {k: getattr(base.spec, k) for k in spec_fields}
    return pd.DataFrame({"setting": list(values.values())}, index=list(values)).astype(str)


def run(configs: Sequence[RunConfig], progress: bool = True) -> pd.DataFrame:
    """Run the configs (finished runs are read back): the grid's table, with a ``run`` label column."""
    runs = run_grid(configs, progress=progress)
    return runs.assign(run=plots.run_labels(runs))


def table(runs: pd.DataFrame, columns: Sequence[str] = tuple(ROUNDING)) -> pd.DataFrame:
    """The columns of a run table, one row per run, rounded as the book shows them."""
    return runs.set_index("run")[list(columns)].round(ROUNDING)


def floors(base: RunConfig) -> pd.DataFrame:
    """Test accuracy (%) of the majority answer and of the question-only floor (no image), per question kind."""
    from .data import load_records
    from .metrics import majority_baseline, question_only_baseline

    kw = dict(root=base.root, path=base.path, size=base.size, seed=base.data_seed)
    train, test = load_records(base.dataset, "train", **kw), load_records(base.dataset, base.eval_split, **kw)
    rows = {b["baseline"]: {q: b[q]["accuracy"] for q in ("open", "closed", "global")}
            for b in (majority_baseline(train, test), question_only_baseline(train, test))}
    return pd.DataFrame(rows).T.round(1)


def paper_table(table: int) -> pd.DataFrame:
    """The paper's published numbers for the configurations of its Table ``table``."""
    rows = pd.DataFrame(paper_rows(include_full=False)).query("table == @table")
    return rows.assign(run=plots.run_labels(rows)).set_index("run")[
        ["params_pct", "memory_gb", "open", "closed", "global"]].rename(columns=lambda c: f"paper: {c}")


def histories(runs: pd.DataFrame, label: str = "run") -> dict[str, list[float]]:
    """Each run's per-epoch training loss, keyed by its label (for :func:`plots.loss_curves`)."""
    outs = zip(runs[label], runs["out"], strict=True)
    return {name: [h["loss"] for h in load_results(out)["history"]] for name, out in outs}


def conclusion(runs: pd.DataFrame, floor: pd.DataFrame, what: str) -> Markdown:
    """A sentence on the best run of ``runs`` against the majority answer, as Markdown."""
    best, majority = runs.loc[runs["global"].idxmax()], floor.loc["majority", "global"]
    return Markdown(f"**{what}** ({best['profile']} profile, {best['dataset']} data): the best configuration is "
                    f"**{best['run']}**, {best['global']:.1f}% of all test questions right ({best['open']:.1f}% "
                    f"open, {best['closed']:.1f}% closed), training {best['trainable_pct']:.2f}% of the "
                    f"parameters; the majority answer scores {majority:.1f}%.")


def provenance(outs: pd.Series | Sequence[str], title: str = "Provenance of these numbers") -> HTML:
    """The box naming what produced a chapter's numbers: every distinct profile, dataset, epochs, seed, test
    size and ``environment`` entry (device, versions) in its runs' ``results.json``."""
    if len(outs) == 0:
        raise ValueError("provenance: no runs to describe (did the runs of this chapter finish?)")
    rows: dict[str, set[str]] = {}
    for res in map(load_results, outs):
        found = {k: res["config"][k] for k in ("profile", "dataset", "epochs", "seed")}
        for key, value in {**found, "test questions": res["data"]["eval"], **res["environment"]}.items():
            rows.setdefault(key, set()).add(str(value))
    paper = rows["profile"] == {"paper"} and rows["dataset"] <= {"slake", "vqa-rad"}
    verdict = ("Paper profile on a real benchmark: these numbers can be compared with the paper's." if paper else
               "These runs use the small <code>tiny</code> profile and/or the built-in dataset: they show how the "
               "methods behave, they are <b>not</b> a reproduction of the paper's GPU numbers.")
    cells = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td><code>{html.escape(', '.join(sorted(v)))}</code>"
                    f"</td></tr>" for k, v in rows.items())
    return HTML(f"<div class='admonition note'><p class='admonition-title'>{html.escape(title)} ({len(outs)} "
                f"run{'s' if len(outs) != 1 else ''})</p><table>{cells}</table><p>{verdict}</p></div>")
