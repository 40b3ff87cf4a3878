"""What the chapters share: setup, run tables with 95 % intervals, floors, paired tests whose verdicts write the
chapters' comparisons, seeds, and the provenance box."""

from __future__ import annotations

import hashlib
import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns
import transformers
from IPython.display import HTML, Markdown

from . import __version__, plots
from .adapters import METHODS, REFUSED
from .data import load_records
from .experiments import RunConfig, collect_results, load_results, paper_rows, pretrained_stand_in, run_grid
from .metrics import majority_baseline, mcnemar, normalize_answer, question_only_baseline
from .model import COMPONENTS

ALPHA = 0.05  # a comparison's verdict: exact McNemar p below this
QUESTIONS = ("open", "closed", "global")
ROUNDING = {"trainable_pct": 3, "open": 1, "closed": 1, "global": 1, "final_loss": 3, "wall_s": 0}
PAPER_METHODS = ("lora", "ia3", "prefix", "ptv2")  # the study's four; chapter 10 compares these with the newer ones
NEWER_METHODS = ("dora", "vera", "loha", "lokr", "adalora", "oft", "ln")
SHAPES = ("F/F/x", "F/x/x", "x/x/x")  # chapters 10-11: a method on the decoder, on the text stacks, everywhere
DATA_SETTINGS = ("profile", "dataset", "size", "seed")  # all that a chapter which trains nothing reads
SETTINGS = ("profile", "dataset", "size", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "seed")


def setup(profile: str, dataset: str, data_dir: str = "", checkpoint: str = "", runs_dir: str = "../runs",
          epochs: int | None = None, batch_size: int | None = None, size: str | int = "small", seed: int = 0,
          progress: bool = True, stand_in: bool = True) -> tuple[RunConfig, Path]:
    """A chapter's base RunConfig (from its parameters) and its runs folder ``runs_dir/<profile>-<dataset>``.
    Tiny profile, no ``checkpoint``: ``stand_in`` starts from chapter 2's stand-in for pretrained MISS."""
    sns.set_theme(style="whitegrid", context="notebook", rc={  # the book's plots: fonts legible at page width
        "figure.figsize": (8, 4), "axes.titleweight": "bold", "axes.titlesize": 12, "legend.fontsize": 10})
    if not progress:  # transformers' own bars too ("Loading weights" is a widget in a notebook)
        transformers.utils.logging.disable_progress_bar()
    if stand_in and profile == "tiny" and not checkpoint:
        checkpoint = pretrained_stand_in(runs_dir, seed=seed, data_seed=seed, size=size, progress=progress)
    source = {"path": data_dir} if data_dir and Path(data_dir).is_file() else {"root": data_dir or None}
    base = RunConfig(profile=profile, dataset=dataset, size=size if dataset == "synthetic" else None, epochs=epochs,
                     batch_size=batch_size, seed=seed, data_seed=seed, checkpoint=checkpoint or None, **source)
    return base, Path(runs_dir) / f"{profile}-{dataset}"


def settings(base: RunConfig, *spec_fields: str, training: bool = True) -> pd.DataFrame:
    """The shared settings (profile defaults filled in; the data's only, unless ``training``), ``spec_fields``."""
    values = {k: getattr(base.resolved(), k) for k in SETTINGS if training or k in DATA_SETTINGS} | {
        k: getattr(base.spec, k) for k in spec_fields}
    if training and (rates := base.method_rates()):  # these methods' adapters train at their own rate, the rest at lr
        by_rate = {r: [m for m, v in rates.items() if v == r] for r in rates.values()}
        values["method_lr"] = "; ".join(f"{r:g}: {', '.join(ms)}" for r, ms in by_rate.items())
    return pd.DataFrame({"setting": list(values.values())}, index=list(values)).astype(str)


def _correct(rows: Any) -> dict[str, bool]:
    """qid (as a string, as the metrics match) -> whether the prediction is the answer (normalised exact match)."""
    return {str(r["qid"]): normalize_answer(r["prediction"]) == normalize_answer(r["answer"]) for r in rows}


def _stats(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{q}{end}": metrics[q][key] for q in QUESTIONS
            for end, key in (("", "accuracy"), ("_low", "ci_low"), ("_high", "ci_high"))}


def _with_stats(runs: pd.DataFrame) -> pd.DataFrame:
    """Add each run's label, ``method`` (its one method, else T or F), ``shape`` (``F/x/x``...) and from its folder
    the intervals, per-question ``correct``, per-epoch ``losses`` and ``s_per_epoch`` (median training epoch)."""
    def extra(out: str) -> dict[str, Any]:
        res, lines = load_results(out), (Path(out) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        return _stats(res["metrics"]) | {"correct": _correct(map(json.loads, filter(None, lines))),
                                         "losses": [h["loss"] for h in res["history"]],
                                         "s_per_epoch": statistics.median(h["seconds"] for h in res["history"])}
    parts = [tuple(row) for row in runs[list(COMPONENTS)].itertuples(index=False)]
    return runs.assign(run=plots.run_labels(runs), **pd.DataFrame(map(extra, runs["out"]), index=runs.index),
                       method=[next((m for m in p if m not in ("F", "T")), "T" if "T" in p else "F") for p in parts],
                       shape=["/".join("F" if m == "F" else "x" for m in p) for p in parts])


def beyond_grid(here: RunConfig, base: RunConfig, out_root: Path, methods: str = "all"
                ) -> tuple[list[RunConfig], pd.DataFrame]:
    """Chapters 10-11's grid: each of ``methods`` ("all" or e.g. "ia3,ln") in each of :data:`SHAPES`, unless a
    component refuses it; the configs and the plan (spec or refusal per method and shape). A run of the paper's grid
    with ``base``'s settings is read back from ``out_root``; the others lie in ``<out_root>-beyond``, out of
    chapter 9's collection (:func:`collect`)."""
    paper_specs, configs, plan = {r["spec"] for r in paper_rows()}, [], {}
    wanted = PAPER_METHODS + NEWER_METHODS if methods == "all" else methods.split(",")
    for method in (m for m in METHODS if m in PAPER_METHODS + NEWER_METHODS and m in wanted):
        for shape in SHAPES:
            spec = dict(zip(COMPONENTS, shape.replace("x", method).split("/"), strict=True))
            refused = [f"refused: {c} {m}: {REFUSED[c, m]}" for c, m in spec.items() if (c, m) in REFUSED]
            if not refused:
                cfg = replace(here, spec=replace(here.spec, **spec))
                root = out_root if here == base and cfg.spec_str in paper_specs else out_root.with_name(
                    f"{out_root.name}-beyond")
                configs.append(replace(cfg, out=str(root / cfg.slug)))
            plan.setdefault(method, {})[shape] = refused[0] if refused else "/".join(spec.values())
    return configs, pd.DataFrame(plan).T.rename_axis("method")


def run(configs: Sequence[RunConfig], progress: bool = True) -> pd.DataFrame:
    """Run the configs (finished runs are read back): their table (:func:`_with_stats`) and ``config``."""
    return _with_stats(run_grid(configs, progress=progress)).assign(config=list(configs))


def collect(runs_dir: str | Path) -> pd.DataFrame:
    """:func:`run`'s table (a ``source``, no ``config``) of the runs under ``runs_dir`` but the stand-in's and those
    of chapters 10-11."""
    every = collect_results(runs_dir)
    skip = every["out"].astype(str).str.contains(r"tiny-pretrained|-beyond(?:[/\\]|$)")
    every = _with_stats(every[~skip].reset_index(drop=True))
    return every.assign(source=every["profile"] + " profile, " + every["dataset"] + " data")


def seeds(runs: pd.DataFrame, progress: bool = True, n: int = 3, label: str | None = None) -> pd.DataFrame:
    """The run ``label`` of :func:`run`'s table (default: the best global), its row first, then trained again
    with seeds 1 to ``n`` - 1 (same data and starting weights; folders ``<out>-seed<s>``)."""
    row = runs[runs["run"] == (label or runs.loc[runs["global"].idxmax(), "run"])]
    cfg = row["config"].iloc[0]
    return pd.concat([row, run([replace(cfg, seed=s, out=f"{cfg.out}-seed{s}") for s in range(1, n)], progress)],
                     ignore_index=True)


def seed_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of each configuration (per ``source`` if any) that ran with more than one seed."""
    groups = runs.groupby([c for c in ("source", "run") if c in runs.columns], sort=False)
    stats = {f"{q} (mean ± sd)": groups[q].agg(lambda v: f"{v.mean():.1f} ± {v.std():.1f}") for q in QUESTIONS}
    return pd.DataFrame({"seeds": groups["seed"].agg(lambda v: ", ".join(map(str, sorted(v)))), **stats})[
        groups.size() > 1]


def table(runs: pd.DataFrame, columns: Sequence[str] = tuple(ROUNDING)) -> pd.DataFrame:
    """``columns`` of a run (or floors) table as shown: accuracy (95 % interval), others per ``ROUNDING``, none "–"."""
    rows = runs.set_index("run") if "run" in runs.columns else runs

    def cell(row: pd.Series, c: str) -> Any:
        if pd.isna(row[c]):
            return "–"
        if f"{c}_low" in row:
            return f"{row[c]:.1f} ({row[f'{c}_low']:.1f}–{row[f'{c}_high']:.1f})"
        return f"{row[c]:.{ROUNDING.get(c, 1)}f}" if isinstance(row[c], float) else row[c]
    names = {"trainable_pct": "trainable %", "wall_s": "wall (s)"} | {
        c: f"{c} % (95% CI)" for c in columns if f"{c}_low" in rows.columns}
    return pd.DataFrame({names.get(c, c).replace("_", " "): [cell(r, c) for _, r in rows.iterrows()]
                         for c in columns}, index=rows.index)


def floors(base: RunConfig) -> pd.DataFrame:
    """The majority and question-only (no image) floors' test accuracy as a run table indexed by the floor's name."""
    kw = dict(root=base.root, path=base.path, size=base.size, seed=base.data_seed)
    train, test = load_records(base.dataset, "train", **kw), load_records(base.dataset, base.eval_split, **kw)
    rows = {b["baseline"]: _stats(b) | {"correct": _correct(
        {"qid": r.qid, "answer": r.answer, "prediction": b["predictions"][r.qid]} for r in test)}
        for b in (majority_baseline(train, test), question_only_baseline(train, test))}
    return pd.DataFrame(list(rows.values()), index=pd.Index(list(rows), name="floor"))


def paired_tests(runs: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Exact McNemar test of each pair (A, B) of labels of ``runs`` (:func:`run`, :func:`collect` or :func:`floors`
    tables, or them concatenated) on the same questions: accuracies, b, c, p, verdict, sentence."""
    rows, out = (runs.set_index("run") if "run" in runs.columns else runs), []
    if not rows.index.is_unique:
        raise ValueError(f"paired_tests: labels {sorted(set(rows.index[rows.index.duplicated()]))} name several "
                         "runs (seeds? sources?): pass a table with one run per label")
    for a, b in pairs:
        t = {"A": a, "B": b, "A %": rows.loc[a, "global"], "B %": rows.loc[b, "global"],
             **mcnemar(rows.loc[a, "correct"], rows.loc[b, "correct"])}
        (win, n_win), (lose, n_lose) = sorted([(a, t["b"]), (b, t["c"])], key=lambda x: -x[1])  # A first on ties
        t["verdict"] = f"{win} beats {lose}" if t["p"] < ALPHA else "cannot be told apart"
        numbers = (f"{rows.loc[win, 'global']:.1f}% vs {rows.loc[lose, 'global']:.1f}% of {t['n']} questions; "
                   f"{n_win} right only for {win}, {n_lose} only for {lose}; exact McNemar "
                   + ("p < 0.001" if t["p"] < 0.001 else f"p = {t['p']:.3f}"))
        out.append(t | {"sentence": f"**{win}** beats **{lose}** ({numbers})." if t["p"] < ALPHA else
                        f"**{win}** and **{lose}** cannot be told apart at this test size ({numbers})."})
    return pd.DataFrame(out)


def compare(runs: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> Markdown:
    return Markdown("\n".join("- " + s for s in paired_tests(runs, pairs)["sentence"]))


def conclusion(runs: pd.DataFrame, floor: pd.DataFrame, what: str, seeded: pd.DataFrame | None = None) -> Markdown:
    """The best run of ``runs`` tested against the question-only floor, the runner-up and the worst run, and the
    mean ± sd over the seeds of ``seeded`` (:func:`seeds`; seed 0 was picked as the best, the others were not)."""
    ranked = runs.sort_values("global", ascending=False)
    best, rest, g = ranked.iloc[0], list(ranked["run"].iloc[1:]), None if seeded is None else seeded["global"]
    text = (f"**{what}** ({best['profile']} profile, {best['dataset']} data): the best configuration is "
            f"**{best['run']}**, {best['global']:.1f}% of all test questions right (95% interval "
            f"{best['global_low']:.1f}–{best['global_high']:.1f}), training {best['trainable_pct']:.2f}% of the "
            "parameters." + ("" if g is None else f" Over training seeds {', '.join(map(str, seeded['seed']))}, "
                             f"**{seeded['run'].iloc[0]}** scores {g.mean():.1f} ± {g.std():.1f}% (mean ± sd; "
                             f"{g.min():.1f}–{g.max():.1f})."))
    pairs = [(best["run"], other) for other in ["question-only", *dict.fromkeys(rest[:1] + rest[-1:])]]
    both = pd.concat([runs.set_index("run"), floor])
    return Markdown(text + " Tested on the same questions:\n\n" + compare(both, pairs).data)


def paper_table(table: int) -> pd.DataFrame:
    """The paper's published numbers for the configurations of its Table ``table``."""
    rows = pd.DataFrame(paper_rows(include_full=False)).query("table == @table")
    return rows.assign(run=plots.run_labels(rows)).set_index("run")[
        ["params_pct", "memory_gb", "open", "closed", "global"]].rename(columns=lambda c: f"paper: {c}")


def provenance(outs: pd.Series | Sequence[str], title: str = "Provenance of these numbers") -> HTML:
    """The box naming what produced a chapter's numbers: every distinct profile, dataset, epochs, seed, test size,
    date and ``environment`` entry (device, versions) of its runs, and the date and code of this build."""
    if len(outs) == 0:
        raise ValueError("provenance: no runs to describe (did the runs of this chapter finish?)")
    rows: dict[str, set[str]] = {}
    for out in outs:
        res, done = load_results(out), (Path(out) / "results.json").stat().st_mtime
        for key, value in ({k: res["config"][k] for k in ("profile", "dataset", "epochs", "seed")} | {
                "test questions": res["data"]["eval"],
                "run date (UTC)": f"{datetime.fromtimestamp(done, timezone.utc):%F}"} | res["environment"]).items():
            rows.setdefault(key, set()).add(str(value))
    sources = sorted(Path(__file__).parent.rglob("*.py"))  # this build's code by content: a clone, an install
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    rows |= {"this build (UTC)": {f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"},
             "code of this build": {f"mile_utils {__version__}, sources sha256 {code}"}}
    verdict = ("Paper profile on a real benchmark: these numbers can be compared with the paper's."
               if rows["profile"] == {"paper"} and rows["dataset"] <= {"slake", "vqa-rad"} else
               "These runs use the small <code>tiny</code> profile and/or the built-in dataset: they show how the "
               "methods behave, they are <b>not</b> a reproduction of the paper's GPU numbers.")
    cells = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td><code>{html.escape(', '.join(sorted(v)))}</code>"
                    f"</td></tr>" for k, v in rows.items())
    return HTML(f"<div class='admonition note'><p class='admonition-title'>{html.escape(title)} ({len(outs)} "
                f"run{'s' if len(outs) != 1 else ''})</p><table>{cells}</table><p>{verdict}</p></div>")
