"""Benchmark, not a test: samples/s and peak memory of our loop against a plain reference-style loop.

Both loops train the same model and spec on the same synthetic batches (random pixels, questions of random
words), side by side in one process:

* ours: :func:`mile_utils.train.train_model` itself: frozen components cached, bf16 autocast on a GPU, only
  trainable parameters in the per-epoch checkpoint. One warm-up step, then one epoch of ``steps`` timed steps
  (the cache is built before the epoch and timed apart).
* reference: what the MILE/MISS code does: fp32, the ViT and the JTM forward on every step, and the full model
  plus optimizer saved after each epoch. One warm-up step, then ``steps`` timed steps.

Checkpoint and cache costs are paid once per epoch / once per run, so they are amortised over the paper's
SLAKE schedule (4,919 training questions on 642 images, 130 epochs): seconds per sample = step time / batch +
checkpoint time / 4,919 (+ for ours, cache time per image x 642 / (4,919 x 130)).
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .profiles import get_profile
from .train import (
    TrainOptions,
    VQACollator,
    answer_loss,
    decoder_logits,
    fix_cross_attention_masks,
    make_accelerator,
    question_states,
    train_model,
)

DEFAULT_SPECS = ("T/T/T", "F/F/lora", "F/lora/lora", "F/T/lora", "T/T/lora", "F/F/prefix")
SLAKE_TRAIN_QUESTIONS = 4919
SLAKE_TRAIN_IMAGES = 642
PAPER_EPOCHS = 130
_WORDS = ("is", "there", "a", "lesion", "in", "the", "left", "right", "lung", "brain", "what", "organ",
          "shown", "image", "which", "plane", "does", "this", "look", "normal", "abnormal", "where", "liver",
          "kidney")


class _PeakRSS:
    """Samples the process's resident memory every 5 ms: CPU peak of one loop (CUDA has its own counter)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_dataset(n_samples: int, image_size: int, seed: int = 0, questions_per_image: int = 8) -> Any:
    """``n_samples`` records on random-pixel images (~8 questions per image, as SLAKE) as a VQADataset."""
    from .data import ImageTransform, VQADataset
    from .data.records import Record

    rng = np.random.default_rng(seed)
    n_images = max(1, n_samples // questions_per_image)
    images = [_png(rng, image_size) for _ in range(n_images)]
    records = []
    for i in range(n_samples):
        question = " ".join(rng.choice(_WORDS, size=int(rng.integers(6, 14)))) + "?"
        answer = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 3))))
        records.append(Record(img_name=f"bench{i % n_images}.png", question=question, answer=answer,
                              answer_type="OPEN", content_type="bench", qid=i,
                              image_bytes=images[i % n_images]))
    # decoded pixels stay in memory: image decoding is not what either loop is measured on
    return VQADataset(records, ImageTransform(image_size), train=True, seed=seed, cache_images=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device, rss: _PeakRSS) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else int(rss.peak)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _build(profile: str, spec: str, tokenizer: Any, device: torch.device, seed: int = 0) -> Any:
    from .adapters import apply_spec
    from .model import build_model

    model = apply_spec(build_model(profile, tokenizer, seed=seed), spec, seed=seed).to(device)
    fix_cross_attention_masks(model)
    return model


def reference_loop(model: Any, tokenizer: Any, profile: str, dataset: Any, batch_size: int, steps: int,
                   lr: float, device: torch.device, ckpt_dir: Path) -> dict[str, float]:
    """The reference's way: fp32, every component forward every step, full model + optimizer checkpoint."""
    prof = get_profile(profile)
    collate = VQACollator(tokenizer, prof, dataset, need_pixels=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05)
    model.train()

    def step(i: int) -> None:
        idx = [(i * batch_size + j) % len(dataset) for j in range(batch_size)]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(idx).items()}
        states = question_states(model, batch)
        logits = decoder_logits(model, states, batch["attention_mask"], batch["answer_ids"],
                                batch["answer_mask"])
        loss = answer_loss(logits, batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    _sync(device)
    step_s = time.perf_counter() - start
    start = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0},
               ckpt_dir / "reference_checkpoint.pth")
    ckpt_s = time.perf_counter() - start
    (ckpt_dir / "reference_checkpoint.pth").unlink()
    return {"step_s": step_s, "checkpoint_s": ckpt_s}


def _amortised_rate(step_s: float, steps: int, batch: int, ckpt_s: float,
                    cache_per_image_s: float = 0.0) -> float:
    per_sample = (step_s / (steps * batch) + ckpt_s / SLAKE_TRAIN_QUESTIONS
                  + cache_per_image_s * SLAKE_TRAIN_IMAGES / (SLAKE_TRAIN_QUESTIONS * PAPER_EPOCHS))
    return 1.0 / per_sample


def benchmark_spec(spec: str, profile: str, steps: int, batch_size: int, device: torch.device,
                   tokenizer: Any, workdir: Path, progress: bool = False) -> dict[str, Any]:
    """One configuration: our loop, then the reference loop, on fresh identical models."""
    from .adapters import count_parameters

    prof = get_profile(profile)
    dataset = synthetic_dataset(steps * batch_size, prof.image_size)
    acc = make_accelerator(cpu=device.type == "cpu")

    model = _build(profile, spec, tokenizer, device)
    params = count_parameters(model, spec)
    _reset_peak(device)
    with _PeakRSS() as rss:
        options = TrainOptions(epochs=1, batch_size=batch_size, lr=prof.lr, min_lr=prof.min_lr,
                               weight_decay=prof.weight_decay, progress=progress, run_key=f"bench:{spec}")
        out = workdir / spec.replace("/", "-")
        out.mkdir(parents=True, exist_ok=True)
        # one warm-up step on other images (allocators, kernels), as the reference loop's first step
        warm = synthetic_dataset(batch_size, prof.image_size, seed=1)
        train_model(model, tokenizer, prof, warm, options, namespace=f"bench-warm:{profile}", accelerator=acc)
        result = train_model(model, tokenizer, prof, dataset, options, namespace=f"bench:{profile}:{steps}",
                             out_dir=out, accelerator=acc)
    ours_peak = _peak(device, rss)
    timed = result.history[-1]
    n_images = len({r.img_name for r in dataset.records})
    cache_per_image = result.cache_seconds / n_images if result.cached.get("vit") else 0.0
    ours = _amortised_rate(timed["seconds"], steps, batch_size, timed["checkpoint_s"], cache_per_image)
    ours_detail = {"step_s": round(timed["seconds"], 4), "checkpoint_s": timed["checkpoint_s"],
                   "cache_s": round(result.cache_seconds, 4), "cached": result.cached}
    del model, result
    (out / "checkpoint.pt").unlink(missing_ok=True)

    model = _build(profile, spec, tokenizer, device)
    _reset_peak(device)
    with _PeakRSS() as rss:
        ref = reference_loop(model, tokenizer, profile, dataset, batch_size, steps, prof.lr, device, workdir)
    ref_peak = _peak(device, rss)
    reference = _amortised_rate(ref["step_s"], steps, batch_size, ref["checkpoint_s"])
    del model
    return {
        "spec": spec,
        "samples_per_s": round(ours, 3),
        "reference_samples_per_s": round(reference, 3),
        "speedup": round(ours / reference, 3),
        "peak_memory_bytes": ours_peak,
        "reference_peak_memory_bytes": ref_peak,
        "trainable_percent": round(params["percent"], 4),
        "ours": ours_detail,
        "reference": {k: round(v, 4) for k, v in ref.items()},
    }


def run_benchmark(profile: str = "tiny", steps: int | None = None, batch_size: int | None = None,
                  specs: Sequence[str] | None = None, device: str | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Benchmark ``specs`` (default: T/T/T, F/F/lora, F/lora/lora, F/T/lora, T/T/lora, F/F/prefix).

    Defaults: ``steps`` 10 on tiny, 3 on paper; ``batch_size`` the profile's on a GPU, 2 for paper on a CPU.
    """
    from .model import build_tokenizer

    prof = get_profile(profile)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or (10 if prof.name == "tiny" else 3)
    batch_size = batch_size or (prof.batch_size if dev.type == "cuda" or prof.name == "tiny" else 2)
    # the tiny tokenizer's ids fit every profile's vocabulary: synthetic text needs no downloaded vocabulary
    tokenizer = build_tokenizer("tiny")
    configs = []
    with tempfile.TemporaryDirectory(prefix="mile-bench-") as tmp:
        for spec in specs or DEFAULT_SPECS:
            configs.append(benchmark_spec(spec, prof.name, steps, batch_size, dev, tokenizer, Path(tmp),
                                          progress=progress))
    from .experiments import _environment

    return {
        "profile": prof.name, "steps": steps, "batch_size": batch_size, "device": str(dev),
        "amortised_over": {"train_questions": SLAKE_TRAIN_QUESTIONS, "images": SLAKE_TRAIN_IMAGES,
                           "epochs": PAPER_EPOCHS},
        "environment": _environment(make_accelerator(cpu=dev.type == "cpu")),
        "configs": configs,
    }


def format_table(report: dict[str, Any]) -> str:
    """The benchmark report as a fixed-width text table."""
    head = (f"benchmark: profile {report['profile']}, device {report['device']}, "
            f"batch {report['batch_size']}, {report['steps']} timed steps")
    cols = (f"{'spec':14s} {'ours/s':>9s} {'ref/s':>9s} {'speedup':>8s} {'peak MiB':>9s} {'ref MiB':>9s} "
            f"{'train %':>9s}")
    lines = [head, cols, "-" * len(cols)]
    for c in report["configs"]:
        lines.append(f"{c['spec']:14s} {c['samples_per_s']:9.2f} {c['reference_samples_per_s']:9.2f} "
                     f"{c['speedup']:7.2f}x {c['peak_memory_bytes'] / 2**20:9.0f} "
                     f"{c['reference_peak_memory_bytes'] / 2**20:9.0f} {c['trainable_percent']:9.3f}")
    return "\n".join(lines)
