"""Build MISS (BLIP's VQA architecture, from ``transformers``) and its tokenizer for a profile.

MISS is architecturally ``BlipForQuestionAnswering``: ``vision_model`` is the ViT, ``text_encoder`` the joint
text-multimodal encoder (JTM), ``text_decoder`` the answer decoder. We build on it rather than vendoring BLIP code.
Checkpoint reading and conversion live in :mod:`mile_utils.checkpoints`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForQuestionAnswering,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .profiles import Profile, get_profile

DEC_TOKEN = "[DEC]"  # decoder's bos, as in BLIP/MISS
ENC_TOKEN = "[ENC]"  # replaces [CLS] as the JTM's first token, as in BLIP/MISS
TINY_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# bert-base-uncased's [PAD] and [SEP], then [DEC] and [ENC] appended at 30522/30523 (BLIP's init_tokenizer)
BLIP_SPECIAL_IDS = {"pad": 0, "bos": 30522, "sep": 102, "enc": 30523}


def _tiny_words() -> list[str]:
    text = resources.files("mile_utils.reference").joinpath("tiny_vocab_words.txt").read_text(encoding="utf-8")
    return [w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def tiny_vocabulary() -> list[str]:
    """The tiny profile's WordPiece vocabulary, in id order; the same on every machine.

    Every printable ASCII character appears both as a word start and as a ``##`` continuation, so no English
    text maps to [UNK]; whole medical-VQA words follow so that most questions are a few tokens long.
    """
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab: list[str] = list(TINY_SPECIAL) + chars + ["##" + c for c in chars if c.isalnum()]
    seen = set(vocab)
    for word in _tiny_words():
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab + [DEC_TOKEN, ENC_TOKEN]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-uncased WordPiece tokenizer built offline, with BLIP's special tokens ([DEC] bos, [ENC])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(tiny_vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token=DEC_TOKEN,
        additional_special_tokens=[ENC_TOKEN],
        model_max_length=512,
    )


def add_blip_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add [DEC] (as bos) and [ENC] where missing, in BLIP's order, so ids land at 30522 and 30523."""
    if tokenizer.convert_tokens_to_ids(DEC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    else:
        tokenizer.bos_token = DEC_TOKEN
    if tokenizer.convert_tokens_to_ids(ENC_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def build_tokenizer(profile: str | Profile = "tiny", path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``profile``.

    ``tiny`` (and any profile with ``path=None`` offline) uses the deterministic built-in tokenizer. ``paper``
    loads BERT-base-uncased WordPiece from ``path`` (a local folder, e.g. a BLIP VQA or bert-base-uncased
    snapshot) or, when ``path`` is a hub id, from the hub; [DEC] and [ENC] are added as BLIP does.
    """
    prof = get_profile(profile)
    if path is None and prof.vocab_size is None:
        return build_tiny_tokenizer()
    source = str(path) if path is not None else "bert-base-uncased"
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source)
    except OSError as err:
        raise OSError(
            f"could not load the tokenizer for profile {prof.name!r} from {source!r}: give a local folder with "
            "vocab.txt/tokenizer.json (bert-base-uncased or a BLIP VQA snapshot) or a hub id with network access"
        ) from err
    return add_blip_special_tokens(tokenizer)


def blip_config(profile: str | Profile = "tiny", tokenizer: PreTrainedTokenizerBase | None = None) -> BlipConfig:
    """A ``BlipConfig`` of the profile's size whose special-token ids match ``tokenizer``."""
    prof = get_profile(profile)
    if tokenizer is None and prof.vocab_size is not None:
        # bert-base-uncased + [DEC] + [ENC]: BLIP's ids, so the paper size needs no tokenizer download
        ids = BLIP_SPECIAL_IDS
    else:
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(prof)
        ids = {
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.convert_tokens_to_ids(DEC_TOKEN),
            "sep": tokenizer.sep_token_id,
        }
    vocab_size = prof.vocab_size or len(tokenizer)
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but profile {prof.name!r} has {vocab_size}")
    text = dict(
        vocab_size=vocab_size,
        hidden_size=prof.text_hidden,
        encoder_hidden_size=prof.vit_hidden,
        intermediate_size=prof.text_mlp,
        num_hidden_layers=prof.text_layers,
        num_attention_heads=prof.text_heads,
        max_position_embeddings=prof.max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        sep_token_id=ids["sep"],
        eos_token_id=ids["sep"],
    )
    vision = dict(
        hidden_size=prof.vit_hidden,
        intermediate_size=prof.vit_mlp,
        num_hidden_layers=prof.vit_layers,
        num_attention_heads=prof.vit_heads,
        image_size=prof.image_size,
        patch_size=prof.patch_size,
        # BLIP's ViT (timm) uses LayerNorm eps 1e-6 and trunc-normal init with std 0.02; transformers' BLIP
        # defaults (1e-5, std 1e-10) would leave a randomly initialised ViT with near-zero weights that barely learn
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    config = BlipConfig(text_config=text, vision_config=vision)
    # BLIP's text stacks compute attention explicitly; eager keeps masks additive and identical across versions.
    config._attn_implementation = "eager"
    return config


def build_model(
    profile: str | Profile = "tiny",
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
) -> BlipForQuestionAnswering:
    """A randomly initialised MISS/BLIP VQA model of the profile's size.

    ``device="meta"`` allocates no weights (seconds for the paper profile): enough for parameter accounting.
    Load weights with :func:`mile_utils.checkpoints.load_weights`.
    """
    config = blip_config(profile, tokenizer)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = BlipForQuestionAnswering(config)
    return model


def component_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The three components of a BLIP VQA model by the paper's names (see :data:`mile_utils.adapters.COMPONENTS`)."""
    from .adapters import COMPONENTS

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: getattr(base, attr) for name, attr in COMPONENTS.items()}
