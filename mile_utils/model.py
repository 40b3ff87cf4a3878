"""Build MISS (transformers' ``BlipForQuestionAnswering``: ``vision_model`` = ViT, ``text_encoder`` = JTM,
``text_decoder`` = decoder) and its tokenizer, with what transformers lacks: the cross-attention mask fix, drop-path."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering
from transformers import PreTrainedTokenizerBase as Tokenizer

from .profiles import Profile, get_profile

COMPONENTS: dict[str, str] = {"vit": "vision_model", "jtm": "text_encoder", "dec": "text_decoder"}
DEC_TOKEN = "[DEC]"  # decoder's bos, as in BLIP/MISS
ENC_TOKEN = "[ENC]"  # replaces [CLS] as the JTM's first token, as in BLIP/MISS
# bert-base-uncased's ids, then [DEC] and [ENC] appended at 30522/30523 (BLIP's init_tokenizer)
BLIP_SPECIAL_IDS = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, DEC_TOKEN: 30522, ENC_TOKEN: 30523}


def check_blip_tokenizer(tokenizer: Tokenizer, source: str) -> Tokenizer:
    """Raise unless ``tokenizer`` is bert-base-uncased + [DEC] + [ENC] (transformers builds a 5-word one from none)."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in BLIP_SPECIAL_IDS}
    if len(tokenizer) != 30524 or ids != BLIP_SPECIAL_IDS:
        raise OSError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens and ids {ids}; the paper profile needs "
            f"bert-base-uncased's 30,522-word vocabulary + [DEC] + [ENC] (30,524 tokens, {BLIP_SPECIAL_IDS}). "
            "Give a folder holding its vocab.txt or tokenizer.json (bert-base-uncased or a BLIP VQA snapshot)")
    return tokenizer


def load_local_first(load: Callable[..., Any], source: str, what: str, error: type[Exception] = OSError) -> Any:
    """``load(source, local_files_only=...)`` from a local folder, else the hub cache, else the hub if one look at it
    (short timeout, never under ``HF_HUB_OFFLINE``) finds it: offline it fails in seconds, saying what was tried."""
    path = Path(source).expanduser()
    if path.is_dir() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        if not path.is_dir():
            raise error(f"{what}: no such folder {path}")
        return load(str(path), local_files_only=True)
    try:
        return load(source, local_files_only=True)
    except Exception as err:  # the hub client raises its own HTTP/connection errors, not all OSError
        tried = f"the Hugging Face cache: {type(err).__name__}: {err}".splitlines()[0]
    try:
        if huggingface_hub.is_offline_mode():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        huggingface_hub.model_info(source, timeout=10)  # one look: offline, its client would retry for minutes
    except Exception as err:
        raise error(f"{what}: could not load {source!r}; tried {tried}; " + f"the hub: {type(err).__name__}: {err}"
                    .splitlines()[0] + f". Download it where there is network (`hf download {source} --local-dir "
                    "<folder>`), copy the folder here, pass its path") from err
    return load(source)


def build_tokenizer(profile: str | Profile = "tiny", path: str | Path | None = None) -> Tokenizer:
    """``tiny``: a WordPiece tokenizer built offline, each printable ASCII character a word start and a ``##`` piece (no
    English text maps to [UNK]); ``paper``: bert-base-uncased + [DEC]/[ENC] from ``path``, local files first."""
    prof = get_profile(profile)
    if path is None and prof.vocab_size is None:
        text = resources.files("mile_utils.reference").joinpath("tiny_vocab_words.txt").read_text(encoding="utf-8")
        chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars if c.isalnum())]
        words += [w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")]
        vocab = {w: i for i, w in enumerate(dict.fromkeys([*words, DEC_TOKEN, ENC_TOKEN]))}
        return BertTokenizerFast(vocab=vocab, bos_token=DEC_TOKEN, additional_special_tokens=[ENC_TOKEN],
                                 model_max_length=512)

    def load(src: str, **kwargs: Any) -> Tokenizer:
        tokenizer = BertTokenizerFast.from_pretrained(src, **kwargs)
        # appended in BLIP's order where missing (bert-base-uncased); a BLIP VQA snapshot has them
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
        return check_blip_tokenizer(tokenizer, src)
    return load_local_first(load, str(path or "bert-base-uncased"), f"tokenizer of profile {prof.name!r} (--tokenizer)")


def _cross_attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None,
                             encoder_hidden_states: Any = None, cache: Any = None) -> tuple:
    """The text stacks' cross-attention, honouring the encoder mask: transformers 5 hands it over as ``attention_mask``,
    which a cross-attention ignores, so the decoder would attend to question padding, unlike BLIP/MISS (``med.py``)."""
    context, probs = self.self(hidden_states, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=attention_mask, cache=cache)
    return self.output(context, hidden_states), probs


def _vit_attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> tuple:
    """transformers' ``BlipAttention.forward`` with q, k, v taken by ``unbind``, not by indexing: the same numbers,
    but a backward without three zero-filled copies of the whole q/k/v tensor (~7% of a 1-thread tiny T/T/T step)."""
    bsz, tokens, dim = hidden_states.size()
    q, k, v = self.qkv(hidden_states).reshape(bsz, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    probs = self.dropout(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1))
    return self.projection(torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(bsz, tokens, dim)), probs


def _drop_path(rate: float, module: torch.nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: timm's DropPath on a residual branch (whole samples zeroed, the rest scaled), training only."""
    if not module.training:
        return output
    x = output[0] if isinstance(output, tuple) else output
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - rate).div_(1 - rate)
    return (x * keep, *output[1:]) if isinstance(output, tuple) else x * keep


def build_model(profile: str | Profile = "tiny", tokenizer: Tokenizer | None = None, *,
                device: str | torch.device = "cpu", seed: int | None = 0) -> BlipForQuestionAnswering:
    """A random MISS/BLIP VQA model of the profile's size, special-token ids as ``tokenizer``'s; "meta": no weights."""
    prof = get_profile(profile)
    if prof.vocab_size is not None:  # paper: BLIP's ids, so the model needs no tokenizer download
        if tokenizer is not None:
            check_blip_tokenizer(tokenizer, "the tokenizer given")
        pad, bos, sep, vocab_size = 0, BLIP_SPECIAL_IDS[DEC_TOKEN], 102, prof.vocab_size
    else:
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(prof)
        pad, bos, sep = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(DEC_TOKEN), tokenizer.sep_token_id
        vocab_size = len(tokenizer)
    text = dict(vocab_size=vocab_size, hidden_size=prof.text_hidden, encoder_hidden_size=prof.vit_hidden,
                intermediate_size=prof.text_mlp, num_hidden_layers=prof.text_layers,
                num_attention_heads=prof.text_heads, max_position_embeddings=prof.max_positions,
                hidden_dropout_prob=prof.text_dropout, attention_probs_dropout_prob=prof.text_dropout,
                pad_token_id=pad, bos_token_id=bos, sep_token_id=sep, eos_token_id=sep)
    # BLIP's ViT (timm) uses LayerNorm eps 1e-6 and trunc-normal init with std 0.02; transformers' BLIP defaults
    # (1e-5, std 1e-10) would leave a randomly initialised ViT with near-zero weights that barely learn
    vision = dict(hidden_size=prof.vit_hidden, intermediate_size=prof.vit_mlp, num_hidden_layers=prof.vit_layers,
                  num_attention_heads=prof.vit_heads, image_size=prof.image_size, patch_size=prof.patch_size,
                  layer_norm_eps=1e-6, initializer_range=0.02, drop_path_rate=prof.vit_drop_path)  # ours: a hook
    config = BlipConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"  # BLIP computes attention explicitly: masks stay additive, as there
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = BlipForQuestionAnswering(config)
    for cross in [m.crossattention for m in model.modules() if hasattr(m, "crossattention")]:
        cross.forward = types.MethodType(_cross_attention_forward, cross)
    layers, rate = model.vision_model.encoder.layers, config.vision_config.drop_path_rate
    for i, layer in enumerate(layers):  # BLIP's ViT: drop-path rates rising linearly from 0 (first block) to rate
        layer.self_attn.forward = types.MethodType(_vit_attention_forward, layer.self_attn)
        if rate * i > 0:  # hooks only where they act: tiny (rate 0) runs exactly as without
            for branch in (layer.self_attn, layer.mlp):  # the two residual branches of the block
                branch.register_forward_hook(functools.partial(_drop_path, rate * i / max(len(layers) - 1, 1)))
    return model


def component_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: getattr(model, attr) for name, attr in COMPONENTS.items()}
