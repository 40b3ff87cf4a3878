"""Benchmark, not a test: samples/s and peak memory of our loop against a plain reference-style loop.

Each configuration is measured in its own fresh (spawned) process, so memory and allocator state never carry
over from one configuration to the next. In that process, on the same batches of the built-in set (small) and
fresh identical models:

* ours: :func:`mile_utils.train.train_model` itself (frozen components precomputed, bf16 autocast on a GPU,
  trainable-only checkpoint each epoch): one warm-up epoch on other images, then ``repeats`` timed epochs of
  ``steps`` steps (the precompute is timed apart);
* reference: what the MILE/MISS code does: fp32, every component forward every step, the full model plus
  optimizer saved after each epoch: one warm-up block, then ``repeats`` timed blocks of ``steps`` steps.

The figures are medians over the timed blocks, with their spread ((max - min) / median); the speedup is the
ratio of the two medians, measured in the same process. Checkpoint and precompute costs are paid once per
epoch / once per run, so they are amortised over the paper's SLAKE schedule (4,919 training questions on 642
images, 130 epochs): seconds per sample = block time / (steps x batch) + checkpoint time / 4,919 (+ for ours,
precompute time per image x 642 / (4,919 x 130)). Peak memory: the loop's own (CUDA max allocated, or the
process's peak resident set on a CPU), reset at the loop's start.
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .profiles import get_profile
from .train import (
    VQALoss,
    make_accelerator,
    peak_memory,
    reset_peak_memory,
    train_model,
)

DEFAULT_SPECS = ("T/T/T", "F/F/lora", "F/lora/lora", "F/T/lora", "T/T/lora", "F/F/prefix")
SLAKE_TRAIN_QUESTIONS, SLAKE_TRAIN_IMAGES, PAPER_EPOCHS = 4919, 642, 130


def _dataset(profile: str, n: int, split: str) -> Any:
    """``n`` records of the built-in set (recycled if it has fewer), decoded pixels kept in memory: image decoding
    is not what either loop is measured on."""
    from .data import ImageTransform, VQADataset, load_records

    records = load_records("synthetic", split, size="small")
    return VQADataset([records[i % len(records)] for i in range(n)], ImageTransform(get_profile(profile).image_size),
                      train=True, cache_images=True)


def _build(profile: str, spec: str, device: torch.device) -> Any:
    from .adapters import apply_spec
    from .model import build_model

    # no tokenizer: the paper size takes BLIP's ids; the tiny tokenizer's text ids fit every vocabulary
    return apply_spec(build_model(profile, seed=0), spec, seed=0).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(model: Any, tokenizer: Any, profile: str, dataset: Any, batch_size: int, steps: int,
                   repeats: int, device: torch.device, ckpt_dir: Path) -> dict[str, Any]:
    """The reference's way: fp32, every component forward every step, full model + optimizer checkpoint."""
    from .train import VQACollator

    prof = get_profile(profile)
    collate = VQACollator(tokenizer, prof, dataset, need_pixels=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=prof.lr,
                                  weight_decay=prof.weight_decay)
    loss_fn = VQALoss(model).train()

    def block(first: int) -> float:
        start = time.perf_counter()
        for i in range(first, first + steps):
            idx = [(i * batch_size + j) % len(dataset) for j in range(batch_size)]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(idx).items()}
            loss = loss_fn(batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    block(0)  # warm-up
    reset_peak_memory(device)
    blocks = [block(steps * (r + 1)) for r in range(repeats)]
    memory = peak_memory(device)
    start = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0},
               ckpt_dir / "reference_checkpoint.pth")
    ckpt_s = time.perf_counter() - start
    (ckpt_dir / "reference_checkpoint.pth").unlink()
    return {"block_s": blocks, "checkpoint_s": ckpt_s, "memory": memory}


def _rate(block_s: float, steps: int, batch: int, ckpt_s: float, cache_per_image_s: float = 0.0) -> float:
    return 1.0 / (block_s / (steps * batch) + ckpt_s / SLAKE_TRAIN_QUESTIONS
                  + cache_per_image_s * SLAKE_TRAIN_IMAGES / (SLAKE_TRAIN_QUESTIONS * PAPER_EPOCHS))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    median = statistics.median(values)
    return {"median_s": round(median, 4), "spread": round((max(values) - min(values)) / median, 4),
            "block_s": [round(v, 4) for v in values]}


def benchmark_spec(spec: str, profile: str, steps: int, repeats: int, batch_size: int, device: str) -> dict:
    """One configuration, our loop then the reference loop on fresh identical models (call it in a fresh
    process: :func:`run_benchmark` does)."""
    from .adapters import count_parameters
    from .experiments import RunConfig
    from .model import build_tokenizer

    dev = torch.device(device)
    tokenizer = build_tokenizer("tiny")  # its ids fit every profile's vocabulary: no download needed
    dataset = _dataset(profile, steps * batch_size, "train")
    acc = make_accelerator(cpu=dev.type == "cpu")
    with tempfile.TemporaryDirectory(prefix="mile-bench-") as tmp:
        model = _build(profile, spec, dev)
        params = count_parameters(model, spec)
        options = RunConfig(profile=profile, spec=spec, epochs=1, batch_size=batch_size).resolved()
        train_model(model, tokenizer, _dataset(profile, batch_size, "validation"), options, accelerator=acc,
                    progress=False)  # warm-up on other images: allocators, kernels
        ours = train_model(model, tokenizer, dataset, replace(options, epochs=repeats), out_dir=tmp,
                           accelerator=acc, progress=False)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ref = reference_loop(_build(profile, spec, dev), tokenizer, profile, dataset, batch_size,
                             steps, repeats, dev, Path(tmp))
    ours_s = _stats([h["seconds"] for h in ours["history"]])
    ours_ckpt = statistics.median(h["checkpoint_s"] for h in ours["history"])
    n_images = len({r.img_name for r in dataset.records})
    cache_per_image = ours["cache_seconds"] / n_images if ours["cached"]["vit"] else 0.0
    ours_rate = _rate(ours_s["median_s"], steps, batch_size, ours_ckpt, cache_per_image)
    ref_s = _stats(ref["block_s"])
    ref_rate = _rate(ref_s["median_s"], steps, batch_size, ref["checkpoint_s"])
    return {"spec": spec, "samples_per_s": round(ours_rate, 3), "reference_samples_per_s": round(ref_rate, 3),
            "speedup": round(ours_rate / ref_rate, 3), "trainable_percent": round(params["percent"], 4),
            "peak_memory_bytes": ours["memory"]["peak_bytes"],
            "reference_peak_memory_bytes": ref["memory"]["peak_bytes"],
            "memory_kind": ours["memory"]["kind"], "cache_bytes": ours["cached"]["bytes"],
            "ours": {**ours_s, "checkpoint_s": round(ours_ckpt, 4), "cache_s": round(ours["cache_seconds"], 4),
                     "cached": ours["cached"]},
            "reference": {**ref_s, "checkpoint_s": round(ref["checkpoint_s"], 4)}}


def run_benchmark(profile: str = "tiny", steps: int | None = None, repeats: int | None = None,
                  batch_size: int | None = None, specs: Sequence[str] | None = None, device: str | None = None,
                  timeout_s: float = 3600.0) -> dict[str, Any]:
    """Benchmark ``specs`` (default: T/T/T, F/F/lora, F/lora/lora, F/T/lora, T/T/lora, F/F/prefix), each in a
    fresh process. Defaults: ``steps`` 10 on tiny, 3 on paper; ``repeats`` 5; ``batch_size`` the profile's on a
    GPU or for tiny, 2 for paper on a CPU."""
    from .experiments import environment

    prof = get_profile(profile)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or (10 if prof.name == "tiny" else 3)
    repeats = repeats or 5
    batch_size = batch_size or (prof.batch_size if dev.type == "cuda" or prof.name == "tiny" else 2)
    configs = []
    for spec in specs or DEFAULT_SPECS:
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving the block terminates the process
            job = pool.apply_async(benchmark_spec, (spec, prof.name, steps, repeats, batch_size, str(dev)))
            try:
                configs.append(job.get(timeout=timeout_s))
            except multiprocessing.TimeoutError:
                raise TimeoutError(f"benchmark of {spec} ({prof.name}) took over {timeout_s:.0f} s") from None
    return {"profile": prof.name, "steps": steps, "repeats": repeats, "batch_size": batch_size, "device": str(dev),
            "amortised_over": {"train_questions": SLAKE_TRAIN_QUESTIONS, "images": SLAKE_TRAIN_IMAGES,
                               "epochs": PAPER_EPOCHS},
            "environment": environment(make_accelerator(cpu=dev.type == "cpu")), "configs": configs}


def format_table(report: dict[str, Any]) -> str:
    """The benchmark report as a fixed-width text table."""
    head = (f"benchmark: profile {report['profile']}, device {report['device']}, batch {report['batch_size']}, "
            f"{report['repeats']} timed blocks of {report['steps']} steps per loop, each spec in its own process")
    cols = (f"{'spec':14s} {'ours/s':>9s} {'ref/s':>9s} {'speedup':>8s} {'spread':>13s} {'peak MiB':>9s} "
            f"{'ref MiB':>9s} {'cache MiB':>9s} {'train %':>9s}")
    lines = [head, cols, "-" * len(cols)]
    for c in report["configs"]:
        spread = f"{c['ours']['spread']:.0%}/{c['reference']['spread']:.0%}"
        lines.append(f"{c['spec']:14s} {c['samples_per_s']:9.2f} {c['reference_samples_per_s']:9.2f} "
                     f"{c['speedup']:7.2f}x {spread:>13s} {c['peak_memory_bytes'] / 2**20:9.0f} "
                     f"{c['reference_peak_memory_bytes'] / 2**20:9.0f} {c['cache_bytes'] / 2**20:9.1f} "
                     f"{c['trainable_percent']:9.3f}")
    return "\n".join(lines)
