"""The training loop: collate, loss, lr schedule, caches, trainable-only optimizer/checkpoint, NaN stop."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mile_utils.adapters import apply_spec
from mile_utils.data.records import Record
from mile_utils.data.transforms import ImageTransform, VQADataset
from mile_utils.model import ENC_TOKEN, build_model, build_tokenizer
from mile_utils.profiles import get_profile
from mile_utils.train import (
    CHECKPOINT_NAME,
    FeatureCache,
    FrozenFeatures,
    NonFiniteLossError,
    TrainOptions,
    VQACollator,
    VQALoss,
    cosine_lr,
    encode_answers,
    encode_questions,
    load_checkpoint,
    make_accelerator,
    train_model,
    weights_fingerprint,
)

TINY = get_profile("tiny")
QUESTIONS = ("is there a lesion?", "what plane is this image?", "which side is the tumor on?")
ANSWERS = ("yes", "no", "axial", "left side")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(n: int = 24, n_images: int = 6, train: bool = True) -> VQADataset:
    images = [_png(i) for i in range(n_images)]
    records = [Record(img_name=f"img{i % n_images}.png", question=QUESTIONS[i % 3], answer=ANSWERS[i % 4],
                      answer_type="CLOSED" if i % 2 else "OPEN", content_type="Organ", qid=i,
                      image_bytes=images[i % n_images]) for i in range(n)]
    return VQADataset(records, ImageTransform(TINY.image_size), train=train)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


def make_model(tokenizer, spec: str):
    return apply_spec(build_model("tiny", tokenizer, seed=0), spec, seed=0)


def test_collate_follows_blip_conventions(tokenizer):
    ids, mask = encode_questions(tokenizer, ["is there a lesion?", "what " * 60], TINY.max_question_tokens)
    assert (ids[:, 0] == tokenizer.convert_tokens_to_ids(ENC_TOKEN)).all()
    assert ids.shape[1] == TINY.max_question_tokens  # truncated at the profile's limit
    assert ids[1, -1] == tokenizer.sep_token_id and mask[0].sum() < mask[1].sum()
    a_ids, a_mask, labels = encode_answers(tokenizer, ["yes", "left side"], TINY.max_answer_tokens)
    assert (a_ids[:, 0] == tokenizer.bos_token_id).all()
    assert (labels[a_ids == tokenizer.pad_token_id] == -100).all()
    assert (labels[a_mask.bool()] == a_ids[a_mask.bool()]).all()
    batch = VQACollator(tokenizer, TINY, make_dataset(4), need_pixels=False)([0, 1])
    assert "pixel_values" not in batch and batch["img_names"] == ["img0.png", "img1.png"]


def test_cosine_schedule_matches_reference():
    assert cosine_lr(0, 10, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert cosine_lr(5, 10, 1e-3, 1e-5) == pytest.approx((1e-3 - 1e-5) * 0.5 + 1e-5)
    assert cosine_lr(10, 10, 1e-3, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(3, 130, 1e-5, 0.0) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 3 / 130)))


def test_loss_is_summed_over_tokens_and_averaged_over_batch(tokenizer):
    model = make_model(tokenizer, "F/T/T")
    ds = make_dataset(4)
    batch = VQACollator(tokenizer, TINY, ds)([0, 1, 2, 3])
    per_answer = VQALoss(model, label_smoothing=0.0)(batch)
    out = model.text_decoder(input_ids=batch["answer_ids"], attention_mask=batch["answer_mask"],
                             encoder_hidden_states=model.text_encoder(
                                 input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 encoder_hidden_states=model.vision_model(batch["pixel_values"])[0]
                             ).last_hidden_state,
                             encoder_attention_mask=batch["attention_mask"], labels=batch["labels"],
                             reduction="none")
    torch.testing.assert_close(per_answer, out.loss)  # HF's per-answer sum, label smoothing 0


@pytest.mark.parametrize("spec", ["F/F/lora", "F/T/T"])
def test_loss_with_cache_equals_loss_without(tokenizer, spec):
    model = make_model(tokenizer, spec)
    ds = make_dataset(12)
    indices = list(range(12))
    cached = FrozenFeatures(model, tokenizer, TINY, "test-eq", cache=FeatureCache(1 << 30))
    plain = FrozenFeatures(model, tokenizer, TINY, "test-eq", enabled=False)
    cached.prepare(ds)
    assert cached.vit_cached and cached.jtm_cached == (spec == "F/F/lora") and not plain.vit_cached
    loss = VQALoss(model)
    with torch.no_grad():
        torch.manual_seed(1)  # same LoRA dropout masks in both forwards
        with_cache = loss(cached.attach(VQACollator(tokenizer, TINY, ds, need_pixels=False)(indices), ds))
        torch.manual_seed(1)
        without = loss(plain.attach(VQACollator(tokenizer, TINY, ds)(indices), ds))
    torch.testing.assert_close(with_cache, without, rtol=1e-5, atol=1e-5)


def test_cache_never_serves_stale_entries(tokenizer):
    cache = FeatureCache(1 << 30)
    model = make_model(tokenizer, "F/F/lora")
    ds = make_dataset(6)
    first = FrozenFeatures(model, tokenizer, TINY, "stale", cache=cache)
    first.prepare(ds)
    assert first.computed > 0 and len(cache) > 0
    again = FrozenFeatures(model, tokenizer, TINY, "stale", cache=cache)
    again.prepare(ds)
    assert again.computed == 0  # same weights: everything served from the process cache
    fp = weights_fingerprint(model.vision_model)
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.add_(0.5)  # e.g. new weights loaded into the frozen ViT
    assert weights_fingerprint(model.vision_model) != fp
    changed = FrozenFeatures(model, tokenizer, TINY, "stale", cache=cache)
    changed.prepare(ds)
    assert changed.computed == first.computed  # recomputed, not served from the old entries


def test_trainable_only_in_optimizer_and_checkpoint(tokenizer, tmp_path):
    model = make_model(tokenizer, "F/F/lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    options = TrainOptions(epochs=2, batch_size=8, lr=1e-3, progress=False)
    result = train_model(model, tokenizer, TINY, make_dataset(16), options,
                         namespace="t-opt", out_dir=tmp_path, accelerator=make_accelerator())
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert set(state["trainable"]) == trainable and all(".lora_" in n for n in trainable)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trainable)
    assert state["epoch"] == 1 and set(state["rng"]) >= {"torch", "numpy", "python"}
    assert [h["lr"] for h in result.history] == pytest.approx([cosine_lr(e, 2, 1e-3, 0.0) for e in range(2)])
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert result.cached["jtm"] and result.history[-1]["loss"] < result.history[0]["loss"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tokenizer, tmp_path, monkeypatch):
    import mile_utils.train as train

    model = make_model(tokenizer, "F/F/T")
    options = TrainOptions(epochs=3, batch_size=8, lr=1e-3, progress=False)
    calls = {"n": 0}
    real = train.answer_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss  # epoch 1 (2 steps) is fine, then NaN

    monkeypatch.setattr(train, "answer_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*last good checkpoint \(epoch 1\)"):
        train_model(model, tokenizer, TINY, make_dataset(16), options, namespace="t-nan", out_dir=tmp_path,
                    accelerator=make_accelerator())
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 0


def test_decoder_ignores_question_padding(tokenizer):
    """transformers' BLIP cross-attention drops the encoder mask; the engine restores BLIP's masking."""
    model = make_model(tokenizer, "F/T/T").eval()
    VQALoss(model)  # applies fix_cross_attention_masks
    states = torch.randn(2, 5, TINY.text_hidden)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.tensor([[tokenizer.bos_token_id, 50, tokenizer.sep_token_id]] * 2)
    noisy = states.clone()
    noisy[0, 3:] = 100.0  # padding positions
    with torch.no_grad():
        dec = model.text_decoder
        a = dec(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
        b = dec(input_ids=ids, encoder_hidden_states=noisy, encoder_attention_mask=mask).logits
    torch.testing.assert_close(a, b)
