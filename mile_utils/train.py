"""The one training loop for every component spec, run by components as BLIP/MISS (ViT -> JTM -> decoder), frozen
ones once per run; Accelerate does device, bf16, accumulation and data parallel; AdamW, per-epoch cosine schedule."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, send_to_device, set_seed
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from .adapters import adapter_step
from .files import atomic_write
from .model import COMPONENTS, ENC_TOKEN, component_modules
from .profiles import Profile, get_profile

CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept on disk."""


def encode_questions(tokenizer: Any, questions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[ENC] q... [SEP]`` ids and attention mask, truncated at ``max_tokens`` ([CLS] replaced by [ENC])."""
    enc = tokenizer(list(questions), padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    enc["input_ids"][:, 0] = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    return enc["input_ids"], enc["attention_mask"]


def encode_answers(tokenizer: Any, answers: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, ...]:
    """``[DEC] answer [SEP]`` ids, attention mask, and labels (pads -> -100), as BLIP's VQA training."""
    ids, mask = encode_questions(tokenizer, answers, max_tokens)
    ids[:, 0] = tokenizer.bos_token_id
    return ids, mask, ids.masked_fill(ids == tokenizer.pad_token_id, -100)


class VQACollator:
    """Indices of a :class:`mile_utils.data.VQADataset` -> a batch; pixels only when the ViT is not precomputed."""

    def __init__(self, tokenizer: Any, profile: Profile, dataset: Any, need_pixels: bool = True) -> None:
        self.tokenizer, self.profile, self.dataset, self.need_pixels = tokenizer, profile, dataset, need_pixels

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        records = [self.dataset.records[i] for i in indices]
        questions = [self.dataset.question_text(i) for i in indices]
        input_ids, attention_mask = encode_questions(self.tokenizer, questions, self.profile.max_question_tokens)
        answer_ids, answer_mask, labels = encode_answers(
            self.tokenizer, [r.answer for r in records], self.profile.max_answer_tokens)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_ids": answer_ids,
                 "answer_mask": answer_mask, "labels": labels, "img_names": [r.img_name for r in records],
                 "questions": questions, "indices": list(indices)}
        if self.need_pixels:
            batch["pixel_values"] = torch.stack([self.dataset.pixels(i) for i in indices])
        return batch


def question_states(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The JTM output for a batch: precomputed question states, or from image embeddings, or from pixels (the ViT's
    tokens after its final norm). No image mask: every image token is visible, as BLIP's all-ones mask says."""
    if (states := batch.get("question_states")) is not None:
        return states
    if (images := batch.get("image_embeds")) is None:
        images = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    return model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              encoder_hidden_states=images).last_hidden_state


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Per-answer loss: next-token cross-entropy with label smoothing, summed over the answer's tokens (BLIP)."""
    shifted, target = logits[:, :-1].float(), labels[:, 1:]  # fp32 softmax: bf16 logits lose the smoothing terms
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction="none").view(target.shape).sum(1)


class VQALoss(nn.Module):
    """The whole training forward as one module, so DDP (which hooks ``forward``) synchronises gradients."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.model.text_decoder(input_ids=batch["answer_ids"], attention_mask=batch["answer_mask"],
                                         encoder_hidden_states=question_states(self.model, batch),
                                         encoder_attention_mask=batch["attention_mask"]).logits
        return answer_loss(logits, batch["labels"], self.label_smoothing)


class FrozenFeatures:
    """One run's precompute, on the CPU: image embeddings of a frozen ViT, question states of a frozen ViT + JTM,
    computed once in eval mode (MISS's frozen parts apply dropout and drop-path at every step: ``use_cache=False``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, profile: Profile, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, enabled: bool = True, batch_size: int = 32) -> None:
        # a PEFT method (prefix/ptv2 included) puts trainable parameters inside its component: never precomputed
        frozen = {k: not any(p.requires_grad for p in m.parameters()) for k, m in component_modules(model).items()}
        self.model, self.tokenizer, self.profile, self.dtype = model, tokenizer, profile, dtype
        self.device, self.batch_size = torch.device(device), batch_size
        self.vit_cached = enabled and frozen["vit"]
        self.jtm_cached = self.vit_cached and frozen["jtm"]
        self._images: dict[str, torch.Tensor] = {}
        self._questions: dict[tuple[str, str], torch.Tensor] = {}

    def summary(self) -> dict[str, Any]:
        size = sum(t.numel() * t.element_size() for t in [*self._images.values(), *self._questions.values()])
        return {"vit": self.vit_cached, "jtm": self.jtm_cached, "bytes": size}

    @torch.no_grad()
    def prepare(self, dataset: Any, autocast: Callable[[], Any] = nullcontext, indices: Sequence[int] = ()) -> None:
        """Compute what ``dataset`` (or its ``indices``) asks for and is not stored yet: no-grad, eval mode."""
        if not self.vit_cached:
            return
        indices, training = indices or range(len(dataset)), self.model.training
        first: dict[str, int] = {}
        for i in indices:
            first.setdefault(dataset.records[i].img_name, i)
        todo = [(name, i) for name, i in first.items() if name not in self._images]
        questions = dict.fromkeys((dataset.records[i].img_name, dataset.question_text(i)) for i in indices)
        asked = [key for key in questions if key not in self._questions] if self.jtm_cached else []
        if not todo and not asked:  # the usual case inside the loop: no mode switch on every step
            return
        self.model.eval()
        try:
            for chunk in (todo[j:j + self.batch_size] for j in range(0, len(todo), self.batch_size)):
                pixels = torch.stack([dataset.pixels(i) for _, i in chunk]).to(self.device)
                with autocast():
                    embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state.to(self.dtype).cpu()
                for (name, _), e in zip(chunk, embeds, strict=True):
                    self._images[name] = e.clone()  # own storage, not a view of the batch
            for chunk in (asked[j:j + self.batch_size] for j in range(0, len(asked), self.batch_size)):
                ids, mask = encode_questions(self.tokenizer, [q for _, q in chunk], self.profile.max_question_tokens)
                batch = {"input_ids": ids, "attention_mask": mask,
                         "image_embeds": torch.stack([self._images[name] for name, _ in chunk])}
                with autocast():
                    states = question_states(self.model, send_to_device(batch, self.device)).to(self.dtype).cpu()
                for key, s, m in zip(chunk, states, mask, strict=True):
                    self._questions[key] = s[: int(m.sum())].clone()  # unpadded: padding is rebuilt per batch
        finally:
            self.model.train(training)

    @torch.no_grad()
    def attach(self, batch: dict[str, Any], dataset: Any, autocast: Callable[[], Any] = nullcontext) -> dict:
        """Add ``question_states`` or ``image_embeds`` to a collated batch (no-op when nothing is frozen)."""
        if not self.vit_cached:
            return batch
        self.prepare(dataset, autocast, batch["indices"])
        device, names = batch["input_ids"].device, batch["img_names"]
        if self.jtm_cached:
            length = batch["input_ids"].shape[1]
            rows = [self._questions[key] for key in zip(names, batch["questions"], strict=True)]
            batch["question_states"] = torch.stack([F.pad(s, (0, 0, 0, length - len(s))) for s in rows]).to(device)
        else:
            batch["image_embeds"] = torch.stack([self._images[n] for n in names]).to(device)
        return batch


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory window: CUDA's peak counter, or on Linux the process's resident high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The peak since :func:`reset_peak_memory`: CUDA max allocated, or the process's peak RSS (off Linux: lifetime)."""
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    if sys.platform.startswith("linux"):
        kib = int(re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore
        return {"peak_bytes": kib * 1024, "kind": "process_peak_rss_of_run"}
    import psutil
    info = psutil.Process().memory_info()
    return {"peak_bytes": int(getattr(info, "peak_wset", info.rss)), "kind": "process_peak_rss_since_start"}


def make_accelerator(grad_accum: int = 1, mixed_precision: str | None = None, cpu: bool | None = None) -> Accelerator:
    """An Accelerator: bf16 autocast on CUDA, fp32 on CPU; ``accelerate launch`` settings are honoured."""
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    if mixed_precision is None:  # bf16 on a CPU: emulated without AMX/AVX512-BF16 (README, bench: measured)
        mixed_precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # split_batches: each process takes its slice of a global batch (N processes = one with the global batch)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def train_model(model: nn.Module, tokenizer: Any, dataset: Any, options: Any, *, out_dir: str | Path | None = None,
                resume: bool = False, run_key: str = "", accelerator: Accelerator | None = None,
                progress: bool = True, on_step: Callable[[], Any] | None = None) -> dict:
    """Train ``model`` in place with ``options`` (a resolved ``RunConfig``); with ``out_dir`` a checkpoint each epoch,
    which ``resume`` continues if its ``run_key`` is this one; ``train_seconds``, ``samples``: this session's.
    ``on_step()`` runs after each step (the benchmark times a reference-loop step there)."""
    acc = accelerator or make_accelerator(options.grad_accum)
    if options.batch_size % acc.num_processes:
        raise ValueError(f"batch_size {options.batch_size} must be divisible by the {acc.num_processes} processes")
    if options.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {options.epochs}")
    if not len(dataset):
        raise ValueError("no training records")
    set_seed(options.seed)
    if options.gradient_checkpointing:
        # non-reentrant: gradients reach adapters inside checkpointed layers even when their inputs are frozen
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not (named := [(n, p) for n, p in model.named_parameters() if p.requires_grad]):
        raise ValueError("the model has no trainable parameters: check the component spec")
    # AdamW groups: the base rate (first, maybe empty), then one per method of method_lr with its components' part
    method_lr = options.method_lr or {}
    method_of = {COMPONENTS[c]: m for c, m in options.spec.methods.items() if m in method_lr}
    groups = {m: [p for n, p in named if method_of.get(n.split(".", 1)[0]) == m] for m in (None, *method_of.values())}
    optimizer = torch.optim.AdamW([{"params": ps, "method": m, "lr": method_lr[m] if m else options.lr}
                                   for m, ps in groups.items()], lr=options.lr, weight_decay=options.weight_decay,
                                  fused=True)  # one kernel per step: ~3x foreach's speed on a CPU
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.epochs, eta_min=options.min_lr)
    model.to(acc.device)
    prof = get_profile(options.profile)
    features = FrozenFeatures(model, tokenizer, prof, device=acc.device, enabled=options.use_cache,
                              dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32,
                              batch_size=max(options.batch_size, 32))
    order = list(range(len(dataset)))  # permuted in place each epoch, by (seed, epoch) alone
    loader = DataLoader(range(len(order)), batch_sampler=BatchSampler(order, options.batch_size, False),
                        collate_fn=VQACollator(tokenizer, prof, dataset, need_pixels=not features.vit_cached),
                        num_workers=options.num_workers)
    step_module, optimizer, loader = acc.prepare(VQALoss(model, options.label_smoothing), optimizer, loader)
    result: dict[str, Any] = {"history": [], "resumed_from_epoch": None, "samples": 0}
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["run_key"] != run_key or set(state["trainable"]) != {n for n, _ in named}:
            raise ValueError(f"{ckpt} belongs to another run (identity {state['run_key']!r}, this run {run_key!r}, "
                             "or other trainable parameters): use another --out or delete it")
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.update(history=list(state["history"]), resumed_from_epoch=state["epoch"])
    start_epoch = len(result["history"])
    cache_start = time.perf_counter()
    dataset.set_epoch(start_epoch)  # instruction prompts are drawn per epoch
    features.prepare(dataset, acc.autocast)
    result["cache_seconds"] = time.perf_counter() - cache_start
    steps_per_epoch = len(loader)
    adaptive = "adalora" in options.spec.methods.values()
    bar = tqdm(total=options.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               disable=not (progress and acc.is_main_process), desc="train", leave=False)
    step_module.train()
    reset_peak_memory(acc.device)  # this run's loop only: the precompute above is counted in its bytes
    train_start = time.perf_counter()
    for epoch in range(start_epoch, options.epochs):
        epoch_start = time.perf_counter()
        lr = {g["method"]: g["lr"] for g in optimizer.param_groups}
        # all an epoch draws (order, dropout, prompts) derives from (seed, epoch): a resumed epoch e is epoch e
        set_seed(int(np.random.SeedSequence([options.seed, epoch]).generate_state(1)[0]))
        order[:] = np.random.default_rng([options.seed, epoch]).permutation(len(order)).tolist()
        dataset.set_epoch(epoch)
        loss_sum, seen = torch.zeros((), device=acc.device, dtype=torch.float64), 0
        for step, batch in enumerate(loader):
            batch = features.attach(batch, dataset, acc.autocast)
            # rows of a short last batch's padding (even_batches) count neither in the loss nor in the gradient:
            # process k holds rows [k B/N, (k+1) B/N) of the global batch
            global_real = min(options.batch_size, len(dataset) - step * options.batch_size)
            start = acc.process_index * (options.batch_size // acc.num_processes)
            real = max(0, min(len(batch["indices"]), global_real - start))
            with acc.accumulate(step_module):
                with acc.autocast():
                    per_answer = step_module(batch)
                    if acc.num_processes == 1:
                        loss = per_answer.mean()  # BLIP: loss.sum() / batch size
                    else:  # DDP averages the processes' gradients: N processes == one with the global batch
                        loss = per_answer[:real].sum() * (acc.num_processes / global_real)
                # every process stops together on a NaN/inf loss, instead of hanging in an all-reduce
                if acc.reduce((~torch.isfinite(loss.detach())).float(), "sum").item() > 0:
                    kept = (f"the last good checkpoint (epoch {epoch}) is kept at {ckpt}" if ckpt and result["history"]
                            else "no checkpoint was written")
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}: training stopped; "
                        f"{kept}. Lower the learning rate or check the data; --resume continues from the checkpoint.")
                acc.backward(loss)
                optimizer.step()
                if adaptive and acc.sync_gradients:  # AdaLoRA reallocates its rank budget after each update
                    adapter_step(model, epoch * steps_per_epoch + step)
                optimizer.zero_grad(set_to_none=True)
            loss_sum += per_answer[:real].detach().double().sum()
            seen += real
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step()
        scheduler.step()
        total = acc.reduce(torch.tensor([loss_sum.item(), seen], device=acc.device, dtype=torch.float64), "sum")
        result["samples"] += int(total[1])
        entry = {"epoch": epoch + 1, "loss": float(total[0] / total[1]), "lr": lr.pop(None),
                 **({"method_lr": lr} if lr else {}), "seconds": round(time.perf_counter() - epoch_start, 3),
                 "checkpoint_s": 0.0}
        result["history"].append(entry)
        if ckpt is not None:
            save_start = time.perf_counter()
            if acc.is_main_process:
                state = {"epoch": epoch, "run_key": run_key, "history": result["history"],
                         "trainable": {n: p.detach().cpu() for n, p in named},
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                atomic_write(ckpt, lambda tmp, state=state: torch.save(state, tmp))
            acc.wait_for_everyone()
            entry["checkpoint_s"] = round(time.perf_counter() - save_start, 3)
    bar.close()
    result.update(train_seconds=time.perf_counter() - train_start, memory=peak_memory(acc.device),
                  cached=features.summary())
    step_module.eval()
    if options.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return result

