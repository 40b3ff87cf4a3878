"""Run one :class:`RunConfig` (data -> model -> spec -> train -> evaluate -> results.json), or a grid. A finished run
is known by its identity: settings, and data, weights and tokenizer by content, never by path (a folder may move)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path
from typing import Any

import accelerate
import pandas as pd
import peft
import torch
import transformers

from . import __version__
from .adapters import METHODS, RANKED, AdapterSpec, apply_spec, count_parameters, load_adapters, save_adapters
from .checkpoints import load_weights
from .data import ImageTransform, VQADataset, load_records
from .evaluate import evaluate_model
from .files import atomic_folder, folder_lock, write_json
from .model import build_model, build_tokenizer
from .profiles import PROFILES, get_profile
from .train import CHECKPOINT_NAME, make_accelerator, train_model

RESULTS_NAME, WEIGHTS_DIR = "results.json", "weights"
RUN_LOCK_TIMEOUT_S = 3 * 24 * 3600.0  # how long a process waits for another's run: longer than a paper-size run
# where a run's inputs lie: they enter its identity by content (data, weights, tokenizer) or not at all
_LOCATIONS = ("out", "checkpoint", "tokenizer", "root", "path", "size")
_RECORD_CONTENT = ("qid", "img_name", "question", "answer", "answer_type", "content_type", "q_lang", "prompts")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A RunConfig field with its CLI help (and choices): the CLI is generated from these."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RunConfig:
    """Everything that determines a run. ``None`` training settings take the profile's defaults."""

    profile: str = _opt("tiny", "model size and training defaults", choices=tuple(PROFILES))
    dataset: str = _opt("synthetic", "synthetic, slake, vqa-rad or instruction")
    spec: Any = field(default_factory=lambda: AdapterSpec.parse("F/T/T"))  # or "F/lora/lora", or its dict
    root: str | None = _opt(None, "dataset folder (Slake1.0, images root, synthetic cache)")
    path: str | None = _opt(None, "a dataset file (OSF VQA-RAD json, parquet, instruction json)")
    size: str | int | None = _opt(None, "built-in set size: full, small, or a number of images")
    epochs: int | None = _opt(None, "default: the profile's")
    batch_size: int | None = _opt(None, "global batch (default: the profile's)")
    lr: float | None = _opt(None, "initial learning rate (default: the profile's); given alone, all parts train at it")
    method_lr: dict[str, float] | str | None = _opt(None, "initial lr of a method's adapter parameters, e.g. "
                                                    "ia3=1e-2,ptv2=3e-2 (default: the profile's table, unless --lr)")
    min_lr: float | None = _opt(None, "cosine schedule's floor (default: the profile's)")
    weight_decay: float | None = _opt(None, "AdamW weight decay (default: the profile's)")
    seed: int = _opt(0, "initialisation and training seed")
    data_seed: int = _opt(0, "the built-in set's generator seed")
    out: str | None = _opt(None, "run folder (default: runs/PROFILE-DATASET/SPEC)")
    checkpoint: str | None = _opt(None, "initial weights: BLIP/MISS .pth, HF folder or hub id")
    tokenizer: str | None = _opt(None, "tokenizer folder or hub id (paper profile)")
    grad_accum: int = _opt(1, "gradient accumulation steps")
    train_split: str = _opt("train", "training split")
    eval_split: str = _opt("test", "evaluation split")
    max_train_samples: int | None = _opt(None, "keep a seeded random subset of the training records")
    max_eval_samples: int | None = _opt(None, "keep a seeded random subset of the evaluation records")
    eval_batch_size: int | None = _opt(None, "evaluation batch (default 64)")
    label_smoothing: float = _opt(0.1, "label smoothing of the answer loss")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass")
    use_cache: bool = _opt(True, "precompute frozen components once per run, in eval mode (no: every step, as MISS)")
    reference_quirk: bool = _opt(False, "the reference code's image scaling and generation question mask")
    mixed_precision: str | None = _opt(None, "default: bf16 on a GPU, fp32 on CPU", choices=("no", "bf16", "fp16"))
    num_workers: int = _opt(0, "DataLoader workers")

    def __post_init__(self) -> None:
        self.spec = AdapterSpec.from_dict(self.spec) if isinstance(self.spec, dict) else AdapterSpec.parse(self.spec)
        for f in fields(self):  # fail early, naming the field (the CLI checks its flags' choices itself)
            if (value := getattr(self, f.name)) is not None and value not in f.metadata.get("choices", (value,)):
                raise ValueError(f"{f.name} {value!r}: expected one of {f.metadata['choices']}")
        if isinstance(self.method_lr, str):  # the CLI's form: ia3=1e-2,ptv2=3e-2
            pairs = [kv.split("=") for kv in self.method_lr.split(",") if kv]
            try:
                self.method_lr = {m.strip(): float(r) for m, r in pairs}
            except ValueError as err:
                raise ValueError(f"method_lr {self.method_lr!r}: expected METHOD=LR,... e.g. ia3=1e-2") from err
        if unknown := set(self.method_lr or ()) - set(METHODS):
            raise ValueError(f"method_lr names unknown methods {sorted(unknown)}: expected some of {METHODS}")

    @property
    def spec_str(self) -> str:
        return str(self.spec)

    @property
    def slug(self) -> str:
        """A folder name for the run: ``F-lora-lora-r4``, ``T-T-T``, ``F-prefix-F-noop`` (the reference's defect)."""
        ranked = any(m in RANKED for m in self.spec.methods.values())
        return (self.spec_str.replace("/", "-") + (f"-r{self.spec.rank}" if ranked else "")
                + ("-noop" if self.spec.jtm_prefix_noop else ""))

    def resolved(self) -> RunConfig:
        """A copy with defaults and ``out`` set; ``method_lr``: the used methods' rates, or None (identity kept)."""
        prof, used = get_profile(self.profile), self.spec.methods.values()
        defaults = {name: getattr(prof, name) for name in ("epochs", "batch_size", "lr", "min_lr", "weight_decay")
                    if getattr(self, name) is None}
        return replace(self, **defaults, method_lr={m: r for m, r in self.method_rates().items() if m in used} or None,
                       out=str(self.out or Path("runs") / f"{self.profile}-{self.dataset}" / self.slug))

    def method_rates(self) -> dict[str, float]:
        """The per-method rates: as given, else the profile's table unless an explicit ``lr`` trains all at one."""
        if self.method_lr is None and self.lr is None:
            return dict(get_profile(self.profile).method_lr)
        return dict(self.method_lr or {})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method_lr" or self.method_lr is not None}
        return {**d, "spec": self.spec.to_dict(), "spec_str": self.spec_str}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def run_key(self) -> str:
        """The run's identity: a hash of what determines its result (loads the data to identify it)."""
        cfg = self.resolved()
        return run_identity(cfg, *_load_data(cfg))["key"]


@lru_cache(maxsize=256)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is read again
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(partial(stream.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_id(source: str | os.PathLike[str] | None) -> str | None:
    """A local file or folder by the SHA-256 of its (non-hidden) files' bytes and names; anything else by its name."""
    if source is None or not (path := Path(source).expanduser()).exists():
        return None if source is None else str(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:  # each file by its own digest (cached per process: a grid re-identifies one checkpoint often)
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else ''}:{_file_digest(f, st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()[:16]


def records_id(records: Sequence[Any]) -> str:
    """Records by content: their fields (not where their images lie) and their images' bytes."""
    h, images = hashlib.sha256(), {}
    for r in records:
        h.update(json.dumps({name: getattr(r, name) for name in _RECORD_CONTENT}, sort_keys=True, default=str).encode())
        if r.img_name not in images:
            data = r.image_bytes if r.image_bytes is not None else r.image_path.read_bytes()
            images[r.img_name] = hashlib.sha256(data).hexdigest()
    h.update(json.dumps(images, sort_keys=True).encode())
    return h.hexdigest()[:16]


def run_identity(cfg: RunConfig, train_records: Sequence[Any], eval_records: Sequence[Any]) -> dict[str, Any]:
    """``{"key", "data", "checkpoint", "tokenizer"}``: the config without locations, plus content ids."""
    settings = {k: v for k, v in cfg.resolved().to_dict().items() if k not in _LOCATIONS}
    parts = {"data": f"{records_id(train_records)}/{records_id(eval_records)}",
             "checkpoint": content_id(cfg.checkpoint), "tokenizer": content_id(cfg.tokenizer)}
    text = json.dumps({"settings": settings, **parts}, sort_keys=True, default=str)
    return {"key": hashlib.sha256(text.encode()).hexdigest()[:16], **parts}


def load_results(out: str | Path) -> dict[str, Any] | None:
    """The ``results.json`` of a run folder (``config.out`` set to where it lies now), or None if unfinished."""
    if not (path := Path(out) / RESULTS_NAME).is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    results["config"]["out"] = str(out)
    return results


def _load_data(cfg: RunConfig) -> tuple[list[Any], list[Any]]:
    def subset(split: str, n: int | None) -> list[Any]:
        records = load_records(cfg.dataset, split, root=cfg.root, path=cfg.path, size=cfg.size, seed=cfg.data_seed)
        if n is None or n >= len(records):
            return records
        return [records[i] for i in sorted(random.Random(cfg.seed).sample(range(len(records)), n))]
    return subset(cfg.train_split, cfg.max_train_samples), subset(cfg.eval_split, cfg.max_eval_samples)


def environment(acc: accelerate.Accelerator) -> dict[str, Any]:
    """Library versions, device and threads: what every results file and benchmark records."""
    device, cpuinfo = acc.device, Path("/proc/cpuinfo")  # Linux names the CPU model there; platform rarely does
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else next(
        (line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
         if line.startswith("model name")), platform.processor() or platform.machine())
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "mile_utils": __version__,
            "platform": platform.platform(), "device": str(device), "device_name": name,
            "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def build_run(cfg: RunConfig) -> tuple[Any, Any]:
    """Tokenizer and model for a resolved config: built, initial weights loaded, component spec applied."""
    tokenizer = build_tokenizer(cfg.profile, cfg.tokenizer)
    model = build_model(cfg.profile, tokenizer, seed=cfg.seed)
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint)
    return tokenizer, apply_spec(model, cfg.spec, seed=cfg.seed)


def run_experiment(config: RunConfig, resume: bool = False, *, skip_finished: bool = False,
                   keep_checkpoint: bool = False, progress: bool = True,
                   lock_timeout_s: float = RUN_LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Train and evaluate ``config`` into ``out/``. ``resume`` continues from the last epoch's checkpoint (deleted at
    the end unless ``keep_checkpoint``); with it or ``skip_finished`` a finished run of this identity is returned."""
    cfg = config.resolved()
    out = Path(cfg.out)
    wall_start = time.perf_counter()
    train_records, eval_records = _load_data(cfg)
    identity = run_identity(cfg, train_records, eval_records)

    def finished() -> dict[str, Any] | None:
        done = load_results(out)
        same = done is not None and done.get("identity", {}).get("key") == identity["key"]
        return done if same and (resume or skip_finished) else None
    if (done := finished()) is not None:
        return done  # found wherever the folder lies now, even read-only
    try:  # fail before any training if out cannot hold the results (not after an hour of GPU time)
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise PermissionError(f"run folder {out} is not writable ({err.strerror or err}): use another --out") from err
    acc = make_accelerator(cfg.grad_accum, cfg.mixed_precision)
    # the run is locked while it trains, by the main process (data-parallel ranks wait for it at the barrier)
    with folder_lock(out, lock_timeout_s) if acc.is_main_process else nullcontext():
        acc.wait_for_everyone()
        if (done := finished()) is not None:  # another process trained it while this one waited
            return done
        if "adalora" in cfg.spec.methods.values():  # its rank budget schedule spans the run's optimiser steps
            steps = cfg.epochs * -(-len(train_records) // cfg.batch_size) // cfg.grad_accum
            cfg.spec = replace(cfg.spec, total_step=max(1, steps))
        transform = ImageTransform(get_profile(cfg.profile).image_size, reference_quirk=cfg.reference_quirk)
        tokenizer, model = build_run(cfg)
        trained = train_model(model, tokenizer, VQADataset(train_records, transform, train=True, seed=cfg.seed), cfg,
                              out_dir=out, resume=resume, run_key=identity["key"], accelerator=acc, progress=progress)
        if acc.is_main_process:
            eval_start = time.perf_counter()
            evaluated = evaluate_model(
                model, tokenizer, cfg.profile, VQADataset(eval_records, transform, train=False, seed=cfg.seed),
                out_dir=out, batch_size=cfg.eval_batch_size or 64, device=acc.device, autocast=acc.autocast,
                use_cache=cfg.use_cache, dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32,
                reference_quirk=cfg.reference_quirk, progress=progress)
            eval_s, train_s = time.perf_counter() - eval_start, trained["train_seconds"]
            save_adapters(model, out / WEIGHTS_DIR)
            write_json(out / RESULTS_NAME, {
                "config": cfg.to_dict(), "identity": identity, "params": count_parameters(model),
                "metrics": evaluated["metrics"], "history": trained["history"],
                "data": {"train": len(train_records), "eval": len(eval_records), "eval_split": cfg.eval_split,
                         "train_images": len({r.img_name for r in train_records})},
                "timing": {"wall_s": round(time.perf_counter() - wall_start, 3), "train_s": round(train_s, 3),
                           "cache_s": round(trained["cache_seconds"], 3), "eval_s": round(eval_s, 3),
                           "train_samples_per_s": round(trained["samples"] / max(train_s, 1e-9), 3),
                           "resumed_from_epoch": trained["resumed_from_epoch"]},
                "cache": {**trained["cached"], "eval_bytes": evaluated["cache"]["bytes"]},
                # the training loop's peak (reset at its start); the frozen-feature precompute lies on the CPU apart
                "memory": {**trained["memory"], "cache_bytes": trained["cached"]["bytes"]},
                "environment": environment(acc), "files": {"predictions": "predictions.jsonl", "weights": WEIGHTS_DIR}})
            if not keep_checkpoint:
                (out / CHECKPOINT_NAME).unlink(missing_ok=True)
        acc.wait_for_everyone()
    return load_results(out)  # type: ignore[return-value]


def results_row(results: dict[str, Any]) -> dict[str, Any]:
    """One flat table row of a run's results (what the grid table and the book's comparisons show)."""
    cfg, m, p, spec = results["config"], results["metrics"], results["params"], results["config"]["spec"]
    return {"spec": cfg["spec_str"], "vit": spec["vit"], "jtm": spec["jtm"], "dec": spec["dec"],
            # the rank means something only where a ranked method (LoRA, ...) is used; elsewhere it is left empty
            "rank": spec.get("rank") if any(spec[c] in RANKED for c in ("vit", "jtm", "dec")) else None,
            "profile": cfg["profile"], "dataset": cfg["dataset"], "epochs": cfg["epochs"], "seed": cfg["seed"],
            "trainable_pct": p.get("percent"), "trainable": p.get("trainable"), "total": p.get("total"),
            "open": m["open"]["accuracy"], "closed": m["closed"]["accuracy"], "global": m["global"]["accuracy"],
            "final_loss": results["history"][-1]["loss"] if results.get("history") else None,
            "peak_memory_gb": results["memory"]["peak_bytes"] / 2**30, "memory_kind": results["memory"]["kind"],
            "cache_gb": results["memory"].get("cache_bytes", 0) / 2**30,
            "wall_s": results["timing"]["wall_s"], "train_samples_per_s": results["timing"]["train_samples_per_s"],
            "device": results["environment"]["device_name"], "out": cfg["out"]}


def run_grid(configs: Iterable[RunConfig], *, skip_finished: bool = True, progress: bool = True) -> pd.DataFrame:
    """Run each config (a finished run of the same identity in its folder is skipped) -> pandas table."""
    return pd.DataFrame(results_row(run_experiment(c, skip_finished=skip_finished, progress=progress)) for c in configs)


def collect_results(root: str | Path) -> pd.DataFrame:
    return pd.DataFrame([results_row(load_results(p.parent)) for p in sorted(Path(root).rglob(RESULTS_NAME))])


def paper_reference() -> dict[str, Any]:
    ref = resources.files("mile_utils.reference").joinpath("mile_paper_results.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def paper_rows(include_full: bool = True) -> list[dict[str, Any]]:
    """The 23 configurations of the paper's Tables 1–4 (plus T/T/T, not in them) with their numbers, specs in ours."""
    keys = ("table", "params_pct", "memory_gb", "open", "closed", "global")
    rows = [{"spec": str(AdapterSpec(r["vit"], r["jtm"], r["dec"])), "rank": r.get("rank"), **{k: r[k] for k in keys}}
            for r in paper_reference()["tables_1_to_4"]]
    return rows + [{"spec": "T/T/T", "rank": None, **dict.fromkeys(keys), "params_pct": 100.0}] * include_full


def paper_grid(base: RunConfig | None = None, *, table: int | None = None, include_full: bool = True,
               specs: Sequence[str] | None = None, out_root: str | Path | None = None) -> list[RunConfig]:
    """RunConfigs for the paper's grid, each in ``out_root/<slug>``: the rows of Table ``table`` (1-4) only,
    or the rows whose spec is in ``specs``. ``base`` carries everything else; LoRA rows take the row's rank."""
    base = base or RunConfig()
    if table not in (None, 1, 2, 3, 4):
        raise ValueError(f"table {table!r}: the paper's grid has Tables 1-4")
    root = Path(out_root) if out_root is not None else Path("runs") / f"{base.profile}-{base.dataset}"
    rows = [r for r in paper_rows(include_full)
            if (specs is None or r["spec"] in specs) and (table is None or r["table"] == table)]
    configs = [replace(base, spec=replace(base.spec, **AdapterSpec.parse(r["spec"]).methods,
                                          rank=r["rank"] or base.spec.rank)) for r in rows]
    return [replace(cfg, out=str(root / cfg.slug)) for cfg in configs]


def trained_model(config: RunConfig) -> tuple[Any, Any]:
    """Tokenizer and model of a finished run: its initial weights, its spec, then its trained weights."""
    cfg = config.resolved()
    tokenizer, model = build_run(cfg)
    load_adapters(model, cfg.spec, Path(cfg.out) / WEIGHTS_DIR)  # FileNotFoundError if the run has not finished
    return tokenizer, model.eval()


def export_model(config: RunConfig, dest: str | Path) -> Path:
    """Write a finished run's whole model to ``dest`` (a folder ``RunConfig.checkpoint`` accepts); kept if there."""
    dest = Path(dest)
    if not (dest / "model.safetensors").is_file():  # a Hugging Face folder: config.json + model.safetensors
        atomic_folder(dest, lambda tmp: trained_model(config)[1].save_pretrained(tmp), done="model.safetensors")
    return dest


def pretrained_stand_in(runs_dir: str | Path, *, seed: int = 0, data_seed: int = 0, size: str | int = "full",
                        progress: bool = True) -> str:
    """The tiny chapters' stand-in for pretrained MISS (a frozen random ViT says nothing about freezing): T/T/T trained
    on the set's ``pretraining`` variant (shifted, as MISS's data from SLAKE); the exported model's folder."""
    root = Path(runs_dir) / "tiny-pretrained"
    images = "full" if str(size) in ("small", "full") else size
    cfg = RunConfig(profile="tiny", dataset="synthetic", spec="T/T/T", size=f"pretraining:{images}", seed=seed,
                    data_seed=data_seed + 1, epochs=3, batch_size=16, out=str(root / "T-T-T"))
    results = run_experiment(cfg, skip_finished=True, progress=progress)
    return str(export_model(cfg, root / f"model-{results['identity']['key']}"))
