"""The one training loop: every component spec (F / T / PEFT per ViT, JTM, decoder) trains through it.

The forward runs by components, as BLIP/MISS do: ViT -> image embeddings -> JTM (question tokens
cross-attending to the image) -> question states -> decoder (answer tokens cross-attending to the
question states). Frozen components are computed once and cached (:class:`FrozenFeatures`); the loop
itself is Accelerate (device placement, bf16 autocast on GPU, gradient accumulation, data parallel),
AdamW over trainable parameters only, the reference's per-epoch cosine schedule, and an atomic per-epoch
checkpoint holding only what cannot be rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .model import ENC_TOKEN, component_modules
from .profiles import Profile, get_profile

CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept on disk."""


# ------------------------------------------------------------------------------------------- small helpers
def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_torch_atomic(path: str | Path, obj: object) -> None:
    """``torch.save`` via a temporary file and a rename: a kill mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """BLIP's per-epoch cosine schedule: ``(init - min) * 0.5 * (1 + cos(pi * epoch / max_epoch)) + min``."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the optimizer sees and the checkpoint stores: those with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def weights_fingerprint(*modules: nn.Module) -> str:
    """A content hash of modules' weights, cheap enough for the paper ViT on a GPU.

    Each tensor contributes its name, shape, an evenly strided sample of its values and its float64 sum and
    absolute sum, so any training step, any checkpoint load or a different seed changes the fingerprint;
    memory addresses play no part, so two identical models share cache entries.
    """
    h = hashlib.sha1()
    for module in modules:
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            sample = flat[::step][:1024].float().cpu().numpy()
            sums = torch.stack([flat.double().sum(), flat.double().abs().sum()]).cpu().numpy()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(sample.tobytes())
            h.update(sums.tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(repr(vocab).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------- collate
def encode_questions(
    tokenizer: Any, questions: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[ENC] q... [SEP]`` ids and attention mask, truncated at ``max_tokens`` ([CLS] replaced by [ENC])."""
    enc = tokenizer(list(questions), padding="longest", truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    return ids, enc["attention_mask"]


def encode_answers(
    tokenizer: Any, answers: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[DEC] answer [SEP]`` ids, attention mask, and labels (pads -> -100), as BLIP's VQA training."""
    enc = tokenizer(list(answers), padding="longest", truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = tokenizer.bos_token_id
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    return ids, enc["attention_mask"], labels


class VQACollator:
    """Turns dataset indices into a batch; loads pixels only when the ViT is not served from the cache.

    ``dataset`` is a :class:`mile_utils.data.VQADataset` (or anything with ``records``, ``question_text(i)``
    and ``pixels(i)``): it decides the question text, e.g. the instruction prompt drawn for this epoch.
    """

    def __init__(self, tokenizer: Any, profile: Profile, dataset: Any, need_pixels: bool = True) -> None:
        self.tokenizer = tokenizer
        self.profile = profile
        self.dataset = dataset
        self.need_pixels = need_pixels

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        records = [self.dataset.records[i] for i in indices]
        questions = [self.dataset.question_text(i) for i in indices]
        input_ids, attention_mask = encode_questions(
            self.tokenizer, questions, self.profile.max_question_tokens)
        answer_ids, answer_mask, labels = encode_answers(
            self.tokenizer, [r.answer for r in records], self.profile.max_answer_tokens)
        batch: dict[str, Any] = {
            "input_ids": input_ids, "attention_mask": attention_mask,
            "answer_ids": answer_ids, "answer_mask": answer_mask, "labels": labels,
            "img_names": [r.img_name for r in records], "questions": questions, "indices": list(indices),
        }
        if self.need_pixels:
            batch["pixel_values"] = torch.stack([self.dataset.pixels(i) for i in indices])
        return batch


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch): the data order survives a resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------------------------------- forward
_MASK_FIX_ATTR = "_mile_cross_mask_fixed"


def _cross_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None,
                             encoder_hidden_states: torch.Tensor | None = None, cache: Any = None,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    # the layer hands the encoder mask over as ``attention_mask``; pass it where the attention reads it
    context, probs = self.self(hidden_states, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=attention_mask, cache=cache)
    return self.output(context, hidden_states), probs


def fix_cross_attention_masks(model: nn.Module) -> int:
    """Make the text stacks' cross-attention honour ``encoder_attention_mask``; returns the layers patched.

    In transformers 5.x, ``BlipTextAttention`` passes the layer's encoder mask to its self-attention as
    ``attention_mask``, which a cross-attention ignores (it reads ``encoder_attention_mask``): the decoder
    then attends to the question's padding, so results depend on how questions are batched, unlike BLIP/MISS
    (``med.py`` masks it). Idempotent; the JTM is unaffected in effect (its image mask is all ones).
    """
    patched = 0
    for module in model.modules():
        cross = getattr(module, "crossattention", None)
        if cross is not None and not getattr(cross, _MASK_FIX_ATTR, False):
            cross.forward = types.MethodType(_cross_attention_forward, cross)
            setattr(cross, _MASK_FIX_ATTR, True)
            patched += 1
    return patched


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViT patch + [CLS] embeddings (after the final layer norm, as BLIP's ``visual_encoder``)."""
    return _hidden(component_modules(model)["vit"](pixel_values=pixel_values))


def encode_questions_with_images(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
) -> torch.Tensor:
    """JTM: question tokens self-attend and cross-attend to all image tokens."""
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return _hidden(component_modules(model)["jtm"](
        input_ids=input_ids, attention_mask=attention_mask,
        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask))


def question_states(
    model: nn.Module, batch: dict[str, Any], *, image_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """The JTM output for a batch, from cached question states, cached image embeddings or pixels."""
    if batch.get("question_states") is not None:
        return batch["question_states"]
    if image_embeds is None:
        image_embeds = batch.get("image_embeds")
    if image_embeds is None:
        image_embeds = encode_images(model, batch["pixel_values"])
    return encode_questions_with_images(model, batch["input_ids"], batch["attention_mask"], image_embeds)


def decoder_logits(
    model: nn.Module, states: torch.Tensor, question_mask: torch.Tensor,
    answer_ids: torch.Tensor, answer_mask: torch.Tensor,
) -> torch.Tensor:
    # the real question mask, not all-ones as HF's BlipForQuestionAnswering.generate passes
    out = component_modules(model)["dec"](
        input_ids=answer_ids, attention_mask=answer_mask,
        encoder_hidden_states=states, encoder_attention_mask=question_mask)
    return out.logits if hasattr(out, "logits") else out[0]


def answer_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1, reduction: str = "sum"
) -> torch.Tensor:
    """Per-answer loss: next-token cross-entropy, label smoothing, ``sum`` (BLIP) or ``mean`` over tokens."""
    shifted = logits[:, :-1].float()  # fp32 softmax: bf16 logits lose the small smoothing terms
    target = labels[:, 1:]
    tok = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=-100,
                          label_smoothing=label_smoothing, reduction="none").view(target.shape)
    per_answer = tok.sum(1)
    if reduction == "mean":
        per_answer = per_answer / (target != -100).sum(1).clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"loss reduction {reduction!r}: expected 'sum' (BLIP) or 'mean'")
    return per_answer


class VQALoss(nn.Module):
    """The whole training forward as one module, so DDP (which hooks ``forward``) synchronises gradients."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.1, reduction: str = "sum") -> None:
        super().__init__()
        fix_cross_attention_masks(model)
        self.model = model
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        states = question_states(self.model, batch)
        logits = decoder_logits(self.model, states, batch["attention_mask"], batch["answer_ids"],
                                batch["answer_mask"])
        return answer_loss(logits, batch["labels"], self.label_smoothing, self.reduction)


# ---------------------------------------------------------------------------------------------------- caches
class FeatureCache:
    """Process-wide store of frozen components' outputs, shared by the runs of a grid in one process.

    Keys carry the weights' fingerprint, the profile, the dataset namespace and the input (image, question),
    so an entry can only be served to a model whose frozen part computes exactly that value. Oldest entries go
    first once ``max_bytes`` is reached; a run pins what it uses in :class:`FrozenFeatures` meanwhile.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self._store.get(key)
        if value is not None:
            self._store.move_to_end(key)
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._store:
            old = self._store.pop(key)
            self.bytes -= old.numel() * old.element_size()
        self._store[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._store)


GLOBAL_CACHE = FeatureCache(int(os.environ.get("MILE_CACHE_BYTES", 4 << 30)))


def _frozen(module: nn.Module) -> bool:
    # a PEFT method (prefix/ptv2 included) puts trainable parameters inside the component: never cached
    return not any(p.requires_grad for p in module.parameters())


class FrozenFeatures:
    """Image embeddings of a frozen ViT (per image) and JTM outputs of a frozen ViT + JTM (per question).

    :meth:`prepare` computes them before the loop in large no-grad batches; :meth:`attach` adds them to each
    batch (computing any entry still missing, e.g. an instruction prompt first drawn in a later epoch), so a
    frozen ViT never runs twice on the same image and F/F/* runs train the decoder alone. ``enabled=False``
    (or image augmentation) computes everything every step: what the cache-equality test compares against.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, profile: Profile, namespace: str, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 enabled: bool = True, augment: bool = False, cache: FeatureCache | None = None,
                 batch_size: int = 32) -> None:
        comps = component_modules(model)
        self.model, self.tokenizer, self.profile = model, tokenizer, profile
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.cache = GLOBAL_CACHE if cache is None else cache
        self.vit_cached = enabled and not augment and _frozen(comps["vit"])
        self.jtm_cached = self.vit_cached and _frozen(comps["jtm"])
        self.seconds = 0.0
        self.computed = 0
        self._images: dict[str, torch.Tensor] = {}
        self._questions: dict[tuple[str, str], torch.Tensor] = {}
        base = (profile.name, namespace, str(dtype))
        if self.vit_cached:
            self._vit_key = (*base, "vit", weights_fingerprint(comps["vit"]))
        if self.jtm_cached:
            self._jtm_key = (*base, "jtm", weights_fingerprint(comps["vit"], comps["jtm"]),
                             tokenizer_fingerprint(tokenizer), profile.max_question_tokens)

    @property
    def needs_pixels(self) -> bool:
        return not self.vit_cached

    @torch.no_grad()
    def prepare(self, dataset: Any, autocast: Callable[[], Any] = nullcontext) -> None:
        """Fill every entry ``dataset`` asks for now (from the process cache or computed)."""
        if not self.vit_cached:
            return
        start = time.perf_counter()
        first = {}
        for i, r in enumerate(dataset.records):
            first.setdefault(r.img_name, i)
        self._fill_images(dataset, list(first.values()), autocast)
        if self.jtm_cached:
            self._fill_questions(dataset.records, [dataset.question_text(i) for i in range(len(dataset))],
                                 autocast)
        self.seconds += time.perf_counter() - start

    def _fill_images(self, dataset: Any, indices: list[int], autocast: Callable[[], Any]) -> None:
        todo = []
        for i in indices:
            name = dataset.records[i].img_name
            if name in self._images:
                continue
            hit = self.cache.get((*self._vit_key, name))
            if hit is not None:
                self._images[name] = hit
            else:
                todo.append(i)
        for j in range(0, len(todo), self.batch_size):
            chunk = todo[j:j + self.batch_size]
            pixels = torch.stack([dataset.pixels(i) for i in chunk]).to(self.device)
            with autocast():
                emb = encode_images(self.model, pixels).to(self.dtype)
            for i, e in zip(chunk, emb, strict=True):
                e = e.clone()  # own storage: a slice would pin the whole batch tensor in the cache
                name = dataset.records[i].img_name
                self._images[name] = e
                self.cache.put((*self._vit_key, name), e)
            self.computed += len(chunk)

    def _fill_questions(self, records: Sequence[Any], questions: Sequence[str],
                        autocast: Callable[[], Any]) -> None:
        todo: dict[tuple[str, str], None] = {}
        for r, q in zip(records, questions, strict=True):
            key = (r.img_name, q)
            if key in self._questions or key in todo:
                continue
            hit = self.cache.get((*self._jtm_key, *key))
            if hit is not None:
                self._questions[key] = hit
            else:
                todo[key] = None
        keys = list(todo)
        for j in range(0, len(keys), self.batch_size):
            chunk = keys[j:j + self.batch_size]
            ids, mask = encode_questions(self.tokenizer, [q for _, q in chunk],
                                         self.profile.max_question_tokens)
            ids, mask = ids.to(self.device), mask.to(self.device)
            images = torch.stack([self._images[name] for name, _ in chunk])
            with autocast():
                states = encode_questions_with_images(self.model, ids, mask, images).to(self.dtype)
            for key, s, m in zip(chunk, states, mask, strict=True):
                s = s[: int(m.sum())].clone()  # unpadded: padding is rebuilt per batch
                self._questions[key] = s
                self.cache.put((*self._jtm_key, *key), s)
            self.computed += len(chunk)

    @torch.no_grad()
    def attach(self, batch: dict[str, Any], dataset: Any = None,
               autocast: Callable[[], Any] = nullcontext) -> dict[str, Any]:
        """Add ``question_states`` or ``image_embeds`` to a collated batch (no-op when nothing is cached)."""
        if not self.vit_cached:
            return batch
        device = batch["input_ids"].device
        pairs = zip(batch["indices"], batch["img_names"], strict=True)
        missing = [i for i, n in pairs if n not in self._images]
        if missing:
            if dataset is None:
                raise KeyError(f"image embeddings of {len(missing)} images were not prepared")
            self._fill_images(dataset, missing, autocast)
        if self.jtm_cached:
            self._fill_questions([_Named(n) for n in batch["img_names"]], batch["questions"], autocast)
            length = batch["input_ids"].shape[1]
            keys = zip(batch["img_names"], batch["questions"], strict=True)
            rows = [self._questions[key] for key in keys]
            batch["question_states"] = torch.stack(
                [F.pad(s, (0, 0, 0, length - s.shape[0])) for s in rows]).to(device)
        else:
            batch["image_embeds"] = torch.stack([self._images[n] for n in batch["img_names"]]).to(device)
        return batch


@dataclass(frozen=True)
class _Named:
    img_name: str


# ------------------------------------------------------------------------------------------------------ loop
@dataclass
class TrainOptions:
    """What the loop needs beyond model and data; :class:`mile_utils.experiments.RunConfig` fills it."""

    epochs: int
    batch_size: int  # global: split across processes under data parallel
    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.05
    seed: int = 0
    grad_accum: int = 1
    label_smoothing: float = 0.1
    loss_reduction: str = "sum"
    gradient_checkpointing: bool = False
    use_cache: bool = True
    augment: bool = False
    num_workers: int = 0
    run_key: str = ""  # a hash of the run's config: a checkpoint of another config is never resumed
    progress: bool = True


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, loss, lr, seconds
    train_seconds: float = 0.0  # the epoch loops (this session's, after a resume)
    cache_seconds: float = 0.0
    samples: int = 0  # training samples processed (this session, all processes)
    resumed_from_epoch: int | None = None
    cached: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def make_accelerator(grad_accum: int = 1, mixed_precision: str | None = None, cpu: bool | None = None) -> Any:
    """An Accelerator: bf16 autocast on CUDA, fp32 on CPU; ``accelerate launch`` settings are honoured."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if mixed_precision is None:
        mixed_precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # split_batches: the loader yields global batches and each process takes its slice, so N processes
    # see exactly the data order of one process with the same global batch size
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def train_model(
    model: nn.Module,
    tokenizer: Any,
    profile: str | Profile,
    dataset: Any,
    options: TrainOptions,
    *,
    namespace: str = "",
    out_dir: str | Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
) -> TrainResult:
    """Train ``model`` in place on ``dataset`` (a :class:`mile_utils.data.VQADataset` with ``train=True``).

    ``namespace`` names the data source and image transform in the cache keys (img_name is unique only within
    it). With ``out_dir``, a checkpoint is written after every epoch and ``resume=True`` continues from it.
    """
    from tqdm.auto import tqdm

    prof = get_profile(profile)
    acc = accelerator or make_accelerator(options.grad_accum)
    if options.batch_size % acc.num_processes:
        raise ValueError(f"batch_size {options.batch_size} must be divisible by the {acc.num_processes} "
                         "processes")
    if options.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {options.epochs}")
    if len(dataset) == 0:
        raise ValueError("no training records")
    _seed_all(options.seed)

    fix_cross_attention_masks(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if options.gradient_checkpointing:
        # non-reentrant: gradients reach adapters inside checkpointed layers even when their inputs are frozen
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters: check the component spec")
    optimizer = torch.optim.AdamW([p for _, p in named], lr=options.lr, weight_decay=options.weight_decay)

    dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32
    model.to(acc.device)
    features = FrozenFeatures(model, tokenizer, prof, namespace, device=acc.device, dtype=dtype,
                              enabled=options.use_cache, augment=options.augment,
                              batch_size=max(options.batch_size, 32))
    collator = VQACollator(tokenizer, prof, dataset, need_pixels=features.needs_pixels)
    sampler = EpochSampler(len(dataset), options.seed)
    batches = BatchSampler(sampler, options.batch_size, drop_last=False)
    loader = DataLoader(range(len(dataset)), batch_sampler=batches, collate_fn=collator,
                        num_workers=options.num_workers)
    step_module = VQALoss(model, options.label_smoothing, options.loss_reduction)
    step_module, optimizer, loader = acc.prepare(step_module, optimizer, loader)

    result = TrainResult()
    start_epoch = 0
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("run_key") != options.run_key:
            raise ValueError(f"{ckpt_path} belongs to another configuration (run key "
                             f"{state.get('run_key')!r}, this run {options.run_key!r}): use another --out "
                             "or delete it")
        _load_trainable(model, state["trainable"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        result.history = list(state["history"])
        result.resumed_from_epoch = state["epoch"]
        rng = state["rng"]
    else:
        rng = None

    cache_start = time.perf_counter()
    _set_epoch(dataset, start_epoch)
    features.prepare(dataset, acc.autocast)
    result.cache_seconds = time.perf_counter() - cache_start
    result.cached = {"vit": features.vit_cached, "jtm": features.jtm_cached,
                     "entries_computed": features.computed}
    if rng is not None:
        # after model building and caching; redundant with each epoch's reseeding from (seed, epoch) below,
        # kept so that a checkpoint restores the RNG states exactly as they were saved
        _set_rng_state(rng)

    steps_per_epoch = len(loader)
    bar = tqdm(total=options.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               disable=not (options.progress and acc.is_main_process), desc="train", leave=False)
    step_module.train()
    train_start = time.perf_counter()
    for epoch in range(start_epoch, options.epochs):
        epoch_start = time.perf_counter()
        lr = cosine_lr(epoch, options.epochs, options.lr, options.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Everything random in an epoch derives from (seed, epoch) alone, so epoch e of a resumed run is epoch e
        # of an uninterrupted one by construction: the dropout RNG is reseeded here, and the epoch goes to the
        # prepared loader, not only to the sampler (Accelerate's DataLoaderShard.__iter__ re-sets its sampler's
        # epoch to the number of epochs iterated IN THIS PROCESS, which after a resume is not the epoch).
        _seed_all(epoch_seed(options.seed, epoch))
        sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        _set_epoch(dataset, epoch)
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        seen = 0
        for step, batch in enumerate(loader):
            batch = features.attach(batch, dataset, acc.autocast)
            real, global_real = _real_rows(step, len(dataset), options.batch_size, acc.num_processes,
                                           acc.process_index, len(batch["indices"]))
            with acc.accumulate(step_module):
                with acc.autocast():
                    per_answer = step_module(batch)
                    if acc.num_processes == 1:
                        loss = per_answer.mean()  # BLIP: loss.sum() / batch size
                    else:
                        # DDP averages the processes' gradients: each contributes its real rows' sum
                        # * N / (real rows of the global batch), so N processes == one with the global batch
                        loss = per_answer[:real].sum() * (acc.num_processes / global_real)
                _check_finite(acc, loss, epoch, step, ckpt_path)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += per_answer[:real].detach().double().sum()
            seen += real
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        total = acc.reduce(torch.stack([loss_sum, torch.tensor(float(seen), device=acc.device,
                                                                 dtype=torch.float64)]), "sum")
        epoch_loss = float(total[0] / total[1])
        result.samples += int(total[1])
        entry = {"epoch": epoch + 1, "loss": epoch_loss, "lr": lr,
                 "seconds": round(time.perf_counter() - epoch_start, 3), "checkpoint_s": 0.0}
        result.history.append(entry)
        if ckpt_path is not None:
            save_start = time.perf_counter()
            if acc.is_main_process:
                save_torch_atomic(ckpt_path, {
                    "epoch": epoch, "run_key": options.run_key,
                    "trainable": {n: p.detach().cpu() for n, p in trainable_named_parameters(model)},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"kind": "cosine_per_epoch", "next_epoch": epoch + 1,
                                  "max_epoch": options.epochs, "init_lr": options.lr,
                                  "min_lr": options.min_lr},
                    "rng": _rng_state(), "history": result.history,
                })
            acc.wait_for_everyone()
            entry["checkpoint_s"] = round(time.perf_counter() - save_start, 3)
    bar.close()
    result.train_seconds = time.perf_counter() - train_start
    step_module.eval()
    if options.gradient_checkpointing:
        base.gradient_checkpointing_disable()
    return result


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness (dropout, anything drawn from the global RNGs): a function of both."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _real_rows(step: int, n: int, batch_size: int, num_processes: int, process_index: int,
               local_rows: int) -> tuple[int, int]:
    """(rows of this process's slice that are real samples, real samples in the global batch) at ``step``.

    Under split_batches each process takes rows ``[k * B/N, (k + 1) * B/N)`` of global batch ``step``; a short
    last batch is padded (Accelerate's even_batches) with samples from the epoch's start, which must neither
    count twice in the loss nor in the gradient. The real rows always come first.
    """
    global_real = min(batch_size, n - step * batch_size)
    start = process_index * (batch_size // num_processes)
    return max(0, min(local_rows, global_real - start)), global_real


def _set_epoch(dataset: Any, epoch: int) -> None:
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # instruction prompts are drawn per epoch


def _check_finite(acc: Any, loss: torch.Tensor, epoch: int, step: int, ckpt_path: Path | None) -> None:
    bad = (~torch.isfinite(loss.detach())).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")  # every process stops together instead of hanging in an all-reduce
    if bad.item() > 0:
        if ckpt_path is not None and ckpt_path.exists():
            good = load_checkpoint(ckpt_path)["epoch"] + 1
            kept = f"the last good checkpoint (epoch {good}) is kept at {ckpt_path}"
        else:
            kept = "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}: training stopped; "
            f"{kept}. Lower the learning rate or check the data; --resume continues from the checkpoint.")


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(trainable_named_parameters(model))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model's trainable parameters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
