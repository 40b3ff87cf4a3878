"""Read MISS/BLIP VQA weights into a model from :func:`mile_utils.model.build_model`: :func:`load_weights`.

Sources: an original BLIP/MISS checkpoint (``.pth``: a bare state dict or MILE's ``train_MILE.py`` dict with
``model``, ``optimizer``, ``config``, ``epoch``), whose timm-ViT names are renamed to transformers' and whose ViT
positions are interpolated to the model's image size; a ``.safetensors`` file; a Hugging Face BLIP VQA folder
(e.g. written by ``model.save_pretrained``) or hub id; a state dict in memory. Pickles are read by a restricted
unpickler (:func:`load_pickle`) that runs no code from the file. Every mismatch raises :class:`CheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .model import load_local_first

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
LIST_LIMIT = 20  # keys shown per category in an error; the rest are counted
POS_KEY = "vision_model.embeddings.position_embedding"
# Tensors whose first dimension is the vocabulary (the decoder's output layer is tied to its word embeddings).
VOCAB_KEYS = (
    "text_encoder.embeddings.word_embeddings.weight",
    "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.weight",
    "text_decoder.cls.predictions.decoder.bias",
    "text_decoder.cls.predictions.bias",
)
# Original ViT (timm, as vendored by BLIP) -> transformers' BlipVisionModel; {i} is a block, {p} weight/bias.
_VIT_NAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.{p}": "embeddings.patch_embedding.{p}",
    "blocks.{i}.norm1.{p}": "encoder.layers.{i}.layer_norm1.{p}",
    "blocks.{i}.attn.qkv.{p}": "encoder.layers.{i}.self_attn.qkv.{p}",
    "blocks.{i}.attn.proj.{p}": "encoder.layers.{i}.self_attn.projection.{p}",
    "blocks.{i}.norm2.{p}": "encoder.layers.{i}.layer_norm2.{p}",
    "blocks.{i}.mlp.fc1.{p}": "encoder.layers.{i}.mlp.fc1.{p}",
    "blocks.{i}.mlp.fc2.{p}": "encoder.layers.{i}.mlp.fc2.{p}",
    "norm.{p}": "post_layernorm.{p}",
}
_VIT_RULES = [
    (re.compile("^visual_encoder." + re.escape(b).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
                + "$"), "vision_model." + h)
    for b, h in _VIT_NAMES.items()
]
# Original keys dropped on purpose, with the reason shown in the report.
_DROP_RULES = [(re.compile(p), reason) for p, reason in (
    (r"^(text_encoder|text_decoder\.bert)\.embeddings\.position_ids$",
     "buffer arange(512): transformers rebuilds it as a non-persistent buffer"),
    (r"^(visual_encoder_m|text_encoder_m|text_decoder_m|vision_proj_m|text_proj_m)\.",
     "BLIP pretraining momentum encoder (ITC distillation), not part of the VQA model"),
    (r"^(vision_proj|text_proj|itm_head)\.", "BLIP pretraining ITC/ITM head, not part of the VQA model"),
    (r"^(temp|image_queue|text_queue|idx_queue|ptr_queue)$", "BLIP pretraining contrastive state"),
)]
# Architecture fields that must agree between a Hugging Face checkpoint's config and the model's.
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
_CONFIG_FIELDS = {"text_config": (*_ARCH_FIELDS, "max_position_embeddings", "encoder_hidden_size"),
                  "vision_config": (*_ARCH_FIELDS, "patch_size", "num_channels")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and keys."""


@dataclass
class LoadReport:
    """What :func:`load_weights` loaded, and from what."""

    source: str
    kind: str  # "blip" (original names, converted), "huggingface", "safetensors" or "state_dict"
    loaded: int = 0  # tensors copied into the model
    missing: list[str] = field(default_factory=list)  # model keys left as they were (strict=False only)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys ignored (strict=False only)
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint keys dropped on purpose -> reason
    interpolated: tuple[int, int] | None = None  # ViT grid positions before -> after
    resized_vocab: tuple[int, int] | None = None  # vocabulary rows before -> after
    notes: list[str] = field(default_factory=list)


def convert_blip_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename an original BLIP/MISS state dict to ``BlipForQuestionAnswering`` names.

    Returns the renamed dict and the keys dropped on purpose (-> reason). BLIP's BERT (``med.py``) and
    transformers' BlipText* share names; ViT keys are renamed; keys with no counterpart keep their name, so
    loading reports them as unexpected.
    """
    out: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    for name, tensor in sd.items():
        reason = next((r for p, r in _DROP_RULES if p.match(name)), None)
        if reason is not None:
            dropped[name] = reason
            continue
        m = next(((m, t) for p, t in _VIT_RULES if (m := p.match(name))), None)
        out[m[1].format(**m[0].groupdict()) if m else name] = tensor
    return out, dropped


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int) -> Tensor:
    """Resize ViT position embeddings ``(1, 1 + g*g, D)`` to ``num_patches`` grid positions, as BLIP does.

    The cls token's embedding is kept, the grid is resized bicubically (``align_corners=False``): lets
    224/384 px checkpoints initialise a 480 px model (901 positions).
    """
    old = pos_embed.shape[-2] - 1
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise CheckpointError(f"position embeddings of shape {tuple(pos_embed.shape)} do not form a square grid "
                              f"of patches (+1 cls) that can be resized to {num_patches} patches")
    if old == num_patches:
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)  # bicubic needs fp32
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)), dim=1)


def _adapt_sizes(sd: dict[str, Tensor], report: LoadReport, model: torch.nn.Module, resize_vocab: bool) -> None:
    """Interpolate ViT positions to the model's image size and check/resize vocabulary rows, in place."""
    vision, text = model.config.vision_config, model.config.text_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    if POS_KEY in sd and sd[POS_KEY].shape[-2] - 1 != num_patches:
        report.interpolated = (sd[POS_KEY].shape[-2] - 1, num_patches)
        sd[POS_KEY] = interpolate_pos_embed(sd[POS_KEY], num_patches)
    sizes = {k: sd[k].shape[0] for k in VOCAB_KEYS if k in sd}
    have, want = max(sizes.values(), default=text.vocab_size), text.vocab_size
    if have == want and len(set(sizes.values())) <= 1:
        return
    if have > want or len(set(sizes.values())) > 1:
        raise CheckpointError(f"{report.source}: vocabulary rows {sizes} do not fit the model's vocabulary of "
                              f"{want}; build the model with the tokenizer the checkpoint was trained with")
    if not resize_vocab:
        raise CheckpointError(
            f"{report.source} has a vocabulary of {have} rows but the model has {want} (BLIP/MISS: "
            "bert-base-uncased's 30522 + [DEC] + [ENC] = 30524). Pass resize_vocab=True to append rows "
            "initialised to the mean embedding (zero bias), which then must be trained, or use a matching model")
    for key in sizes:
        t = sd[key]  # new rows as transformers' resize_token_embeddings: the mean row; biases start at zero
        fill = t.float().mean(0, keepdim=True).to(t.dtype) if t.dim() == 2 else t.new_zeros(1)
        sd[key] = torch.cat((t, fill.expand(want - have, *t.shape[1:])), dim=0)
    report.resized_vocab = (have, want)


class _Inert:
    """Stands for a class or function named in a pickle: takes whatever it is given and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(*args)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _Unpickler(pickle.Unpickler):
    """Only torch's own ``weights_only`` allowlist (tensor rebuilding, containers, dtypes) is looked up; any
    other global becomes an :class:`_Inert` placeholder class, so nothing in the file can run code."""

    def __init__(self, file: Any, storage: Any) -> None:
        super().__init__(file)
        self.persistent_load = storage

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # protocol 2's py2 names
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        safe = _get_allowed_globals().get(f"{module}.{name}")
        return safe if safe is not None else type(f"Inert[{module}.{name}]", (_Inert,), {})


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """The object in a ``torch.save`` file, on the CPU, without running code from it.

    Unknown classes (a ruamel ``CommentedMap`` config, an optimizer's custom state...) become inert
    placeholders; tensors are rebuilt from the archive. Pre-1.6 (non-zip) files go to ``torch.load``'s
    ``weights_only`` reader, which refuses anything but tensors and containers.
    """
    if not zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    storages: dict[str, torch.TypedStorage] = {}
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))

        def storage(pid: tuple) -> torch.TypedStorage:
            kind, storage_type, key, _location, _numel = pid
            if kind != "storage" or not hasattr(storage_type, "dtype"):
                raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
            if key not in storages:  # one storage per key: tensors saved tied stay tied
                data = bytearray(archive.read(f"{pkl[:-len('data.pkl')]}data/{key}"))
                raw = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage()
                storages[key] = torch.TypedStorage(wrap_storage=raw, dtype=storage_type.dtype, _internal=True)
            return storages[key]

        with archive.open(pkl) as f:
            return _Unpickler(f, storage).load()


def _state_dict_in(obj: Any, where: str) -> dict[str, Tensor]:
    """The name -> tensor dict in a loaded object: bare, or under "model"/"state_dict" (other entries ignored)."""
    if isinstance(obj, Mapping):
        obj = next((obj[w] for w in ("model", "state_dict") if isinstance(obj.get(w), Mapping)), obj)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{where}: expected a state dict (name -> tensor), bare or under 'model', got "
                              f"{type(obj).__name__}" + (" (empty)" if isinstance(obj, Mapping) else ""))
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(f"{where}: not a state dict, entries that are not name -> tensor: "
                              f"{', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict in a ``.pth``/``.pt``/``.bin``/``.ckpt`` (via :func:`load_pickle`) or ``.safetensors`` file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _state_dict_in(load_file(path), str(path))
        obj = load_pickle(path)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt bytes surface as almost any error inside a reader
        kind = "safetensors file" if path.suffix == ".safetensors" else "PyTorch checkpoint"
        raise CheckpointError(f"{path}: not a readable {kind} (corrupt, truncated or another format): "
                              f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}") from err
    return _state_dict_in(obj, str(path))


def _list(title: str, keys: list[str]) -> str:
    more = f"\n    ... and {len(keys) - LIST_LIMIT} more" if len(keys) > LIST_LIMIT else ""
    return f"  {title} ({len(keys)}):\n" + "\n".join(f"    {k}" for k in keys[:LIST_LIMIT]) + more


def _load_into(model: torch.nn.Module, sd: dict[str, Tensor], report: LoadReport, strict: bool) -> LoadReport:
    """Check ``sd`` against the model (names, ties, shapes) and copy it in; raise listing every mismatch."""
    target = model.state_dict()
    ties: dict[int, list[str]] = {}  # names that are one tensor in the model (decoder output = word embeddings)
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        ties.setdefault(id(t), []).append(name)
    for names in (n for n in ties.values() if len(n) > 1):
        present = [sd[n] for n in names if n in sd]
        if any(t.shape != present[0].shape or not torch.equal(t, present[0]) for t in present[1:]):
            raise CheckpointError(f"{report.source}: {' and '.join(names)} differ, but the model ties them (one "
                                  "tensor); loading would silently keep only one of them")
        for n in names if present else ():
            sd.setdefault(n, present[0])
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
              for k in target if k in sd and sd[k].shape != target[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = [f"{report.source} does not match the model:"]
        parts += [_list(t, keys) for t, keys in (("missing keys, in the model but not in the checkpoint", missing),
                  ("unexpected keys, in the checkpoint but not in the model", unexpected),
                  ("shape mismatches, checkpoint vs model", shapes)) if keys]
        raise CheckpointError("\n".join(parts))
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    report.loaded, report.missing, report.unexpected = len(target) - len(missing), missing, unexpected
    return report


def _from_pretrained(model: torch.nn.Module, source: str, report: LoadReport, strict: bool) -> dict[str, Tensor]:
    """The state dict of a Hugging Face BLIP VQA folder or hub id, its config checked against the model's."""
    from transformers import BlipForQuestionAnswering

    def load(src: str, **kwargs: Any) -> Any:
        return BlipForQuestionAnswering.from_pretrained(src, output_loading_info=True, **kwargs)

    try:
        pretrained, info = load_local_first(load, source, "BLIP VQA weights", CheckpointError)
    except OSError as err:  # a folder without weights, a config of another model type...
        raise CheckpointError(f"{source}: not a loadable Hugging Face BLIP VQA folder (config.json and "
                              f"model.safetensors, as save_pretrained writes): {err}") from err
    if info["missing_keys"] and strict:  # from_pretrained would leave them randomly initialised
        raise CheckpointError(_list(f"{source}: weights missing from the checkpoint", sorted(info["missing_keys"])))
    bad = [f"{part}.{name}: checkpoint {a!r}, model {b!r}" for part, names in _CONFIG_FIELDS.items() for name in names
           if (a := getattr(getattr(pretrained.config, part), name, None))
           != (b := getattr(getattr(model.config, part), name, None))]
    if bad:  # same tensor shapes can still mean different maths (e.g. 12 vs 8 heads)
        raise CheckpointError(f"{source}: its configuration does not match the model's:\n  " + "\n  ".join(bad))
    # numerically minor (BLIP's timm ViT eps 1e-6, transformers' 1e-5) or about the tokenizer: the model's is kept
    for part, name in [("text_config", "layer_norm_eps"), ("vision_config", "layer_norm_eps"),
                       *(("text_config", t) for t in ("pad_token_id", "bos_token_id", "sep_token_id"))]:
        a, b = getattr(getattr(pretrained.config, part), name, None), getattr(getattr(model.config, part), name, None)
        if a != b:
            report.notes.append(f"{part}.{name} differs (checkpoint {a}, model {b}): the model's is kept")
    return dict(pretrained.state_dict())


def load_weights(
    model: torch.nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = True,
    resize_vocab: bool = False,
) -> LoadReport:
    """Load weights from ``source`` into ``model`` (a plain ``BlipForQuestionAnswering``) and say what was done.

    ``source``: an original BLIP/MISS pickle (converted, positions interpolated), a ``.safetensors`` file, a
    Hugging Face BLIP VQA folder, a hub id such as ``Salesforce/blip-vqa-base`` (local cache first; offline it
    fails in seconds), or a state dict in memory. With ``strict`` every model key must be filled and every
    checkpoint key used; otherwise they are only reported. Wrong shapes always raise. ``resize_vocab``: append
    mean-initialised rows when the checkpoint lacks [DEC]/[ENC] (bert-base-uncased's 30,522 words).
    """
    src = "<state dict>" if isinstance(source, Mapping) else os.fspath(source)
    path = Path(src).expanduser()
    report = LoadReport(source=src, kind="state_dict")
    if isinstance(source, Mapping):
        sd = _state_dict_in(source, src)
    elif path.is_file() and path.suffix in (*PICKLE_SUFFIXES, ".safetensors"):
        sd, report.kind = read_state_dict(path), "safetensors" if path.suffix == ".safetensors" else "state_dict"
    elif path.is_file():
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected "
                              f"{', '.join(PICKLE_SUFFIXES)}, .safetensors, a folder or a hub id")
    elif path.is_dir() and not (path / "config.json").is_file():
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path}: a folder with neither config.json nor model.safetensors (a Hugging "
                                  "Face BLIP VQA folder, as save_pretrained writes)")
        sd, report.kind = read_state_dict(path / "model.safetensors"), "safetensors"
    elif path.is_dir() or (path.suffix not in (*PICKLE_SUFFIXES, ".safetensors") and src.count("/") <= 1
                           and not src.startswith((".", "/", "~"))):
        report.kind = "huggingface"
        sd = _from_pretrained(model, src, report, strict)
    else:
        raise CheckpointError(f"{src}: no such checkpoint file or folder (and not a hub id like owner/name)")
    if any(k.startswith("visual_encoder.") for k in sd):
        sd, report.dropped = convert_blip_state_dict(sd)
        report.kind = "blip"
    _adapt_sizes(sd, report, model, resize_vocab)
    return _load_into(model, sd, report, strict)
