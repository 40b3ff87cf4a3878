"""Samples/s and peak memory of our loop (:func:`mile_utils.train.train_model`: frozen parts precomputed, trainable-only
checkpoint) against a reference-style loop (as MILE/MISS: fp32, every component forward every step, model and optimizer
saved each epoch). Peak memory comes from warm-ups with one model alive; then the loops take turns step by step, so a
change of machine load hits both alike: a repeat's speedup is the ratio of their median step times, the figure the
median over all repeats. Checkpoint and precompute costs are amortised over the paper's SLAKE schedule."""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import scipy.stats
import torch

from .adapters import apply_spec, count_parameters
from .data import ImageTransform, VQADataset, load_records
from .experiments import RunConfig, environment
from .model import build_model, build_tokenizer
from .profiles import get_profile
from .train import VQACollator, VQALoss, make_accelerator, peak_memory, reset_peak_memory, train_model

DEFAULT_SPECS = ("T/T/T", "F/F/lora", "F/lora/lora", "F/T/lora", "T/T/lora", "F/F/prefix", "F/F/ia3", "F/F/ptv2")
SLAKE_TRAIN_QUESTIONS, SLAKE_TRAIN_IMAGES, PAPER_EPOCHS = 4919, 642, 130


def _dataset(profile: str, n: int, split: str) -> Any:
    """``n`` records of the built-in set (recycled), pixels kept in memory: decoding is not what is measured."""
    records = load_records("synthetic", split, size="small")
    return VQADataset([records[i % len(records)] for i in range(n)], ImageTransform(get_profile(profile).image_size),
                      train=True, cache_images=True)


def _rate(seconds: float, samples: int, ckpt_s: float, cache_per_image_s: float = 0.0) -> float:
    return 1.0 / (seconds / samples + ckpt_s / SLAKE_TRAIN_QUESTIONS
                  + cache_per_image_s * SLAKE_TRAIN_IMAGES / (SLAKE_TRAIN_QUESTIONS * PAPER_EPOCHS))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Median, spread ((max - min) / median), the median's distribution-free 95% interval (none for n < 6)."""
    ordered, median, n = sorted(values), statistics.median(values), len(values)
    k = max((j for j in range(1, n // 2 + 1) if scipy.stats.binom.cdf(j - 1, n, 0.5) <= 0.025), default=0)
    ci = [round(ordered[k - 1], 4), round(ordered[-k], 4)] if k >= 1 else None
    return {"median": round(median, 4), "ci95": ci, "spread": round((max(values) - min(values)) / median, 4),
            "values": [round(v, 4) for v in values]}


def benchmark_spec(spec: str, profile: str, steps: int, repeats: int, batch_size: int, device: str,
                   threads: int | None = None) -> dict:
    """One configuration (call it in a fresh process: :func:`run_benchmark`), ``steps`` per epoch."""
    if threads:
        torch.set_num_threads(threads)
    dev, prof, tokenizer = torch.device(device), get_profile(profile), build_tokenizer("tiny")  # fits every vocab
    build = lambda: apply_spec(build_model(profile, seed=0), spec, seed=0).to(dev)  # noqa: E731 (BLIP's ids fit)
    acc = make_accelerator(cpu=dev.type == "cpu")
    options = RunConfig(profile=profile, spec=spec, epochs=1, batch_size=batch_size).resolved()
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda *_: None
    with tempfile.TemporaryDirectory(prefix="mile-bench-") as tmp:
        def ours_epoch(model: Any, data: Any, out: str | None = tmp, on_step: Any = None) -> dict:
            run = train_model(model, tokenizer, data, options, out_dir=out, accelerator=acc, progress=False,
                              on_step=on_step)
            acc.free_memory()  # the accelerator would otherwise keep every call's optimizer (and its state)
            return {**run["history"][0], "cache_s": run["cache_seconds"], "cached": run["cached"],
                    "memory": run["memory"]}
        model = build()  # warm-ups, one model alive at a time: allocators, kernels, each loop's own peak memory
        params, warm_data = count_parameters(model), _dataset(profile, steps * batch_size, "validation")
        first = ours_epoch(model, warm_data, None)
        # the same records in every run (a step count chosen by timing gave each run other questions to pad)
        dataset, samples = _dataset(profile, steps * batch_size, "train"), steps * batch_size
        del model, warm_data
        acc.free_memory()  # gc.collect() and, on a GPU, empty_cache()
        ref_model = build()
        collate = VQACollator(tokenizer, prof, dataset, need_pixels=True)
        optimizer = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad], lr=prof.lr,
                                      weight_decay=prof.weight_decay)
        loss_fn, ref_steps, our_steps, our_start = VQALoss(ref_model).train(), [], [], [None]

        def ref_step() -> None:  # one reference step, timed apart from ours (whose queued GPU work ends first)
            sync(dev)
            start, i = time.perf_counter(), len(ref_steps) % steps
            if our_start[0] is not None:  # our step: from the end of the last reference step to here
                our_steps.append(start - our_start[0])
            batch = collate(range(i * batch_size, (i + 1) * batch_size))
            loss = loss_fn({k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sync(dev)
            our_start[0] = time.perf_counter()
            ref_steps.append(our_start[0] - start)

        def ref_checkpoint() -> float:
            start = time.perf_counter()
            torch.save({"model": ref_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0},
                       Path(tmp) / "reference_checkpoint.pth")
            return time.perf_counter() - start
        reset_peak_memory(dev)
        for _ in range(steps):
            ref_step()
        ref_checkpoint()  # the reference's peak memory includes its epoch's checkpoint
        ref_memory, model = peak_memory(dev), build()
        ours_epoch(model, dataset, on_step=ref_step)  # warm-up of this model and of the alternation
        ours, ref = [], []
        gc.disable()  # as timeit: a collection would land in one loop's step at random (free_memory collects)
        for _ in range(repeats):
            done, our_done, our_start[0] = len(ref_steps), len(our_steps), None  # our first step holds set-up
            ours.append(ours_epoch(model, dataset, on_step=ref_step))
            # an epoch's time: its median step times steps (a stall of the machine in one step moves neither)
            ours[-1]["seconds"] = statistics.median(our_steps[our_done:]) * steps
            ref.append({"seconds": statistics.median(ref_steps[done:]) * steps, "checkpoint_s": ref_checkpoint()})
        gc.enable()
    n_images = len({r.img_name for r in dataset.records})
    ours_rates = [_rate(o["seconds"], samples, o["checkpoint_s"], o["cache_s"] / n_images if o["cached"]["vit"]
                        else 0.0) for o in ours]
    ref_rates = [_rate(r["seconds"], samples, r["checkpoint_s"]) for r in ref]
    return {"spec": spec, "steps": steps, "torch_threads": torch.get_num_threads(),
            "trainable_percent": round(params["percent"], 4),
            "memory_kind": first["memory"]["kind"],
            "speedup": [a / b for a, b in zip(ours_rates, ref_rates, strict=True)],
            "reference": {"samples_per_s": ref_rates, "peak_memory_bytes": ref_memory["peak_bytes"],
                          **{k: [r[k] for r in ref] for k in ("seconds", "checkpoint_s")}},
            "ours": {"samples_per_s": ours_rates, "peak_memory_bytes": first["memory"]["peak_bytes"],
                     **{k: [o[k] for o in ours] for k in ("seconds", "checkpoint_s", "cache_s")},
                     "cached": ours[-1]["cached"]}}


def _pool(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A spec's processes pooled: repeats (:func:`_stats`), the largest peak memory, each process's median speedup."""
    def pooled(loop: str) -> dict[str, Any]:
        lists = [k for k, v in parts[0][loop].items() if isinstance(v, list)]
        return parts[0][loop] | {k: _stats([v for p in parts for v in p[loop][k]]) for k in lists} | {
            "peak_memory_bytes": max(p[loop]["peak_memory_bytes"] for p in parts)}
    return parts[0] | {"speedup": _stats([v for p in parts for v in p["speedup"]]), "ours": pooled("ours"),
                       "reference": pooled("reference"),
                       "speedup_per_process": [round(statistics.median(p["speedup"]), 4) for p in parts]}


def run_benchmark(profile: str = "tiny", steps: int = 16, repeats: int = 24, processes: int = 12,
                  batch_size: int | None = None, specs: Sequence[str] | None = None, device: str | None = None,
                  threads: int | None = None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Benchmark ``specs``: ``repeats`` epochs of ``steps`` steps, split among ``processes`` fresh processes per spec,
    the specs taking turns (a frozen-encoder ratio moves by up to 17% from one process to the next). ``threads``:
    torch threads per process, 0: torch's default; None: 1 for tiny on a CPU, as the book trains (two threads widened
    a frozen-encoder ratio's process-to-process spread ~1.7x: the reference's long matmuls gain more from the second
    core than our short steps), else torch's default."""
    if steps < 2:
        raise ValueError(f"steps {steps}: at least 2 (an epoch's first step holds its set-up and is not timed)")
    if not 1 <= processes <= repeats:
        raise ValueError(f"processes {processes}: from 1 to repeats ({repeats}), each process timing one or more")
    prof = get_profile(profile)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or (prof.batch_size if dev.type == "cuda" or prof.name == "tiny" else 2)
    threads = (1 if prof.name == "tiny" and dev.type == "cpu" else 0) if threads is None else threads
    parts, load = {spec: [] for spec in specs or DEFAULT_SPECS}, os.getloadavg()  # other processes slow both loops
    # each process is forked from a server that has only imported this module (~8 s of imports each saved, so more
    # processes sample more of the machine's changing load); no fork on Windows and macOS: spawn
    context = multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
    for i, (spec, done) in enumerate((s, d) for _ in range(processes) for s, d in parts.items()):
        with context.Pool(1) as pool:  # on a timeout, leaving the block terminates the process
            n = repeats // processes + (i // len(parts) < repeats % processes)
            job = pool.apply_async(benchmark_spec, (spec, prof.name, steps, n, batch_size, str(dev), threads))
            try:
                done.append(job.get(timeout=timeout_s))
                pool.close()  # the worker exits by itself: a terminated one can leave a semaphore to the tracker
                pool.join()
            except multiprocessing.TimeoutError:
                raise TimeoutError(f"benchmark of {spec} ({prof.name}) took over {timeout_s:.0f} s") from None
    return {"profile": prof.name, "steps": steps, "repeats": repeats, "processes": processes,
            "batch_size": batch_size, "device": str(dev), "threads": threads or "torch default", "amortised_over": {
                "train_questions": SLAKE_TRAIN_QUESTIONS, "images": SLAKE_TRAIN_IMAGES, "epochs": PAPER_EPOCHS},
            "environment": environment(make_accelerator(cpu=dev.type == "cpu")),
            "load_average": {"start": load, "end": os.getloadavg()}, "configs": [_pool(p) for p in parts.values()]}


def format_table(report: dict[str, Any]) -> str:
    mib, rows = 2**20, {}
    for c in report["configs"]:
        ours, ref, speedup = c["ours"], c["reference"], c["speedup"]
        rows[c["spec"]] = {"steps": c["steps"], "ours/s": ours["samples_per_s"]["median"],
                           "ref/s": ref["samples_per_s"]["median"], "speedup": speedup["median"],
                           "95% CI": "–".join(f"{v:.2f}" for v in speedup["ci95"] or ()),
                           "per process": " ".join(f"{v:.2f}" for v in c["speedup_per_process"]),
                           "spread %": 100 * speedup["spread"], "peak MiB": ours["peak_memory_bytes"] / mib,
                           "ref MiB": ref["peak_memory_bytes"] / mib, "cache MiB": ours["cached"]["bytes"] / mib,
                           "train %": c["trainable_percent"]}
    return (f"benchmark: profile {report['profile']}, device {report['device']}, batch {report['batch_size']}, "
            f"torch threads {report.get('threads', 'torch default')}, "
            f"{report['repeats']} repeats in {report['processes']} fresh processes per spec, the loops alternating "
            "step by step\n" + pd.DataFrame(rows).T.astype({"steps": int}).to_string(float_format="{:.2f}".format))
