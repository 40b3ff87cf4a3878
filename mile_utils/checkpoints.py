"""Read MISS/BLIP VQA weights into a model: original names converted to transformers', ViT positions interpolated;
pickles (MILE's ``train_MILE.py`` checkpoints included) read without running code from the file."""

from __future__ import annotations

import _compat_pickle
import functools
import math
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch._weights_only_unpickler import _get_allowed_globals
from transformers import BlipForQuestionAnswering

from .model import load_local_first

POS_KEY = "vision_model.embeddings.position_embedding"
# Original ViT (timm, as vendored by BLIP) -> transformers' names; BLIP's text stacks (med.py) share transformers'.
_LAYER = r"vision_model.encoder.layers.\1."
_RENAMES = [(re.compile("^visual_encoder." + p), r) for p, r in (
    (r"cls_token$", "vision_model.embeddings.class_embedding"),
    (r"pos_embed$", POS_KEY), (r"patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm(\d)\.", _LAYER + r"layer_norm\2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", _LAYER + "self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", _LAYER + "self_attn.projection."), (r"blocks\.(\d+)\.mlp\.", _LAYER + "mlp."),
    (r"norm\.", "vision_model.post_layernorm."))]
_DROPS = [(re.compile(p), reason) for p, reason in (  # original keys dropped on purpose, with the reason reported
    (r"^(text_encoder|text_decoder\.bert)\.embeddings\.position_ids$", "buffer arange(512), rebuilt by transformers"),
    (r"^(visual_encoder|text_encoder|text_decoder|vision_proj|text_proj)_m\.", "BLIP pretraining momentum encoder"),
    (r"^(vision_proj|text_proj|itm_head)\.|^(temp|image_queue|text_queue|idx_queue|ptr_queue)$",
     "BLIP pretraining ITC/ITM heads and contrastive state, not part of the VQA model"))]
# Config fields a Hugging Face checkpoint must share with the model though no shape shows them (other maths), and
# those only reported (numerically minor: BLIP's timm ViT eps 1e-6 vs transformers' 1e-5; or the tokenizer's)
_MUST_MATCH = [(part, f) for part in ("text_config", "vision_config") for f in ("num_attention_heads", "hidden_act")]
_NOTED = [(part, "layer_norm_eps") for part in ("text_config", "vision_config")]
_NOTED += [("text_config", f) for f in ("pad_token_id", "bos_token_id", "sep_token_id")]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and keys."""


class _Inert:
    """Stands for a class or function named in a pickle: takes whatever it is given and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    __call__ = __setstate__ = __setitem__ = append = extend = __init__  # pickle's BUILD, SETITEMS, APPENDS...


class _Unpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be overridden
    """Finds only torch's ``weights_only`` allowlist (tensor rebuilding, containers, dtypes); others become inert."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # protocol 2's py2 names
        name = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
        return _get_allowed_globals().get(name) or type(f"Inert[{name}]", (_Inert,), {})

    def load_build(self) -> None:  # as torch's reader: no setting attributes of classes or functions it found
        if not isinstance(self.stack[-2], (_Inert, Tensor, OrderedDict)):
            raise pickle.UnpicklingError(f"BUILD of a {type(self.stack[-2]).__name__} refused")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def _load_pickle(path: Path) -> Any:
    """The object in a ``torch.save`` file, without running code from it: unknown classes (a ruamel config...) become
    inert placeholders. Non-zip (pre-1.6) files go to torch's ``weights_only`` reader, which refuses them."""
    if not zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    # torch reads the archive and tensors, our unpickler the pickle: no code from the file runs. weights_only=False
    # only as torch takes a pickle_module with it alone (its own reader refuses the ruamel configs in MILE's files)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=types.SimpleNamespace(
        Unpickler=_Unpickler, __name__="mile_utils.checkpoints"))


def _state_dict_in(obj: Any, where: str) -> dict[str, Tensor]:
    """The name -> tensor dict in a loaded object: bare, or under "model"/"state_dict" (other entries ignored)."""
    if isinstance(obj, Mapping):
        obj = next((obj[w] for w in ("model", "state_dict") if isinstance(obj.get(w), Mapping)), obj)
    bad = ([f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
           if isinstance(obj, Mapping) else [f"a {type(obj).__name__}"])
    if bad or not obj:  # the first few, enough to recognise the file
        raise CheckpointError(f"{where}: expected a state dict (name -> tensor), bare or under 'model'; got "
                              + (", ".join(bad[:5]) or "{}"))
    return dict(obj)


def check_keys(source: str, expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> None:
    """Raise :class:`CheckpointError` listing missing and unexpected keys and other shapes (the first 20 of each)."""
    missing, unexpected = [k for k in expected if k not in given], [k for k in given if k not in expected]
    shapes = [f"{k}: {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    lists = [f"  {title} ({len(keys)}):\n" + "\n".join(f"    {k}" for k in keys[:20])
             + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
             for title, keys in (("missing keys, in the model but not in the checkpoint", missing),
                                 ("unexpected keys, in the checkpoint but not in the model", unexpected),
                                 ("shape mismatches, checkpoint vs model", shapes)) if keys]
    if lists:
        raise CheckpointError("\n".join([f"{source} does not match the model:", *lists]))


def load_weights(model: torch.nn.Module, source: str | os.PathLike[str] | Mapping[str, Tensor]) -> dict[str, Any]:
    """Load ``source`` into a plain ``BlipForQuestionAnswering``: a BLIP/MISS pickle, a ``.safetensors`` file, a Hugging
    Face BLIP VQA folder or hub id (local first), or a state dict. Keys and shapes must all match, else
    :class:`CheckpointError` lists the differences. Returns ``kind`` ("blip": names converted), ``loaded``, ``dropped``
    (key -> why), ``interpolated`` (ViT grid positions before, after), ``notes`` (config differences)."""
    src = "<state dict>" if isinstance(source, Mapping) else os.fspath(source)
    path = Path(src).expanduser()
    report: dict[str, Any] = {"source": src, "kind": "state_dict", "dropped": {}, "interpolated": None, "notes": []}
    if isinstance(source, Mapping):
        sd = _state_dict_in(source, src)
    elif path.is_file():  # .safetensors, else a pickle (.pth, .pt, .bin, .ckpt...)
        report["kind"], what = (("safetensors", "safetensors file") if path.suffix == ".safetensors"
                                else ("state_dict", "PyTorch checkpoint"))
        try:
            obj = load_file(path) if report["kind"] == "safetensors" else _load_pickle(path)
        except Exception as err:  # corrupt bytes surface as almost any error inside a reader
            raise CheckpointError(f"{path}: not a readable {what} (corrupt, truncated or another format): "
                                  + f"{type(err).__name__}: {err}".splitlines()[0]) from err
        sd = _state_dict_in(obj, src)
    elif path.is_dir() or (not path.suffix and src.count("/") <= 1 and not src.startswith((".", "/", "~"))):
        report["kind"] = "huggingface"  # a BLIP VQA folder or hub id: its config checked against the model's
        load = functools.partial(BlipForQuestionAnswering.from_pretrained, output_loading_info=True)
        try:
            pretrained, info = load_local_first(load, src, "BLIP VQA weights (--checkpoint)", CheckpointError)
        except OSError as err:  # a folder without weights, a config of another model type...
            raise CheckpointError(f"{src}: not a loadable Hugging Face BLIP VQA folder (config.json and "
                                  f"model.safetensors, as save_pretrained writes): {err}") from err
        for part, name in _MUST_MATCH + _NOTED:
            theirs, ours = (getattr(getattr(m.config, part), name, None) for m in (pretrained, model))
            if theirs != ours and (part, name) in _NOTED:
                report["notes"].append(f"{part}.{name} differs (checkpoint {theirs}, model {ours}): the model's kept")
            elif theirs != ours:
                raise CheckpointError(f"{src}: its configuration does not match the model's: {part}.{name}: "
                                      f"checkpoint {theirs!r}, model {ours!r}")
        # keys from_pretrained had to initialise at random count as missing (listed by check_keys)
        sd = {k: v for k, v in pretrained.state_dict().items() if k not in info["missing_keys"]}
    else:
        raise CheckpointError(f"{src}: no such checkpoint file or folder (and not a hub id like owner/name)")
    if any(k.startswith("visual_encoder.") for k in sd):  # original BLIP/MISS names: convert
        report["kind"], report["dropped"] = "blip", {k: why for k in sd for p, why in _DROPS if p.match(k)}
        sd = {next((p.sub(r, k) for p, r in _RENAMES if p.match(k)), k): v for k, v in sd.items()
              if k not in report["dropped"]}
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    if POS_KEY in sd and (old := sd[POS_KEY].shape[-2] - 1) != patches:
        # another image size (224/384 px checkpoints, a 480 px model): resize the ViT positions as BLIP does,
        # cls kept, the grid bicubic (in fp32) with align_corners=False
        old_side, new_side, pos = math.isqrt(old), math.isqrt(patches), sd[POS_KEY]
        if old_side * old_side != old or new_side * new_side != patches:
            raise CheckpointError(f"{src}: position embeddings of shape {tuple(pos.shape)} do not form a square "
                                  f"grid of patches (+1 cls) that can be resized to {patches} patches")
        grid = pos[:, 1:].float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        sd[POS_KEY] = torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)), dim=1)
        report["interpolated"] = (old, patches)
    for pair in model.all_tied_weights_keys.items():  # one tensor, two names (the decoder's output = embeddings)
        present = [sd[n] for n in pair if n in sd]
        if len(present) == 2 and (present[0].shape != present[1].shape or not torch.equal(*present)):
            raise CheckpointError(f"{src}: {' and '.join(pair)} differ, but the model ties them (one tensor); "
                                  "loading would silently keep only one of them")
        sd.update(dict.fromkeys(pair, present[0]) if present else {})
    target = model.state_dict()
    check_keys(src, target, sd)
    model.load_state_dict(sd)
    return {**report, "loaded": len(target)}
