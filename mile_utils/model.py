"""Build MISS (BLIP's VQA architecture, from ``transformers``) and its tokenizer for a profile.

MISS is ``BlipForQuestionAnswering``: ``vision_model`` is the ViT, ``text_encoder`` the joint text-multimodal
encoder (JTM), ``text_decoder`` the answer decoder. :func:`build_model` adds what transformers lacks: the
cross-attention mask fix and the ViT's stochastic depth. Checkpoints are read by :mod:`mile_utils.checkpoints`.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForQuestionAnswering,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .profiles import Profile, get_profile

COMPONENTS: dict[str, str] = {"vit": "vision_model", "jtm": "text_encoder", "dec": "text_decoder"}
DEC_TOKEN = "[DEC]"  # decoder's bos, as in BLIP/MISS
ENC_TOKEN = "[ENC]"  # replaces [CLS] as the JTM's first token, as in BLIP/MISS
# bert-base-uncased's ids, then [DEC] and [ENC] appended at 30522/30523 (BLIP's init_tokenizer)
BLIP_SPECIAL_IDS = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, DEC_TOKEN: 30522, ENC_TOKEN: 30523}
HUB_TIMEOUT_S = 10  # one look at the hub; its client would otherwise retry for minutes when offline


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny profile's BERT-uncased WordPiece tokenizer, built offline and the same on every machine.

    Every printable ASCII character is a word start and a ``##`` continuation, so no English text maps to [UNK];
    whole medical-VQA words follow so that most questions are a few tokens long; [DEC] and [ENC] come last.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    text = resources.files("mile_utils.reference").joinpath("tiny_vocab_words.txt").read_text(encoding="utf-8")
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars if c.isalnum())]
    words += [w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*words, DEC_TOKEN, ENC_TOKEN]))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token=DEC_TOKEN, additional_special_tokens=[ENC_TOKEN], model_max_length=512)


def add_blip_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add [DEC] (as bos) and [ENC] where missing, in BLIP's order, so ids land at 30522 and 30523."""
    if tokenizer.convert_tokens_to_ids(DEC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.bos_token = DEC_TOKEN
    if tokenizer.convert_tokens_to_ids(ENC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def check_blip_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """Raise unless ``tokenizer`` is BERT-base-uncased + [DEC] + [ENC] (30,524 tokens, BLIP's special ids).

    transformers builds an empty-vocabulary tokenizer when no vocabulary file is found: this catches it.
    """
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in BLIP_SPECIAL_IDS}
    if len(tokenizer) != 30524 or ids != BLIP_SPECIAL_IDS:
        raise OSError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens and ids {ids}; the paper profile needs "
            f"bert-base-uncased's 30,522-word vocabulary + [DEC] + [ENC] (30,524 tokens, {BLIP_SPECIAL_IDS}). "
            "Give a folder holding its vocab.txt or tokenizer.json (bert-base-uncased or a BLIP VQA snapshot)")
    return tokenizer


def load_local_first(load: Callable[..., Any], source: str, what: str, error: type[Exception] = OSError) -> Any:
    """``load(source, local_files_only=...)``: a local folder, else the hub cache, else the hub if reachable.

    The hub is asked once with a short timeout (and never under ``HF_HUB_OFFLINE``), so an offline machine
    fails in seconds with a message listing what was tried, instead of retrying for minutes.
    """
    import huggingface_hub

    path = Path(source).expanduser()
    if path.is_dir() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        if not path.is_dir():
            raise error(f"{what}: no such folder {path}")
        return load(str(path), local_files_only=True)
    tried = []
    try:
        return load(source, local_files_only=True)
    except (OSError, ValueError) as err:  # not in the Hugging Face cache
        tried.append(f"the Hugging Face cache: {type(err).__name__}: {str(err).splitlines()[0]}")
    try:
        if huggingface_hub.is_offline_mode():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        huggingface_hub.model_info(source, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # the hub client raises its own HTTP/connection errors, not all OSError
        tried.append(f"the hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise error(
            f"{what}: could not load {source!r}; tried " + "; ".join(tried) + f". Download it where there "
            f"is network (`hf download {source} --local-dir <folder>`), copy the folder here and pass its path"
        ) from err
    return load(source)


def build_tokenizer(profile: str | Profile = "tiny", path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``profile``: ``tiny``'s built-in one, or BERT-base-uncased + [DEC]/[ENC] for ``paper``.

    ``path``: a local folder (a bert-base-uncased or BLIP VQA snapshot) or a hub id (default
    ``bert-base-uncased``), tried local files first. The result is checked (:func:`check_blip_tokenizer`).
    """
    prof = get_profile(profile)
    if path is None and prof.vocab_size is None:
        return _tiny_tokenizer()
    source = str(path or "bert-base-uncased")

    def load(src: str, **kwargs: Any) -> PreTrainedTokenizerBase:
        return check_blip_tokenizer(add_blip_special_tokens(BertTokenizerFast.from_pretrained(src, **kwargs)), src)

    return load_local_first(load, source, f"tokenizer of profile {prof.name!r}")


def blip_config(profile: str | Profile = "tiny", tokenizer: PreTrainedTokenizerBase | None = None) -> BlipConfig:
    """A ``BlipConfig`` of the profile's size whose special-token ids match ``tokenizer``."""
    prof = get_profile(profile)
    if prof.vocab_size is not None:  # paper: BLIP's ids, so the model needs no tokenizer download
        if tokenizer is not None:
            check_blip_tokenizer(tokenizer, "the tokenizer given")
        pad, bos, sep, vocab_size = 0, BLIP_SPECIAL_IDS[DEC_TOKEN], 102, prof.vocab_size
    else:
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(prof)
        pad, bos, sep = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(DEC_TOKEN), tokenizer.sep_token_id
        vocab_size = len(tokenizer)
    text = dict(
        vocab_size=vocab_size, hidden_size=prof.text_hidden, encoder_hidden_size=prof.vit_hidden,
        intermediate_size=prof.text_mlp, num_hidden_layers=prof.text_layers, num_attention_heads=prof.text_heads,
        max_position_embeddings=prof.max_positions, hidden_dropout_prob=prof.text_dropout,
        attention_probs_dropout_prob=prof.text_dropout, pad_token_id=pad, bos_token_id=bos, sep_token_id=sep,
        eos_token_id=sep)
    vision = dict(
        hidden_size=prof.vit_hidden, intermediate_size=prof.vit_mlp, num_hidden_layers=prof.vit_layers,
        num_attention_heads=prof.vit_heads, image_size=prof.image_size, patch_size=prof.patch_size,
        # BLIP's ViT (timm) uses LayerNorm eps 1e-6 and trunc-normal init with std 0.02; transformers' BLIP
        # defaults (1e-5, std 1e-10) would leave a randomly initialised ViT with near-zero weights that barely learn
        layer_norm_eps=1e-6, initializer_range=0.02)
    config = BlipConfig(text_config=text, vision_config=vision)
    config.vision_config.drop_path_rate = prof.vit_drop_path  # read by build_model (transformers has no drop-path)
    # BLIP's text stacks compute attention explicitly; eager keeps masks additive and identical across versions.
    config._attn_implementation = "eager"
    return config


def _cross_attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None,
                             encoder_hidden_states: torch.Tensor | None = None, cache: Any = None,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    # the layer hands the encoder mask over as ``attention_mask``; pass it where the attention reads it
    context, probs = self.self(hidden_states, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=attention_mask, cache=cache)
    return self.output(context, hidden_states), probs


def fix_cross_attention_masks(model: torch.nn.Module) -> int:
    """Make the text stacks' cross-attention honour ``encoder_attention_mask``; returns the layers patched.

    In transformers 5, ``BlipTextAttention`` passes the layer's encoder mask to its self-attention as
    ``attention_mask``, which a cross-attention ignores: the decoder would attend to the question's padding, so
    results would depend on batching, unlike BLIP/MISS (``med.py``). Idempotent; :func:`build_model` applies it.
    """
    patched = 0
    for module in model.modules():
        cross = getattr(module, "crossattention", None)
        if cross is not None and not getattr(cross, "_mile_cross_mask_fixed", False):
            cross.forward = types.MethodType(_cross_attention_forward, cross)
            cross._mile_cross_mask_fixed = True
            patched += 1
    return patched


def _drop_path(rate: float, module: torch.nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: timm's DropPath on a residual branch (whole samples zeroed, the rest scaled), training only."""
    if not module.training:
        return output
    x = output[0] if isinstance(output, tuple) else output
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - rate).div_(1 - rate)
    return (x * keep, *output[1:]) if isinstance(output, tuple) else x * keep


def add_drop_path(vit: torch.nn.Module, rate: float) -> None:
    """Stochastic depth on each ViT block's attention and MLP branches, rising linearly from 0 at the first
    block to ``rate`` at the last (BLIP's ``VisionTransformer``); nothing is added at rate 0."""
    layers = vit.encoder.layers
    for i, layer in enumerate(layers):
        block_rate = rate * i / max(len(layers) - 1, 1)
        if block_rate > 0:
            for branch in (layer.self_attn, layer.mlp):
                branch.register_forward_hook(functools.partial(_drop_path, block_rate))


def build_model(
    profile: str | Profile = "tiny",
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
) -> BlipForQuestionAnswering:
    """A randomly initialised MISS/BLIP VQA model of the profile's size, mask fix and drop-path applied.

    ``device="meta"`` allocates no weights (seconds for the paper profile): enough for parameter accounting.
    Load weights with :func:`mile_utils.checkpoints.load_weights`.
    """
    config = blip_config(profile, tokenizer)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = BlipForQuestionAnswering(config)
    fix_cross_attention_masks(model)
    add_drop_path(model.vision_model, config.vision_config.drop_path_rate)
    return model


def component_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The three components of a BLIP VQA model (or a PEFT wrapper of one) by the paper's names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: getattr(base, attr) for name, attr in COMPONENTS.items()}
