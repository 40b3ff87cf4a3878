"""Model building, profiles, the offline tokenizers and what build_model adds to transformers' BLIP."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from importlib import resources

import pytest
import torch

from mile_utils.model import (
    BLIP_SPECIAL_IDS,
    DEC_TOKEN,
    ENC_TOKEN,
    build_model,
    build_tokenizer,
    component_modules,
)
from mile_utils.profiles import PROFILES, get_profile


def _reference() -> dict:
    text = resources.files("mile_utils.reference").joinpath("mile_paper_results.json").read_text()
    return json.loads(text)


def test_paper_profile_has_miss_size_and_regularisation():
    model = build_model("paper", device="meta")
    arch = _reference()["miss_architecture"]
    counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in component_modules(model).items()}
    assert counts == {"vit": arch["vit"], "jtm": arch["jtm"], "dec": arch["decoder"]}
    assert sum(p.numel() for p in model.parameters()) == arch["total_parameters"]
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.vocab_size, text.bos_token_id, text.pad_token_id, text.sep_token_id) == (30524, 30522, 0, 102)
    assert vision.image_size == 480
    # MISS: med_config.json dropout 0.1 (hidden and attention), create_vit(drop_path_rate=0.1)
    assert (text.hidden_dropout_prob, text.attention_probs_dropout_prob, vision.drop_path_rate) == (0.1, 0.1, 0.1)
    tiny = build_model("tiny").config
    assert (tiny.text_config.hidden_dropout_prob, tiny.vision_config.drop_path_rate) == (0.0, 0.0)


def test_tiny_tokenizer_is_deterministic_and_has_blip_special_tokens():
    a, b = build_tokenizer("tiny"), build_tokenizer("tiny")
    assert a.get_vocab() == b.get_vocab()
    n = len(a)  # BLIP appends [DEC] then [ENC] after the base vocabulary
    assert a.bos_token == DEC_TOKEN and a.bos_token_id == n - 2 and a.convert_tokens_to_ids(ENC_TOKEN) == n - 1
    assert a.pad_token_id == 0
    tokens = a.convert_ids_to_tokens(a("Is there a LESION in the left hemisphere?").input_ids)
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
    assert paper.vocab_size == 30524 and BLIP_SPECIAL_IDS[DEC_TOKEN] == 30522
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        get_profile("huge")


def _vit_out(model: torch.nn.Module, train: bool) -> torch.Tensor:
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return component_modules(model.train(train))["vit"](pixel_values=pixels).last_hidden_state


def test_vit_drop_path_acts_in_training_only_and_is_off_at_zero():
    tok = build_tokenizer("tiny")
    plain = build_model("tiny", tok, seed=0)
    dropped = build_model(replace(get_profile("tiny"), vit_drop_path=0.5), tok, seed=0)
    layers = component_modules(dropped)["vit"].encoder.layers
    # BLIP's linear schedule: no drop-path in the first block, the full rate in the last
    assert not layers[0].mlp._forward_hooks and layers[-1].mlp._forward_hooks and layers[-1].self_attn._forward_hooks
    assert not any(m._forward_hooks for m in plain.modules())  # rate 0: nothing added, tiny results unchanged
    ref = _vit_out(plain, train=False)
    assert torch.equal(_vit_out(dropped, train=False), ref)  # same weights; eval is deterministic
    assert torch.equal(_vit_out(plain, train=True), ref)  # tiny: no dropout anywhere in the ViT
    torch.manual_seed(1)
    a, b = _vit_out(dropped, train=True), _vit_out(dropped, train=True)
    assert not torch.equal(a, ref) and not torch.equal(a, b)  # a fresh draw per forward, per sample


def test_vit_attention_matches_transformers_bit_for_bit():
    """build_model's ViT attention (unbind, for speed) against transformers' own forward: same loss, same gradients."""
    tok = build_tokenizer("tiny")
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = []
    for ours in (True, False):
        vit = component_modules(build_model("tiny", tok, seed=0).train())["vit"]
        if not ours:  # back to the class's forward
            for layer in vit.encoder.layers:
                del layer.self_attn.forward
        vit(pixel_values=pixels).last_hidden_state.square().mean().backward()
        results.append([p.grad for p in vit.parameters()])
    assert len(results[0]) == len(results[1]) > 10
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_text_dropout_acts_in_training_only():
    tok = build_tokenizer("tiny")
    model = build_model(replace(get_profile("tiny"), text_dropout=0.1), tok, seed=0)
    q = tok(["is there a lesion?"], return_tensors="pt")
    states = torch.randn(1, 65, 128, generator=torch.Generator().manual_seed(0))

    def jtm(train: bool) -> torch.Tensor:
        with torch.no_grad():
            return component_modules(model.train(train))["jtm"](
                input_ids=q.input_ids, attention_mask=q.attention_mask, encoder_hidden_states=states)[0]

    assert torch.equal(jtm(False), jtm(False)) and not torch.equal(jtm(True), jtm(False))


def test_decoder_cross_attention_ignores_masked_question_positions():
    """The mask fix build_model applies: padding in the question states must not change the answer logits."""
    tok = build_tokenizer("tiny")
    dec = component_modules(build_model("tiny", tok, seed=0).eval())["dec"]
    states = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(0))
    padded = torch.cat((states, torch.randn(1, 3, 128)), dim=1)
    ids = torch.tensor([[tok.bos_token_id, 7, 9]])
    with torch.no_grad():
        short = dec(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=torch.ones(1, 5)).logits
        long = dec(input_ids=ids, encoder_hidden_states=padded,
                   encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 3])).logits
    assert torch.allclose(short, long, atol=1e-6)


# ---------------------------------------------------------------------------------------- paper tokenizer


def _bert_vocab(folder) -> None:
    """A vocab.txt laid out as bert-base-uncased's: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, 30,522."""
    words = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["is", "there", "a", "lesion", "?"] + [f"w{i}" for i in range(30522 - len(words) - 5)]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")


def test_paper_tokenizer_from_a_local_folder_is_checked(tmp_path):
    _bert_vocab(tmp_path / "bert")
    tok = build_tokenizer("paper", tmp_path / "bert")
    assert len(tok) == 30524
    assert {t: tok.convert_tokens_to_ids(t) for t in BLIP_SPECIAL_IDS} == BLIP_SPECIAL_IDS
    assert tok("is there a lesion?").input_ids[0] == 101 and tok.unk_token_id not in tok("is there a lesion?").input_ids
    model = build_model("paper", tok, device="meta")  # the config's ids agree with the tokenizer's
    assert model.config.text_config.bos_token_id == tok.bos_token_id == 30522
    (tmp_path / "empty").mkdir()  # no vocabulary files: transformers would build a 5-word tokenizer
    with pytest.raises(OSError, match=r"empty has 7 tokens.*needs bert-base-uncased's 30,522-word vocabulary"):
        build_tokenizer("paper", tmp_path / "empty")
    with pytest.raises(OSError, match="no such folder"):
        build_tokenizer("paper", tmp_path / "missing")
    with pytest.raises(OSError, match="tokens and ids"):  # the tiny tokenizer does not fit the paper model
        build_model("paper", build_tokenizer("tiny"), device="meta")


def test_hub_tokenizer_offline_fails_in_seconds(monkeypatch):
    hub_id = "mile-tests/not-cached-anywhere"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"tried the Hugging Face cache.*HF_HUB_OFFLINE is set.*hf download " + hub_id):
        build_tokenizer("paper", hub_id)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # online, but the hub unreachable
    monkeypatch.setattr("huggingface_hub.hf_api.api.endpoint", "http://127.0.0.1:9")
    with pytest.raises(OSError, match=r"the hub: \w+Error"):
        build_tokenizer("paper", hub_id)
    assert time.perf_counter() - start < 30  # not minutes of retries
