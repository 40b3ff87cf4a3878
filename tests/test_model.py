"""Model building, profiles and the offline tokenizer."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from mile_utils.model import (
    BLIP_SPECIAL_IDS,
    DEC_TOKEN,
    ENC_TOKEN,
    build_model,
    build_tiny_tokenizer,
    build_tokenizer,
    component_modules,
    tiny_vocabulary,
)
from mile_utils.profiles import PROFILES, get_profile


def _reference() -> dict:
    text = resources.files("mile_utils.reference").joinpath("mile_paper_results.json").read_text()
    return json.loads(text)


def test_paper_profile_has_miss_size_on_meta_device():
    model = build_model("paper", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    arch = _reference()["miss_architecture"]
    counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in component_modules(model).items()}
    assert counts == {"vit": arch["vit"], "jtm": arch["jtm"], "dec": arch["decoder"]}
    assert sum(p.numel() for p in model.parameters()) == arch["total_parameters"]
    text = model.config.text_config
    assert (text.vocab_size, text.bos_token_id, text.pad_token_id, text.sep_token_id) == (30524, 30522, 0, 102)
    assert model.config.vision_config.image_size == 480


def test_tiny_tokenizer_is_deterministic_and_has_blip_special_tokens():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    vocab = tiny_vocabulary()
    assert vocab[-2:] == [DEC_TOKEN, ENC_TOKEN]  # BLIP appends [DEC] then [ENC] after the base vocabulary
    assert a.bos_token == DEC_TOKEN and a.bos_token_id == len(vocab) - 2
    assert a.convert_tokens_to_ids(ENC_TOKEN) == len(vocab) - 1
    assert a.pad_token_id == 0
    enc = a("Is there a LESION in the left hemisphere?")
    tokens = a.convert_ids_to_tokens(enc.input_ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "lesion" in tokens and "hemisphere" in tokens  # whole words, lower-cased
    # unknown words fall back to characters, never to [UNK]
    assert a.unk_token_id not in a("zygomaticofacial xq").input_ids


def test_tiny_model_matches_tokenizer_and_runs_forward():
    tok = build_tokenizer("tiny")
    model = build_model("tiny", tok)
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.text_config.bos_token_id == tok.bos_token_id
    prof = get_profile("tiny")
    q = tok(["is there a lesion?", "which plane is this?"], padding=True, return_tensors="pt")
    a = tok(["yes", "axial"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, prof.image_size, prof.image_size)
    out = model(input_ids=q.input_ids, attention_mask=q.attention_mask, pixel_values=pixels, labels=a.input_ids)
    assert torch.isfinite(out.loss)


def test_build_model_is_seeded():
    a = build_model("tiny", seed=3).state_dict()
    b = build_model("tiny", seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_profiles_and_errors():
    assert set(PROFILES) == {"tiny", "paper"}
    paper = get_profile("paper")
    assert (paper.batch_size, paper.lr, paper.epochs, paper.image_size) == (20, 1e-5, 130, 480)
    assert paper.vocab_size == 30524 and BLIP_SPECIAL_IDS["bos"] == 30522
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        get_profile("huge")
