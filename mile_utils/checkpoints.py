"""Read, convert and write MISS/BLIP VQA weights.

Three kinds of source load into a ``BlipForQuestionAnswering`` through one entry point, :func:`load_weights`:

* original BLIP/MISS checkpoints (``.pth``/``.pt``/``.bin``: a bare state dict or one under ``"model"``),
  whose timm-ViT/BERT names are converted to transformers' names by :func:`convert_blip_state_dict`;
* Hugging Face BLIP VQA folders or hub ids (e.g. ``Salesforce/blip-vqa-base``), read with ``from_pretrained``;
* our own fine-tuned outputs: a ``.safetensors`` file or a folder written by :func:`save_trained`.

Pickles are read with ``torch.load(weights_only=True)`` only: a checkpoint that needs arbitrary code to
unpickle is refused, never executed. Every mismatch (missing, unexpected or wrongly shaped keys) raises
:class:`CheckpointError` listing the keys.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_NAME = "model.safetensors"
# Written into the safetensors header so a folder from save_trained is told apart from a save_pretrained one.
PRODUCER = "mile_utils.save_trained"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LIST_LIMIT = 20  # keys shown per category in an error; the rest are counted

# Original ViT (timm, as vendored by BLIP) -> transformers' BlipVisionModel; {i} is a block, {p} weight/bias.
_VIT_NAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)


def _template_regex(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{body}$")


# (pattern on the source side, template of the other side), both directions
_BLIP_TO_HF = tuple((_template_regex("visual_encoder." + b), "vision_model." + h) for b, h in _VIT_NAMES)
_HF_TO_BLIP = tuple((_template_regex("vision_model." + h), "visual_encoder." + b) for b, h in _VIT_NAMES)


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


# Original keys we drop on purpose, by exact name or prefix, with the reason shown in the report.
_DROP_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), reason)
    for p, reason in (
        (
            r"^(text_encoder|text_decoder\.bert)\.embeddings\.position_ids$",
            "buffer arange(512): transformers registers it as a non-persistent buffer and rebuilds it",
        ),
        (
            r"^(visual_encoder_m|text_encoder_m|text_decoder_m|vision_proj_m|text_proj_m)\.",
            "BLIP pretraining momentum encoder (ITC distillation), not part of the VQA model",
        ),
        (r"^(vision_proj|text_proj|itm_head)\.", "BLIP pretraining ITC/ITM head, not part of the VQA model"),
        (r"^(temp|image_queue|text_queue|idx_queue|ptr_queue)$", "BLIP pretraining contrastive state"),
    )
)

# Tensors whose first dimension is the vocabulary (the decoder's output layer is tied to its word embeddings).
VOCAB_KEYS = (
    "text_encoder.embeddings.word_embeddings.weight",
    "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.weight",
    "text_decoder.cls.predictions.decoder.bias",
    "text_decoder.cls.predictions.bias",
)
POS_KEY = "vision_model.embeddings.position_embedding"
# Architecture fields that must agree between a Hugging Face checkpoint's config and the target model's.
_TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "encoder_hidden_size",
    "hidden_act",
)
_VISION_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "num_channels",
    "hidden_act",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and keys."""


@dataclass
class ConversionReport:
    """What :func:`convert_blip_state_dict` did to each original key."""

    renamed: dict[str, str] = field(default_factory=dict)  # original -> transformers name
    dropped: dict[str, str] = field(default_factory=dict)  # original -> reason
    unmapped: list[str] = field(default_factory=list)  # original keys with no known counterpart
    interpolated: tuple[int, int] | None = None  # ViT positions (without cls) before -> after
    resized_vocab: tuple[int, int] | None = None  # vocabulary rows before -> after


@dataclass
class LoadReport:
    """What :func:`load_weights` loaded, and from what."""

    source: str
    kind: str  # "blip" (original names, converted), "huggingface", "safetensors" or "state_dict"
    loaded: int = 0  # tensors copied into the model
    missing: list[str] = field(default_factory=list)  # model keys left as they were (strict=False only)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys ignored (strict=False only)
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint keys dropped on purpose -> reason
    interpolated: tuple[int, int] | None = None
    resized_vocab: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.kind})"]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} on purpose")
        if self.interpolated:
            parts.append("ViT positions interpolated {} -> {}".format(*self.interpolated))
        if self.resized_vocab:
            parts.append("vocabulary resized {} -> {}".format(*self.resized_vocab))
        if self.missing or self.unexpected:
            parts.append(f"{len(self.missing)} missing, {len(self.unexpected)} unexpected (strict=False)")
        return "; ".join(parts + self.notes)


# ----------------------------------------------------------------------------------------------- conversion


def _short_list(title: str, note: str, keys: list[str], limit: int = LIST_LIMIT) -> str:
    shown = "\n".join(f"    {k}" for k in keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}), {note}:\n{shown}{more}"


def _mismatch_message(where: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    lines = [f"{where} does not match the model:"]
    if missing:
        lines.append(_short_list("missing keys", "in the model but not in the checkpoint", missing))
    if unexpected:
        lines.append(_short_list("unexpected keys", "in the checkpoint but not in the model", unexpected))
    if shapes:
        lines.append(_short_list("shape mismatches", "checkpoint vs model", shapes))
    return "\n".join(lines)


def blip_to_hf_name(name: str) -> str | None:
    """The transformers name of an original BLIP/MISS key, or None if it has no counterpart."""
    if name.startswith("visual_encoder."):
        return _rename(name, _BLIP_TO_HF)
    if name.startswith(("text_encoder.", "text_decoder.")):
        return name  # BLIP's BERT (med.py) and transformers' BlipText* share module names
    return None


def _drop_reason(name: str) -> str | None:
    for pattern, reason in _DROP_RULES:
        if pattern.match(name):
            return reason
    return None


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int, num_extra_tokens: int = 1) -> Tensor:
    """Resize ViT position embeddings ``(1, extra + g*g, D)`` to ``num_patches`` grid positions.

    As BLIP's ``interpolate_pos_embed``: the cls token's embedding is kept, the grid is resized bicubically
    (``align_corners=False``). Lets 224/384 px checkpoints initialise a 480 px model (901 positions).
    """
    old = pos_embed.shape[-2] - num_extra_tokens
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise CheckpointError(
            f"position embeddings of shape {tuple(pos_embed.shape)} do not form a square grid of patches "
            f"(+{num_extra_tokens} cls) that can be resized to {num_patches} patches"
        )
    if old == num_patches:
        return pos_embed
    dim = pos_embed.shape[-1]
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    # bicubic needs floating point of at least fp32 precision on CPU; cast back afterwards
    grid = grid.float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, size=(new_side, new_side), mode="bicubic", align_corners=False
    )
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((extra, grid), dim=1)


def _adapt_to_model(
    sd: dict[str, Tensor], report: LoadReport, model: torch.nn.Module, *, resize_vocab: bool, where: str
) -> None:
    """:func:`_adapt_sizes` to ``model``'s image size, patch size and vocabulary."""
    sizes = _model_sizes(model)
    _adapt_sizes(
        sd,
        report,
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"] or 16,
        vocab_size=sizes["vocab_size"],
        resize_vocab=resize_vocab,
        where=where,
    )


def _adapt_sizes(
    sd: dict[str, Tensor],
    report: ConversionReport | LoadReport,
    *,
    image_size: int | None,
    patch_size: int,
    vocab_size: int | None,
    resize_vocab: bool,
    where: str,
) -> None:
    """Interpolate ViT positions to ``image_size`` and check/resize vocabulary rows, in place (HF names)."""
    if image_size is not None and POS_KEY in sd:
        num_patches = (image_size // patch_size) ** 2
        before = sd[POS_KEY].shape[-2] - 1
        if before != num_patches:
            sd[POS_KEY] = interpolate_pos_embed(sd[POS_KEY], num_patches)
            report.interpolated = (before, num_patches)
    if vocab_size is None:
        return
    sizes = {k: sd[k].shape[0] for k in VOCAB_KEYS if k in sd}
    if not sizes or all(n == vocab_size for n in sizes.values()):
        return
    have = max(sizes.values())
    if have > vocab_size or len(set(sizes.values())) > 1:
        raise CheckpointError(
            f"{where}: vocabulary rows {sizes} do not fit the model's vocabulary of {vocab_size}; build the "
            "model with the tokenizer the checkpoint was trained with"
        )
    if not resize_vocab:
        raise CheckpointError(
            f"{where} has a vocabulary of {have} rows but the model has {vocab_size} (BLIP/MISS: "
            "bert-base-uncased's 30522 + [DEC] + [ENC] = 30524). Pass resize_vocab=True to append rows "
            "initialised to the mean embedding (zero bias) for the missing tokens, which then must be "
            "trained, or use a matching model"
        )
    for key in sizes:
        t = sd[key]
        # mean rows, as transformers' resize_token_embeddings; biases start at zero
        fill = t.float().mean(0, keepdim=True).to(t.dtype) if t.dim() == 2 else t.new_zeros(1)
        sd[key] = torch.cat((t, fill.expand(vocab_size - have, *t.shape[1:])), dim=0)
    report.resized_vocab = (have, vocab_size)


def convert_blip_state_dict(
    sd: Mapping[str, Tensor],
    image_size: int | None = 480,
    *,
    patch_size: int = 16,
    vocab_size: int | None = None,
    resize_vocab: bool = False,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert an original BLIP/MISS state dict to ``BlipForQuestionAnswering`` names.

    Every key is renamed (``report.renamed``), dropped with a reason (``report.dropped``: the ``position_ids``
    buffers and BLIP-pretraining-only heads) or listed in ``report.unmapped``. ViT position embeddings are
    interpolated to ``image_size`` (None: keep them). With ``vocab_size`` the vocabulary rows are checked; a
    smaller checkpoint vocabulary is an error unless ``resize_vocab`` (mean-initialised new rows).
    """
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        reason = _drop_reason(name)
        if reason is not None:
            report.dropped[name] = reason
            continue
        new = blip_to_hf_name(name)
        if new is None:
            report.unmapped.append(name)
            continue
        report.renamed[name] = new
        out[new] = tensor
    _adapt_sizes(
        out,
        report,
        image_size=image_size,
        patch_size=patch_size,
        vocab_size=vocab_size,
        resize_vocab=resize_vocab,
        where="the BLIP checkpoint",
    )
    return out, report


def to_blip_state_dict(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`convert_blip_state_dict`: transformers names -> original BLIP/MISS names.

    Adds the ``position_ids`` buffers BLIP saves, so a paper-size model gives exactly the manifest's layout.
    Useful to hand weights to the original BLIP/MISS code.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in hf_sd.items():
        if name.startswith(("text_encoder.", "text_decoder.")):
            out[name] = tensor
            continue
        old = _rename(name, _HF_TO_BLIP)
        if old is None:
            raise CheckpointError(f"{name!r} has no counterpart in the original BLIP/MISS layout")
        out[old] = tensor
    for prefix in ("text_encoder", "text_decoder.bert"):
        emb = hf_sd.get(f"{prefix}.embeddings.position_embeddings.weight")
        if emb is not None:
            out[f"{prefix}.embeddings.position_ids"] = torch.arange(
                emb.shape[0], device=emb.device
            ).unsqueeze(0)
    return out


# ----------------------------------------------------------------------------------------------- reading


def _weights_only_refusal(path: Path, err: Exception) -> str:
    """Turn torch's long weights_only error into one line: blocked code, or a corrupt/foreign file."""
    text = str(err)
    # torch words it "unsupported GLOBAL posix.system ..." or "Unsupported global: GLOBAL getattr ..."
    blocked = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, flags=re.IGNORECASE)
    if blocked:
        return (
            f"{path}: refused by torch.load(weights_only=True): it holds pickled objects that would run code "
            f"({blocked.group(1)}). Only plain tensor checkpoints are read; if you trust the file, load it "
            "yourself and re-save just its state dict with torch.save(state_dict, ...)"
        )
    detail = re.search(r"WeightsUnpickler error: ([^\n]*\n*[^\n]+)", text)
    reason = " ".join(detail.group(1).split()) if detail else text.splitlines()[0]
    return f"{path}: not a readable PyTorch checkpoint (corrupt, truncated or another format): {reason}"


def _extract_state_dict(obj: Any, where: str) -> dict[str, Tensor]:
    """A flat name -> tensor dict from a loaded object: bare, or under "model"/"state_dict"."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            # BLIP/MISS save {"model": ..., "optimizer": ..., "config": ..., "epoch": ...}
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{where}: expected a state dict (name -> tensor), bare or under 'model', "
            f"got {type(obj).__name__}" + (" (empty)" if isinstance(obj, Mapping) else "")
        )
    bad = [
        f"{k!r}: {type(v).__name__}"
        for k, v in obj.items()
        if not (isinstance(k, str) and isinstance(v, Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"{where}: not a state dict, entries that are not name -> tensor: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or another format): {err}"
        ) from err
    if not sd:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors")
    return sd, metadata


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` file, on the CPU.

    Pickles are read with ``weights_only=True``: a file that would need to run code is refused with a message
    saying so, never executed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_weights_only_refusal(path, err)) from err
    except Exception as err:  # corrupt bytes surface as almost any error inside the unpickler
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt, truncated or another format): "
            f"{type(err).__name__}: {err}"
        ) from err
    return _extract_state_dict(obj, str(path))


# ----------------------------------------------------------------------------------------------- loading


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _tie_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict names that are one tensor in ``model`` (e.g. the decoder's output layer, word embeddings).

    Grouped by object identity, which also works on the meta device where every data pointer is 0.
    """
    by_id: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        by_id.setdefault(id(tensor), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _fill_ties(sd: dict[str, Tensor], groups: list[list[str]], where: str) -> None:
    """Give every tied name the tensor of its present partner; tied names present twice must agree."""
    for names in groups:
        present = [n for n in names if n in sd]
        if not present:
            continue
        first = sd[present[0]]
        for other in present[1:]:
            t = sd[other]
            if t is first or t.is_meta or (t.shape == first.shape and t.data_ptr() == first.data_ptr()):
                continue  # one tensor saved twice (torch.save keeps the sharing)
            if t.shape != first.shape or not torch.equal(t, first):
                raise CheckpointError(
                    f"{where}: {present[0]} and {other} differ, but the model ties them (one tensor); "
                    "loading would silently keep only one of them"
                )
        for n in names:
            sd.setdefault(n, first)


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """After ``assign`` into a meta model, recreate the non-persistent position_ids buffers (arange)."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise CheckpointError(
                    f"buffer {module_name}.{name} is still on the meta device after loading"
                )
            module.register_buffer(
                name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False
            )


def _load_into(
    model: torch.nn.Module, sd: dict[str, Tensor], *, strict: bool, report: LoadReport
) -> LoadReport:
    """Check ``sd`` against the model (names, ties, shapes) and copy it in; raise listing every mismatch."""
    where = report.source
    target = model.state_dict()
    groups = _tie_groups(model)
    _fill_ties(sd, groups, where)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if _is_peft(model) and sd and not any(k.startswith("base_model.") for k in sd):
        raise CheckpointError(
            f"{where}: these are base-model weights but the model already has PEFT adapters; load them into "
            "the plain BlipForQuestionAnswering first, then apply the adapter spec"
        )
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(where, missing, unexpected, shapes))
    # A model built on the meta device has no storage to copy into: take the checkpoint's tensors instead.
    assign = any(p.is_meta for p in model.parameters())
    if assign and missing:
        raise CheckpointError(
            _mismatch_message(where, missing, [], [])
            + "\n  the model is on the meta device, so every key is needed"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False, assign=assign)
    if assign:
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # assign replaced tied parameters by separate ones
        _rebuild_meta_buffers(model)
        report.notes.append(
            "model was on the meta device: checkpoint tensors assigned (their dtype, on the CPU)"
        )
    report.loaded = len(target) - len(missing)
    report.missing, report.unexpected = missing, unexpected
    return report


def _model_sizes(model: torch.nn.Module) -> dict[str, int | None]:
    config = getattr(_base_model(model), "config", None)
    vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    return {
        "image_size": getattr(vision, "image_size", None),
        "patch_size": getattr(vision, "patch_size", 16),
        "vocab_size": getattr(text, "vocab_size", None),
    }


def _load_state_dict(
    model: torch.nn.Module, sd: dict[str, Tensor], source: str, kind: str, *, strict: bool, resize_vocab: bool
) -> LoadReport:
    sizes = _model_sizes(model)
    report = LoadReport(source=source, kind=kind)
    if any(k.startswith("visual_encoder.") for k in sd):
        if _is_peft(model):
            raise CheckpointError(f"{source}: load original BLIP/MISS weights before applying PEFT adapters")
        try:
            sd, conv = convert_blip_state_dict(
                sd,
                sizes["image_size"],
                patch_size=sizes["patch_size"] or 16,
                vocab_size=sizes["vocab_size"],
                resize_vocab=resize_vocab,
            )
        except CheckpointError as err:
            raise CheckpointError(f"{source}: {err}") from err  # name the file, not just "the checkpoint"
        report.kind = "blip"
        report.dropped, report.interpolated, report.resized_vocab = (
            conv.dropped,
            conv.interpolated,
            conv.resized_vocab,
        )
        # unmapped original keys stay under their original names, so they are reported as unexpected
        sd.update({k: torch.empty(0) for k in conv.unmapped})
    elif not _is_peft(model):
        _adapt_to_model(sd, report, model, resize_vocab=resize_vocab, where=source)
    return _load_into(model, sd, strict=strict, report=report)


def _config_mismatches(theirs: Any, ours: Any) -> list[str]:
    out = []
    for part, names in (("text_config", _TEXT_FIELDS), ("vision_config", _VISION_FIELDS)):
        a, b = getattr(theirs, part), getattr(ours, part)
        for name in names:
            if getattr(a, name, None) != getattr(b, name, None):
                out.append(
                    f"{part}.{name}: checkpoint {getattr(a, name, None)!r}, model {getattr(b, name, None)!r}"
                )
    return out


def _from_pretrained(source: str, *, local: bool) -> torch.nn.Module:
    from transformers import BlipForQuestionAnswering

    if local:
        config_path = Path(source) / "config.json"
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{config_path}: not a readable config.json: {err}") from err
        if model_type != "blip":
            raise CheckpointError(
                f"{config_path}: model_type is {model_type!r}, expected 'blip' (a BLIP VQA model)"
            )
    try:
        return BlipForQuestionAnswering.from_pretrained(source, local_files_only=local)
    except OSError as err:
        if local:
            raise CheckpointError(f"{source}: not a loadable Hugging Face BLIP VQA folder: {err}") from err
        failure: Exception = err
    except Exception as err:  # the hub client's own HTTP errors do not all derive from OSError
        if local:
            raise
        failure = err
    raise CheckpointError(
        f"could not fetch {source!r} from the Hugging Face hub ({type(failure).__name__}: {failure}). This "
        f"machine is probably offline. Download it where there is network, e.g. `hf download {source} "
        "--local-dir blip-vqa` (or `huggingface-cli download`, or `save_pretrained`), copy the folder here "
        "and pass its path"
    ) from failure


def _load_huggingface(
    model: torch.nn.Module, source: str, *, local: bool, strict: bool, resize_vocab: bool
) -> LoadReport:
    if _is_peft(model):
        raise CheckpointError(f"{source}: load Hugging Face BLIP weights before applying PEFT adapters")
    pretrained = _from_pretrained(source, local=local)
    report = LoadReport(source=source, kind="huggingface")
    ours = getattr(model, "config", None)
    if ours is not None and hasattr(ours, "text_config"):
        # Same tensor shapes can still mean different maths (e.g. 12 vs 8 heads): refuse those.
        bad = _config_mismatches(pretrained.config, ours)
        if bad:
            raise CheckpointError(
                f"{source}: its configuration does not match the model's:\n  " + "\n  ".join(bad)
            )
        # numerically minor (BLIP's timm ViT uses eps 1e-6, transformers' BLIP 1e-5) or about the tokenizer:
        # the model's own values are kept and the difference is reported
        soft = [("text_config", "layer_norm_eps"), ("vision_config", "layer_norm_eps")]
        soft += [("text_config", t) for t in ("pad_token_id", "bos_token_id", "sep_token_id")]
        for part, tid in soft:
            a = getattr(getattr(pretrained.config, part), tid, None)
            b = getattr(getattr(ours, part), tid, None)
            if a != b:
                report.notes.append(f"{part}.{tid} differs (checkpoint {a}, model {b}): the model's is kept")
    sd = dict(pretrained.state_dict())
    del pretrained
    _adapt_to_model(sd, report, model, resize_vocab=resize_vocab, where=source)
    return _load_into(model, sd, strict=strict, report=report)


def _read_safetensors_tied(path: Path) -> dict[str, Tensor]:
    """A safetensors state dict with the tied names save_trained stored once put back."""
    sd, metadata = _read_safetensors(path)
    try:
        tied = json.loads(metadata.get("tied", "{}"))
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable 'tied' entry in the header: {err}") from err
    for alias, kept in tied.items():
        if kept in sd:
            sd.setdefault(alias, sd[kept])
    return sd


def _is_ours(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("producer") == PRODUCER
    except (SafetensorError, OSError):
        return False


def load_weights(
    model: torch.nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = True,
    resize_vocab: bool = False,
) -> LoadReport:
    """Load weights from ``source`` into ``model`` (in place) and say what was done.

    ``source`` may be an original BLIP/MISS ``.pth``/``.pt``/``.bin`` (converted, positions interpolated to
    the model's image size), a ``.safetensors`` file, a folder from :func:`save_trained`, a Hugging Face BLIP
    VQA folder (``config.json`` + weights), a hub id such as ``Salesforce/blip-vqa-base`` (only when no
    local path of that name exists), or a state dict already in memory (either naming). With ``strict``
    every model key must be filled and every checkpoint key used; otherwise missing/unexpected keys are only
    reported. Wrong shapes always raise. A model built on the meta device receives the checkpoint's tensors
    directly (no second copy). ``resize_vocab``: see :func:`convert_blip_state_dict`.
    """
    if isinstance(source, Mapping):
        sd = _extract_state_dict(source, "the state dict given")
        return _load_state_dict(
            model, sd, "<state dict>", "state_dict", strict=strict, resize_vocab=resize_vocab
        )
    src = os.fspath(source)
    path = Path(src).expanduser()
    if path.is_dir():
        weights = path / SAFETENSORS_NAME
        if weights.is_file() and (_is_ours(weights) or not (path / "config.json").is_file()):
            sd = _read_safetensors_tied(weights)
            return _load_state_dict(
                model, sd, str(weights), "safetensors", strict=strict, resize_vocab=resize_vocab
            )
        if (path / "config.json").is_file():
            return _load_huggingface(model, str(path), local=True, strict=strict, resize_vocab=resize_vocab)
        raise CheckpointError(
            f"{path}: a folder with neither config.json (Hugging Face BLIP VQA) nor {SAFETENSORS_NAME} "
            "(save_trained)"
        )
    if path.is_file():
        if path.suffix == ".safetensors":
            sd, kind = _read_safetensors_tied(path), "safetensors"
        elif path.suffix in PICKLE_SUFFIXES:
            sd, kind = read_state_dict(path), "state_dict"
        else:
            raise CheckpointError(
                f"{path}: unknown checkpoint type {path.suffix!r}; expected {', '.join(PICKLE_SUFFIXES)}, "
                ".safetensors, a folder or a hub id"
            )
        return _load_state_dict(model, sd, str(path), kind, strict=strict, resize_vocab=resize_vocab)
    looks_local = path.suffix in (*PICKLE_SUFFIXES, ".safetensors") or src.startswith((".", "/", "~"))
    if looks_local or not HUB_ID.match(src):
        raise CheckpointError(f"{src}: no such checkpoint file or folder (and not a hub id like owner/name)")
    return _load_huggingface(model, src, local=False, strict=strict, resize_vocab=resize_vocab)


# ----------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_trained(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model``'s full state dict to ``out_dir/model.safetensors`` (atomically) and return its path.

    Tied tensors are stored once (safetensors forbids shared storage); :func:`load_weights` restores them.
    A plain BLIP model also gets ``config.json``, so the folder is a Hugging Face folder too; a PEFT-wrapped
    model is saved under its wrapped names (load it back into a model with the same adapter spec) and gets no
    ``config.json``, so ``from_pretrained`` cannot mistake it for a plain model. ``metadata`` (str -> str)
    goes into the file's header.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if any(p.is_meta for p in model.parameters()):
        raise CheckpointError("save_trained: the model is on the meta device and has no weights to save")
    sd = model.state_dict()
    aliases: dict[str, str] = {}
    for names in _tie_groups(model):
        kept = [n for n in names if n in sd]
        aliases.update({n: kept[0] for n in kept[1:]})
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in sd.items():
        if name in aliases:
            continue
        t = tensor.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        # any other storage sharing (views) would make safetensors refuse the file: copy those
        t = t.clone() if storage in seen or not t.is_contiguous() else t
        seen.add(storage)
        tensors[name] = t
    from safetensors.torch import save_file

    from . import __version__

    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    # ours last, so user metadata cannot hide the producer mark or the tie list load_weights relies on
    header.update(
        {"format": "pt", "producer": PRODUCER, "mile_utils": __version__, "tied": json.dumps(aliases)}
    )
    weights = out / SAFETENSORS_NAME
    _atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    config = getattr(model, "config", None)
    if not _is_peft(model) and config is not None and hasattr(config, "to_json_string"):
        text = config.to_json_string()
        _atomic_write(out / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return weights
