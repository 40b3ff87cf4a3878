"""``python -m mile_utils {params,data,train,bench}``: the same functions the notebooks call."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _add_spec_arguments(p: argparse.ArgumentParser, dec_default: str = "T") -> None:
    from .adapters import METHODS

    for comp, default in (("vit", "F"), ("jtm", "T"), ("dec", dec_default)):
        p.add_argument(f"--{comp}", default=default, choices=METHODS, help=f"{comp}: F, T or a PEFT method")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (alpha 32, dropout 0.1)")
    p.add_argument("--profile", default="tiny", choices=("tiny", "paper"))


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def cmd_params(args: argparse.Namespace) -> int:
    from .adapters import AdapterSpec, parameter_report

    spec = AdapterSpec(vit=args.vit, jtm=args.jtm, dec=args.dec, rank=args.rank)
    report = parameter_report(spec, profile=args.profile)
    if args.json:
        _print_json(report)
    else:
        print(f"{spec} on profile {args.profile}: {report['trainable']:,} trainable of {report['total']:,} "
              f"({report['percent']:.3f}%)")
        for name, comp in report["components"].items():
            print(f"  {name:4s} {comp['method']:7s} trainable {comp['trainable']:>12,}  total {comp['total']:>12,}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import summarize_dataset

    summary = summarize_dataset(
        args.dataset, split=args.split, root=args.root, path=args.path, skip_bad=args.skip_bad,
        size=args.size, seed=args.seed, hub=args.hub or False,
    )
    if args.json:
        _print_json(summary)
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .experiments import RunConfig, run_experiment
    from .train import NonFiniteLossError

    config = RunConfig.from_cli(args)
    try:
        results = run_experiment(config, resume=args.resume, keep_checkpoint=args.keep_checkpoint,
                                 progress=not args.no_progress)
    except (OSError, NonFiniteLossError) as err:  # unwritable --out, NaN loss: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report, not one per process
        return 0
    if args.json:
        _print_json(results)
    else:
        m = results["metrics"]
        t = results["timing"]
        print(f"{config.spec_str} ({config.profile}, {config.dataset}): open {m['open']['accuracy']:.2f} "
              f"closed {m['closed']['accuracy']:.2f} global {m['global']['accuracy']:.2f} "
              f"({results['params']['percent']:.2f}% trainable, {t['wall_s']:.0f} s) -> "
              f"{results['config']['out']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_benchmark

    report = run_benchmark(profile=args.profile, steps=args.steps, batch_size=args.batch_size,
                           specs=args.specs, device=args.device)
    if args.json:
        _print_json(report)
    else:
        print(format_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mile_utils", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count trainable/total parameters of a component spec")
    _add_spec_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("data", help="summarise a dataset split and report the first problems")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "slake", "vqa-rad", "instruction"))
    p.add_argument("--root", default=None, help="dataset folder (SLAKE's Slake1.0, images root, cache dir)")
    p.add_argument("--path", default=None, help="a dataset file (OSF VQA-RAD json, parquet, instruction json)")
    p.add_argument("--split", default="train")
    p.add_argument("--size", default=None, help="built-in set size: full, small, or a number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and report them")
    p.add_argument("--hub", nargs="?", const=True, default=None,
                   help="download from the Hugging Face hub (slake, vqa-rad), optionally naming a hub id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train and evaluate one configuration; writes OUT/results.json")
    _add_spec_arguments(p, dec_default="T")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "slake", "vqa-rad", "instruction"))
    p.add_argument("--root", default=None)
    p.add_argument("--path", default=None)
    p.add_argument("--size", default=None, help="built-in set size: full, small, or a number of images")
    p.add_argument("--data-seed", type=int, default=0, help="the built-in set's generator seed")
    p.add_argument("--checkpoint", default=None, help="initial weights: BLIP/MISS .pth, HF folder/hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (paper profile)")
    p.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the profile's)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the profile's)")
    p.add_argument("--min-lr", type=float, default=None, help="cosine schedule's floor (default: profile's)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--loss-reduction", default="sum", choices=("sum", "mean"),
                   help="over answer tokens: sum (BLIP/MISS) or mean")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-method", default="generate", choices=("generate", "rank"),
                   help="beam search (the reference) or BLIP's ranking over the training answers")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute frozen components every step (the cache never changes results)")
    p.add_argument("--reference-quirk", action="store_true", help="the reference code's image scaling")
    p.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                   help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/PROFILE-DATASET/SPEC)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint.pt after the run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="samples/s and peak memory of our loop vs a reference-style loop")
    p.add_argument("--profile", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--specs", nargs="*", default=None, help="e.g. T/T/T F/F/lora")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
