"""``mile {params,data,train,bench}`` (or ``python -m mile_utils ...``): the same functions the notebooks call.
The flags are generated from ``RunConfig`` and ``AdapterSpec``: one source of truth for names, defaults, help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers.utils import logging

from . import experiments
from .adapters import AdapterSpec, parameter_report
from .bench import format_table, run_benchmark
from .data import summarize_dataset
from .experiments import RunConfig
from .train import NonFiniteLossError


def _add_fields(p: argparse.ArgumentParser, cls: type, *only: str) -> None:
    """One ``--flag-name`` per dataclass field (all, or ``only``); booleans get ``--no-``, a union type is a string."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "spec" or (only and f.name not in only):
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        kw = {"action": argparse.BooleanOptionalAction} if kinds == [bool] else {
            "type": kinds[0] if len(kinds) == 1 else str, "choices": f.metadata.get("choices")}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata.get("help"), **kw)


def _values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "spec"}


def cmd_params(args: argparse.Namespace) -> tuple[Any, str]:
    r = parameter_report(AdapterSpec(**_values(args, AdapterSpec)), profile=args.profile)
    rows = [f"  {name:4s} {c['method']:7s} trainable {c['trainable']:>12,}  total {c['total']:>12,}"
            for name, c in r["components"].items()]
    return r, "\n".join([f"{r['spec']} on profile {args.profile}: {r['trainable']:,} trainable of {r['total']:,} "
                         f"({r['percent']:.3f}%)", *rows])


def cmd_data(args: argparse.Namespace) -> tuple[Any, str]:
    summary = summarize_dataset(args.dataset, split=args.split, root=args.root, path=args.path,
                                skip_bad=args.skip_bad, size=args.size, seed=args.seed, hub=args.hub or False)
    return summary, "\n".join(f"{key}: {value}" for key, value in summary.items())


def cmd_train(args: argparse.Namespace) -> tuple[Any, str] | None:
    config = RunConfig(spec=AdapterSpec(**_values(args, AdapterSpec)), **_values(args, RunConfig))
    if args.no_progress:  # also transformers' own bars (e.g. "Loading weights" of a checkpoint folder)
        logging.disable_progress_bar()
    results = experiments.run_experiment(config, resume=args.resume, keep_checkpoint=args.keep_checkpoint,
                                         progress=not args.no_progress)
    if not PartialState().is_main_process:  # under `accelerate launch`, one report, not one per process
        return None
    m, t, out = results["metrics"], results["timing"], results["config"]["out"]
    return results, (f"{config.spec_str} ({config.profile}, {config.dataset}): open {m['open']['accuracy']:.2f} "
                     f"closed {m['closed']['accuracy']:.2f} global {m['global']['accuracy']:.2f} "
                     f"({results['params']['percent']:.2f}% trainable, {t['wall_s']:.0f} s) -> {out}")


def cmd_bench(args: argparse.Namespace) -> tuple[Any, str]:
    keys = ("profile", "steps", "repeats", "processes", "batch_size", "specs", "device", "threads")
    report = run_benchmark(**{k: getattr(args, k) for k in keys})
    return report, format_table(report)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    if prog is None:  # the usage line names what was run: the `mile` console script, or `python -m mile_utils`
        prog = "python -m mile_utils" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any, help: str, *fields: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        _add_fields(p, RunConfig, *fields)
        return p
    _add_fields(command("params", cmd_params, "count trainable/total parameters of a spec", "profile"), AdapterSpec)
    p = command("data", cmd_data, "summarise a split, list its first problems", "dataset", "root", "path", "size")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0, help="the built-in set's generator seed")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and report them")
    p.add_argument("--hub", nargs="?", const=True, default=None,
                   help="download from the Hugging Face hub (slake, vqa-rad), optionally naming a hub id")
    p = command("train", cmd_train, "train and evaluate one configuration; writes OUT/results.json")
    _add_fields(p, AdapterSpec)
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint.pt after the run")
    p.add_argument("--no-progress", action="store_true")
    p = command("bench", cmd_bench, "samples/s, peak memory: our loop vs the reference", "profile", "batch_size")
    p.add_argument("--steps", type=int, default=16, help="steps per timed epoch (the same records every run)")
    p.add_argument("--repeats", type=int, default=24, help="timed epochs, each step of ours then one of the reference")
    p.add_argument("--processes", type=int, default=12, help="fresh processes per spec, sharing its repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process, 0: torch's default (default: 1 for tiny on a CPU, as the book)")
    p.add_argument("--specs", nargs="*", default=None, help="e.g. T/T/T F/F/lora")
    p.add_argument("--device", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, OSError, NonFiniteLossError) as err:  # bad input, unwritable --out, NaN loss
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result[0], indent=2, default=str) if args.json else result[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
