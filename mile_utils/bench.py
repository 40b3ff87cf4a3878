"""Benchmark, not a test: samples/s and peak memory of our loop against a plain reference-style loop.

Each configuration runs in its own fresh (spawned) process, on the same batches of the built-in set and fresh
identical models. Ours is :func:`mile_utils.train.train_model` itself (frozen parts precomputed, bf16 autocast on
a GPU, trainable-only checkpoint); the reference does what MILE/MISS does: fp32, every component forward every
step, the full model and optimizer saved after each epoch. After a warm-up of each (where the peak memory is
taken, one model alive at a time), the two alternate: ours one epoch of ``steps`` steps, the reference ``steps``
steps, ``repeats`` times, so a change of machine load hits both alike. The speedup is the median of the
``repeats`` paired ratios; the spread of a figure is (max - min) / median. Checkpoint and precompute costs are
amortised over the paper's SLAKE schedule (4,919 questions, 642 images, 130 epochs).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .profiles import get_profile
from .train import VQACollator, VQALoss, make_accelerator, peak_memory, reset_peak_memory, train_model

DEFAULT_SPECS = ("T/T/T", "F/F/lora", "F/lora/lora", "F/T/lora", "T/T/lora", "F/F/prefix", "F/F/ia3", "F/F/ptv2")
SLAKE_TRAIN_QUESTIONS, SLAKE_TRAIN_IMAGES, PAPER_EPOCHS = 4919, 642, 130


def _dataset(profile: str, n: int, split: str) -> Any:
    """``n`` records of the built-in set (recycled), pixels kept in memory: decoding is not what is measured."""
    from .data import ImageTransform, VQADataset, load_records

    records = load_records("synthetic", split, size="small")
    return VQADataset([records[i % len(records)] for i in range(n)], ImageTransform(get_profile(profile).image_size),
                      train=True, cache_images=True)


def _build(profile: str, spec: str, device: torch.device) -> Any:
    from .adapters import apply_spec
    from .model import build_model

    # no tokenizer: the paper size takes BLIP's ids; the tiny tokenizer's text ids fit every vocabulary
    return apply_spec(build_model(profile, seed=0), spec, seed=0).to(device)


def _rate(seconds: float, samples: int, ckpt_s: float, cache_per_image_s: float = 0.0) -> float:
    return 1.0 / (seconds / samples + ckpt_s / SLAKE_TRAIN_QUESTIONS
                  + cache_per_image_s * SLAKE_TRAIN_IMAGES / (SLAKE_TRAIN_QUESTIONS * PAPER_EPOCHS))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    median = statistics.median(values)
    return {"median": round(median, 4), "spread": round((max(values) - min(values)) / median, 4),
            "values": [round(v, 4) for v in values]}


def benchmark_spec(spec: str, profile: str, steps: int, repeats: int, batch_size: int, device: str) -> dict:
    """One configuration, ours and the reference alternating (call it in a fresh process: :func:`run_benchmark`)."""
    from .adapters import count_parameters
    from .experiments import RunConfig
    from .model import build_tokenizer

    dev, prof = torch.device(device), get_profile(profile)
    tokenizer = build_tokenizer("tiny")  # its ids fit every profile's vocabulary: no download needed
    dataset, samples = _dataset(profile, steps * batch_size, "train"), steps * batch_size
    acc = make_accelerator(cpu=dev.type == "cpu")
    options = RunConfig(profile=profile, spec=spec, epochs=1, batch_size=batch_size).resolved()
    n_images = len({r.img_name for r in dataset.records})
    with tempfile.TemporaryDirectory(prefix="mile-bench-") as tmp:
        def ours_epoch(model: Any, data: Any = dataset, out: str | None = tmp) -> dict:
            run = train_model(model, tokenizer, data, options, out_dir=out, accelerator=acc, progress=False)
            acc.free_memory()  # the accelerator would otherwise keep every call's optimizer (and its state)
            return {**run["history"][0], "cache_s": run["cache_seconds"], "cached": run["cached"],
                    "memory": run["memory"]}

        # warm-ups, one model alive at a time: allocators, kernels, and each loop's own peak memory
        model = _build(profile, spec, dev)
        params = count_parameters(model, spec)
        ours_memory = ours_epoch(model, _dataset(profile, steps * batch_size, "validation"), None)["memory"]
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ref_model = _build(profile, spec, dev)
        collate = VQACollator(tokenizer, prof, dataset, need_pixels=True)
        optimizer = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad], lr=prof.lr,
                                      weight_decay=prof.weight_decay)
        loss_fn = VQALoss(ref_model).train()

        def ref_block(save: bool = True) -> dict[str, float]:
            start = time.perf_counter()
            for i in range(steps):
                batch = collate(range(i * batch_size, (i + 1) * batch_size))
                loss = loss_fn({k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds, start = time.perf_counter() - start, time.perf_counter()
            if save:
                torch.save({"model": ref_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0},
                           Path(tmp) / "reference_checkpoint.pth")
            return {"seconds": seconds, "checkpoint_s": time.perf_counter() - start}

        reset_peak_memory(dev)
        ref_block(save=False)
        ref_memory = peak_memory(dev)
        model = _build(profile, spec, dev)
        ours_epoch(model)  # warm-up of this model; then the timed pairs
        pairs = [(ours_epoch(model), ref_block()) for _ in range(repeats)]
    ours, ref = [o for o, _ in pairs], [r for _, r in pairs]
    per_image = [o["cache_s"] / n_images if o["cached"]["vit"] else 0.0 for o in ours]
    ours_rates = [_rate(o["seconds"], samples, o["checkpoint_s"], c) for o, c in zip(ours, per_image, strict=True)]
    ref_rates = [_rate(r["seconds"], samples, r["checkpoint_s"]) for r in ref]
    ratios = _stats([a / b for a, b in zip(ours_rates, ref_rates, strict=True)])
    return {"spec": spec, "samples_per_s": round(statistics.median(ours_rates), 3),
            "reference_samples_per_s": round(statistics.median(ref_rates), 3), "speedup": ratios["median"],
            "speedup_spread": ratios["spread"], "trainable_percent": round(params["percent"], 4),
            "peak_memory_bytes": ours_memory["peak_bytes"], "reference_peak_memory_bytes": ref_memory["peak_bytes"],
            "memory_kind": ours_memory["kind"], "cache_bytes": ours[-1]["cached"]["bytes"],
            "ours": {"samples_per_s": _stats(ours_rates), "epoch_s": _stats([o["seconds"] for o in ours]),
                     "checkpoint_s": _stats([o["checkpoint_s"] for o in ours]),
                     "cache_s": _stats([o["cache_s"] for o in ours]), "cached": ours[-1]["cached"]},
            "reference": {"samples_per_s": _stats(ref_rates), "block_s": _stats([r["seconds"] for r in ref]),
                          "checkpoint_s": _stats([r["checkpoint_s"] for r in ref])}, "speedups": ratios["values"]}


def run_benchmark(profile: str = "tiny", steps: int | None = None, repeats: int | None = None,
                  batch_size: int | None = None, specs: Sequence[str] | None = None, device: str | None = None,
                  timeout_s: float = 3600.0) -> dict[str, Any]:
    """Benchmark ``specs`` (default :data:`DEFAULT_SPECS`), each in a fresh process. Defaults: ``steps`` 10 on
    tiny, 4 on paper; ``repeats`` 7; ``batch_size`` the profile's on a GPU or for tiny, 2 for paper on a CPU."""
    from .experiments import environment

    prof = get_profile(profile)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps, repeats = steps or (10 if prof.name == "tiny" else 4), repeats or 7
    batch_size = batch_size or (prof.batch_size if dev.type == "cuda" or prof.name == "tiny" else 2)
    configs, load = [], os.getloadavg()  # the machine's 1/5/15-min load: other processes slow both loops
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
            "environment": environment(make_accelerator(cpu=dev.type == "cpu")),
            "load_average": {"start": load, "end": os.getloadavg()}, "configs": configs}


def format_table(report: dict[str, Any]) -> str:
    """The benchmark report as a fixed-width text table."""
    head = (f"benchmark: profile {report['profile']}, device {report['device']}, batch {report['batch_size']}, "
            f"{report['repeats']} alternating pairs of {report['steps']} steps, each spec in its own process")
    cols = (f"{'spec':14s} {'ours/s':>9s} {'ref/s':>9s} {'speedup':>8s} {'spread':>7s} {'peak MiB':>9s} "
            f"{'ref MiB':>9s} {'cache MiB':>9s} {'train %':>9s}")
    lines = [head, cols, "-" * len(cols)]
    for c in report["configs"]:
        lines.append(f"{c['spec']:14s} {c['samples_per_s']:9.2f} {c['reference_samples_per_s']:9.2f} "
                     f"{c['speedup']:7.2f}x {c['speedup_spread']:7.0%} {c['peak_memory_bytes'] / 2**20:9.0f} "
                     f"{c['reference_peak_memory_bytes'] / 2**20:9.0f} {c['cache_bytes'] / 2**20:9.1f} "
                     f"{c['trainable_percent']:9.3f}")
    return "\n".join(lines)
