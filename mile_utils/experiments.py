"""Run one configuration end to end (data -> model -> spec -> train -> evaluate -> results.json), or a grid.

:class:`RunConfig` is the one description of a run: the CLI (``python -m mile_utils train``), the notebooks
and the grid runner build it, and it is written into ``results.json`` so a run can be recognised as finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .profiles import get_profile
from .train import CHECKPOINT_NAME, TrainOptions, make_accelerator, train_model, write_json_atomic

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.jsonl"
WEIGHTS_DIR = "weights"
# the paper's method names -> ours
PAPER_METHODS = {"F": "F", "T": "T", "LoRA": "lora", "Prefix": "prefix", "IA3": "ia3", "PTV2": "ptv2"}


def _spec_type() -> Any:
    from .adapters import AdapterSpec

    return AdapterSpec


def _default_spec() -> Any:
    return _spec_type().parse("F/T/T")


@dataclass
class RunConfig:
    """Everything that determines a run. ``None`` training settings take the profile's defaults.

    ``size`` selects the built-in set's size (``small``, ``full`` or a number of images);
    ``max_train_samples`` / ``max_eval_samples`` keep a seeded random subset (fast book runs).
    ``eval_method``: ``generate`` (the reference's beam search) or ``rank`` (BLIP's ranking over the
    training answers).
    """

    profile: str = "tiny"
    dataset: str = "synthetic"
    spec: Any = field(default_factory=_default_spec)
    root: str | None = None
    path: str | None = None
    size: str | int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    data_seed: int = 0  # the built-in set's generator seed, apart from the training seed
    out: str | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None
    grad_accum: int = 1
    train_split: str = "train"
    eval_split: str = "test"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_method: str = "generate"
    eval_batch_size: int | None = None
    label_smoothing: float = 0.1
    loss_reduction: str = "sum"
    gradient_checkpointing: bool = False
    use_cache: bool = True
    reference_quirk: bool = False
    mixed_precision: str | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.spec, str):
            self.spec = _spec_type().parse(self.spec)
        elif isinstance(self.spec, dict):
            self.spec = _spec_type().from_dict(self.spec)
        get_profile(self.profile)  # fail early on an unknown profile
        if self.eval_method not in ("generate", "rank"):
            raise ValueError(f"eval_method {self.eval_method!r}: expected 'generate' or 'rank'")

    @property
    def spec_str(self) -> str:
        return str(self.spec)

    @property
    def slug(self) -> str:
        """A folder name for the run: ``F-lora-lora-r4``, ``T-T-T``."""
        name = self.spec_str.replace("/", "-")
        return name + (f"-r{self.spec.rank}" if "lora" in self.spec_str.split("/") else "")

    def resolved(self) -> RunConfig:
        """A copy with the profile's defaults filled in and ``out`` set."""
        prof = get_profile(self.profile)
        cfg = replace(self)
        for name in ("epochs", "batch_size", "lr", "min_lr", "weight_decay"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(prof, name))
        if cfg.out is None:
            cfg.out = str(Path("runs") / f"{self.profile}-{self.dataset}" / self.slug)
        cfg.out = str(cfg.out)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spec"] = self.spec.to_dict()
        d["spec_str"] = self.spec_str
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def run_key(self) -> str:
        """A hash of everything that changes the result (not the output folder)."""
        d = self.resolved().to_dict()
        d.pop("out")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_cli(cls, args: Any) -> RunConfig:
        """From ``python -m mile_utils train`` arguments (argparse namespace)."""
        spec = _spec_type()(vit=args.vit, jtm=args.jtm, dec=args.dec, rank=args.rank)
        names = [f.name for f in fields(cls) if f.name != "spec"]
        kw = {name: getattr(args, name) for name in names if hasattr(args, name)}
        return cls(spec=spec, **kw)


# --------------------------------------------------------------------------------------------- one experiment
def check_writable(out: Path) -> None:
    """Fail before any training if ``out`` cannot hold the results (not after an hour of GPU time)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output directory {out} is not writable ({err.strerror or err}): "
                              "choose another --out") from err


def load_results(out: str | Path) -> dict[str, Any] | None:
    """The ``results.json`` of a run folder, or None when the run has not finished."""
    path = Path(out) / RESULTS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _subset(records: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    if n is None or n >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def _environment(acc: Any) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    from . import __version__

    device = acc.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "accelerate": accelerate.__version__, "mile_utils": __version__,
        "platform": platform.platform(), "device": str(device), "device_name": name,
        "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }


def peak_memory(device: torch.device) -> dict[str, Any]:
    """CUDA max allocated on a GPU; on CPU the process's peak resident set (a high-water mark since start)."""
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return {"peak_bytes": int(rss * scale), "kind": "process_peak_rss"}
    except ImportError:  # Windows
        import psutil

        return {"peak_bytes": int(psutil.Process().memory_info().peak_wset), "kind": "process_peak_rss"}


def build_run(cfg: RunConfig) -> tuple[Any, Any]:
    """Tokenizer and model for a resolved config: built, initial weights loaded, component spec applied."""
    from .adapters import apply_spec
    from .model import build_model, build_tokenizer

    tokenizer = build_tokenizer(cfg.profile, cfg.tokenizer)
    model = build_model(cfg.profile, tokenizer, seed=cfg.seed)
    if cfg.checkpoint:
        from .checkpoints import load_weights

        load_weights(model, cfg.checkpoint)
    return tokenizer, apply_spec(model, cfg.spec, seed=cfg.seed)


def run_experiment(config: RunConfig, resume: bool = False, *, skip_finished: bool = False,
                   keep_checkpoint: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate ``config``; write ``out/results.json``, ``out/predictions.jsonl``, ``out/weights``.

    ``resume`` continues from ``out/checkpoint.pt`` (written after each epoch); a finished run with the same
    config is returned as is when ``resume`` or ``skip_finished``. The per-epoch checkpoint (trainable
    weights, optimizer, RNG) is deleted once results are written unless ``keep_checkpoint``.
    """
    from .adapters import count_parameters, save_adapters
    from .data import ImageTransform, VQADataset, load_records
    from .evaluate import evaluate_model

    cfg = config.resolved()
    out = Path(cfg.out)
    check_writable(out)
    done = load_results(out)
    if done is not None and (resume or skip_finished) and done.get("config") == json.loads(
            json.dumps(cfg.to_dict(), default=str)):
        return done

    wall_start = time.perf_counter()
    prof = get_profile(cfg.profile)
    load_kw = dict(root=cfg.root, path=cfg.path, size=cfg.size, seed=cfg.data_seed)
    train_records = _subset(load_records(cfg.dataset, cfg.train_split, **load_kw), cfg.max_train_samples,
                            cfg.seed)
    eval_records = _subset(load_records(cfg.dataset, cfg.eval_split, **load_kw), cfg.max_eval_samples,
                           cfg.seed)
    transform = ImageTransform(prof.image_size, reference_quirk=cfg.reference_quirk)
    train_ds = VQADataset(train_records, transform, train=True, seed=cfg.seed)
    eval_ds = VQADataset(eval_records, transform, train=False, seed=cfg.seed)
    # img_name is unique only within one source: the cache namespace names the source and the pixels' recipe
    namespace = f"{cfg.dataset}|{cfg.root}|{cfg.path}|{cfg.size}|{cfg.data_seed}|{transform!r}"

    acc = make_accelerator(cfg.grad_accum, cfg.mixed_precision)
    tokenizer, model = build_run(cfg)
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    options = TrainOptions(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay, seed=cfg.seed, grad_accum=cfg.grad_accum,
        label_smoothing=cfg.label_smoothing,
        loss_reduction=cfg.loss_reduction, gradient_checkpointing=cfg.gradient_checkpointing,
        use_cache=cfg.use_cache, num_workers=cfg.num_workers, run_key=cfg.run_key(), progress=progress)
    trained = train_model(model, tokenizer, prof, train_ds, options, namespace=namespace, out_dir=out,
                          resume=resume, accelerator=acc)
    memory = peak_memory(acc.device)

    if acc.is_main_process:
        eval_start = time.perf_counter()
        dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32
        evaluated = evaluate_model(
            model, tokenizer, prof, eval_ds, namespace=namespace, out_dir=out, method=cfg.eval_method,
            candidates=sorted({r.answer for r in train_records}), batch_size=cfg.eval_batch_size or 64,
            device=acc.device, autocast=acc.autocast, dtype=dtype, use_cache=cfg.use_cache,
            label_smoothing=cfg.label_smoothing, progress=progress)
        eval_seconds = time.perf_counter() - eval_start
        save_adapters(model, cfg.spec, out / WEIGHTS_DIR)
        results = {
            "config": cfg.to_dict(),
            "params": count_parameters(model, cfg.spec),
            "metrics": evaluated["metrics"],
            "history": trained.history,
            "data": {"train": len(train_records), "eval": len(eval_records), "eval_split": cfg.eval_split,
                     "train_images": len({r.img_name for r in train_records})},
            "timing": {
                "wall_s": round(time.perf_counter() - wall_start, 3),
                "train_s": round(trained.train_seconds, 3),
                "cache_s": round(trained.cache_seconds, 3),
                "eval_s": round(eval_seconds, 3),
                "train_samples_per_s": round(trained.samples / max(trained.train_seconds, 1e-9), 3),
                "resumed_from_epoch": trained.resumed_from_epoch,
            },
            "cache": trained.cached,
            "memory": memory,
            "environment": _environment(acc),
            "files": {"predictions": PREDICTIONS_NAME, "weights": WEIGHTS_DIR},
        }
        write_json_atomic(out / RESULTS_NAME, results)
        if not keep_checkpoint:
            (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    acc.wait_for_everyone()
    return json.loads((out / RESULTS_NAME).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------------ grids
def results_row(results: dict[str, Any]) -> dict[str, Any]:
    """One flat table row of a run's results (what the grid table and the book's comparisons show)."""
    cfg, m, p = results["config"], results["metrics"], results["params"]
    spec = cfg["spec"]
    row = {
        "spec": cfg.get("spec_str") or f"{spec['vit']}/{spec['jtm']}/{spec['dec']}",
        # the rank means something only where LoRA is used; elsewhere it is left empty in tables
        "vit": spec["vit"], "jtm": spec["jtm"], "dec": spec["dec"],
        "rank": spec.get("rank") if "lora" in (spec["vit"], spec["jtm"], spec["dec"]) else None,
        "profile": cfg["profile"], "dataset": cfg["dataset"], "epochs": cfg["epochs"], "seed": cfg["seed"],
        "trainable_pct": p.get("percent"), "trainable": p.get("trainable"), "total": p.get("total"),
        "open": m["open"]["accuracy"], "closed": m["closed"]["accuracy"], "global": m["global"]["accuracy"],
    }
    if "yes_no" in m:
        row["closed_yes_no"] = m["yes_no"].get("closed", {}).get("accuracy") if isinstance(
            m["yes_no"].get("closed"), dict) else None
    row.update({
        "final_loss": results["history"][-1]["loss"] if results.get("history") else None,
        "peak_memory_gb": results["memory"]["peak_bytes"] / 2**30, "memory_kind": results["memory"]["kind"],
        "wall_s": results["timing"]["wall_s"],
        "train_samples_per_s": results["timing"]["train_samples_per_s"],
        "device": results["environment"]["device_name"], "out": cfg["out"],
    })
    return row


def run_grid(configs: Iterable[RunConfig], *, skip_finished: bool = True, progress: bool = True) -> Any:
    """Run each config (finished ones, same config and results.json present, are skipped) -> pandas table."""
    import pandas as pd

    rows = [results_row(run_experiment(c, skip_finished=skip_finished, progress=progress)) for c in configs]
    return pd.DataFrame(rows)


def collect_results(root: str | Path) -> Any:
    """A pandas table of every ``results.json`` under ``root`` (e.g. a results folder from a GPU run)."""
    import pandas as pd

    paths = sorted(Path(root).rglob(RESULTS_NAME))
    rows = [results_row(json.loads(p.read_text(encoding="utf-8"))) for p in paths]
    return pd.DataFrame(rows)


def paper_reference() -> dict[str, Any]:
    """The paper's published numbers (``mile_utils/reference/mile_paper_results.json``)."""
    ref = resources.files("mile_utils.reference").joinpath("mile_paper_results.json")
    text = ref.read_text(encoding="utf-8")
    return json.loads(text)


def paper_rows(include_full: bool = True) -> list[dict[str, Any]]:
    """The 23 configurations of the paper's Tables 1–4 (plus full fine-tuning T/T/T) with their numbers.

    Each row: ``spec`` in our names (``F/lora/lora``), ``rank`` (LoRA rows), ``table``, and the paper's
    ``params_pct``, ``memory_gb``, ``open``, ``closed``, ``global`` (full fine-tuning: none in those tables).
    """
    rows = []
    for r in paper_reference()["tables_1_to_4"]:
        spec = "/".join(PAPER_METHODS[r[c]] for c in ("vit", "jtm", "dec"))
        rows.append({"spec": spec, "rank": r.get("rank"), **{k: r[k] for k in (
            "table", "params_pct", "memory_gb", "open", "closed", "global")}})
    if include_full:
        rows.append({"spec": "T/T/T", "rank": None, "table": None, "params_pct": 100.0, "memory_gb": None,
                     "open": None, "closed": None, "global": None})
    return rows


def paper_grid(base: RunConfig | None = None, *, include_full: bool = True,
               specs: Sequence[str] | None = None, out_root: str | Path | None = None) -> list[RunConfig]:
    """RunConfigs for the paper's grid (or the rows whose spec is in ``specs``), each in ``out_root/<slug>``.

    ``base`` carries everything else (profile, dataset, epochs, ...); LoRA rows take the row's rank.
    """
    base = base or RunConfig()
    root = Path(out_root) if out_root is not None else Path("runs") / f"{base.profile}-{base.dataset}"
    spec_type = _spec_type()
    configs = []
    for row in paper_rows(include_full):
        if specs is not None and row["spec"] not in specs:
            continue
        parsed = spec_type.parse(row["spec"])
        kw = base.spec.to_dict() | {"vit": parsed.vit, "jtm": parsed.jtm, "dec": parsed.dec}
        if row["rank"] is not None:
            kw["rank"] = row["rank"]
        cfg = replace(base, spec=spec_type.from_dict(kw))
        configs.append(replace(cfg, out=str(root / cfg.slug)))
    return configs


# ------------------------------------------------------------------------------------ finished runs as models
def trained_model(config: RunConfig) -> tuple[Any, Any]:
    """Tokenizer and model of a finished run: its initial weights, its spec, then its trained weights."""
    from .adapters import load_adapters

    cfg = config.resolved()
    weights = Path(cfg.out) / "weights"
    if not weights.is_dir():
        raise FileNotFoundError(f"{weights}: the run has no trained weights (has it finished?)")
    tokenizer, model = build_run(cfg)
    load_adapters(model, cfg.spec, weights)
    return tokenizer, model.eval()


def export_model(config: RunConfig, dest: str | Path) -> Path:
    """Write a finished run's whole model to ``dest`` (a folder ``RunConfig.checkpoint`` accepts); kept if there."""
    from .checkpoints import save_trained

    dest = Path(dest)
    if not (dest / "model.safetensors").is_file():
        save_trained(trained_model(config)[1], dest, metadata={"run": str(config.resolved().out)})
    return dest


def pretrained_stand_in(runs_dir: str | Path, *, seed: int = 0, data_seed: int = 0, size: str | int = "full",
                        progress: bool = True) -> str:
    """The starting weights of the ``tiny`` profile's chapters: a small stand-in for pretrained MISS.

    The paper froze and adapted *pretrained* components; there are no pretrained weights of the tiny size, and
    a frozen random ViT says nothing about freezing. So the stand-in is the tiny model fully trained (T/T/T,
    the profile's defaults) on another instance of the built-in set (generator seed ``data_seed + 1``: other
    scans and questions than the chapters train and test on); the chapters then fine-tune it. It is trained
    once, in ``runs_dir/tiny-pretrained``; returns the folder of the exported model (for ``checkpoint``).
    """
    root = Path(runs_dir) / "tiny-pretrained"
    cfg = RunConfig(profile="tiny", dataset="synthetic", spec="T/T/T", size=size, seed=seed,
                    data_seed=data_seed + 1, out=str(root / "T-T-T"))
    run_experiment(cfg, skip_finished=True, progress=progress)
    return str(export_model(cfg, root / f"model-{cfg.run_key()}"))


__all__ = [
    "RunConfig", "run_experiment", "run_grid", "collect_results", "results_row", "paper_rows", "paper_grid",
    "paper_reference", "load_results", "check_writable", "build_run", "peak_memory", "trained_model",
    "export_model", "pretrained_stand_in",
]
