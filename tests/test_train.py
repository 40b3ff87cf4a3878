"""The training loop: collate, loss, lr schedule, per-run precompute, trainable-only optimizer/checkpoint, NaN
stop, per-run peak memory."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mile_utils.adapters import apply_spec
from mile_utils.data import ImageTransform, Record, VQADataset
from mile_utils.experiments import RunConfig
from mile_utils.model import ENC_TOKEN, build_model, build_tokenizer
from mile_utils.profiles import get_profile
from mile_utils.train import (
    CHECKPOINT_NAME,
    FrozenFeatures,
    NonFiniteLossError,
    VQACollator,
    VQALoss,
    encode_answers,
    encode_questions,
    make_accelerator,
    peak_memory,
    reset_peak_memory,
    train_model,
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


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """BLIP's per-epoch cosine, written out: what torch's CosineAnnealingLR must reproduce."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


@pytest.mark.parametrize(("epochs", "lr", "min_lr"), [(1, 1e-3, 1e-5), (3, 1e-3, 1e-5), (6, 1e-3, 1e-5),
                                                       (130, 1e-5, 0.0)])
def test_cosine_schedule_matches_reference(epochs, lr, min_lr):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=min_lr)
    got = []
    for _ in range(epochs):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [cosine_lr(e, epochs, lr, min_lr) for e in range(epochs)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-12 * lr
    if epochs <= 6:  # the tiny book's schedules: bit for bit
        assert got == want


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
def test_loss_with_precompute_equals_loss_without(tokenizer, spec):
    model = make_model(tokenizer, spec)
    ds = make_dataset(12)
    indices = list(range(12))
    cached = FrozenFeatures(model, tokenizer, TINY)
    plain = FrozenFeatures(model, tokenizer, TINY, enabled=False)
    cached.prepare(ds)
    assert cached.vit_cached and cached.jtm_cached == (spec == "F/F/lora") and not plain.vit_cached
    summary = cached.summary()
    assert summary["bytes"] > 0 and plain.summary()["bytes"] == 0
    loss = VQALoss(model)
    with torch.no_grad():
        torch.manual_seed(1)  # same LoRA dropout masks in both forwards
        with_cache = loss(cached.attach(VQACollator(tokenizer, TINY, ds, need_pixels=False)(indices), ds))
        torch.manual_seed(1)
        without = loss(plain.attach(VQACollator(tokenizer, TINY, ds)(indices), ds))
    torch.testing.assert_close(with_cache, without, rtol=1e-5, atol=1e-5)


def test_precompute_belongs_to_one_run(tokenizer):
    """No process-wide store: a new FrozenFeatures computes again, from the weights it is given now."""
    model = make_model(tokenizer, "F/F/lora")
    ds = make_dataset(6)
    first = FrozenFeatures(model, tokenizer, TINY)
    first.prepare(ds)
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.add_(0.5)  # e.g. new weights loaded into the frozen ViT
    again = FrozenFeatures(model, tokenizer, TINY)
    again.prepare(ds)
    assert again.summary()["bytes"] == first.summary()["bytes"] > 0
    batch = VQACollator(tokenizer, TINY, ds, need_pixels=False)([0, 1])
    a = first.attach(dict(batch), ds)["question_states"]
    b = again.attach(dict(batch), ds)["question_states"]
    assert not torch.allclose(a, b)  # the second run saw the new weights


def test_trainable_only_in_optimizer_and_checkpoint(tokenizer, tmp_path):
    model = make_model(tokenizer, "F/F/lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    options = RunConfig(epochs=2, batch_size=8, lr=1e-3, min_lr=0.0).resolved()
    result = train_model(model, tokenizer, make_dataset(16), options, out_dir=tmp_path, run_key="k",
                         accelerator=make_accelerator(), progress=False)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # torch's safe loader reads it
    assert set(state["trainable"]) == trainable and all(".lora_" in n for n in trainable)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trainable)
    assert state["epoch"] == 1 and state["run_key"] == "k" and state["scheduler"]["last_epoch"] == 2
    assert [h["lr"] for h in result["history"]] == [cosine_lr(e, 2, 1e-3, 0.0) for e in range(2)]
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    history = result["history"]
    assert result["cached"]["jtm"] and history[-1]["loss"] < history[0]["loss"]
    assert result["memory"]["peak_bytes"] > 0 and result["cached"]["bytes"] > 0


def test_method_lr_trains_a_method_at_its_rate(tokenizer, tmp_path):
    """The tiny profile's per-method rates: a table method's adapter parameters get its rate (annealed by the
    same cosine), the rest the base lr; a run without table methods keeps one rate and its identity."""
    rate, ia3 = dict(TINY.method_lr)["ia3"], RunConfig(spec="F/ia3/ia3")
    assert ia3.resolved().method_lr == {"ia3": rate} and ia3.resolved().to_dict()["method_lr"] == {"ia3": rate}
    assert replace(ia3, lr=1e-3).resolved().method_lr is None  # an explicit lr alone: every part at it
    assert replace(ia3, lr=1e-3, method_lr="ia3=0.5,lora=2").resolved().method_lr == {"ia3": 0.5}
    with pytest.raises(ValueError, match="method_lr"):
        RunConfig(method_lr="ia3:0.5")
    for spec in ("T/T/T", "F/F/lora", "F/prefix/prefix"):
        assert "method_lr" not in RunConfig(spec=spec).resolved().to_dict()
    model = make_model(tokenizer, "T/T/ia3")
    options = RunConfig(spec="T/T/ia3", epochs=2, batch_size=8).resolved()
    result = train_model(model, tokenizer, make_dataset(16), options, out_dir=tmp_path, accelerator=make_accelerator(),
                         progress=False)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    names = list(state["trainable"])
    base, group = state["optimizer"]["param_groups"]
    assert (base["initial_lr"], group["initial_lr"], group["method"]) == (TINY.lr, rate, "ia3")
    assert {names[i] for i in group["params"]} == {n for n in names if n.startswith("text_decoder.")}
    assert all("ia3_" in names[i] for i in group["params"]) and len(base["params"]) + len(group["params"]) == len(names)
    assert [h["method_lr"]["ia3"] for h in result["history"]] == pytest.approx(
        [cosine_lr(e, 2, rate, TINY.min_lr) for e in range(2)])
    again = train_model(make_model(tokenizer, "T/T/ia3"), tokenizer, make_dataset(16), options, out_dir=tmp_path,
                        resume=True, accelerator=make_accelerator(), progress=False)  # restores the same groups
    assert again["resumed_from_epoch"] == 1 and [h["loss"] for h in again["history"]] == [
        h["loss"] for h in result["history"]]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tokenizer, tmp_path, monkeypatch):
    import mile_utils.train as train

    model = make_model(tokenizer, "F/F/T")
    options = RunConfig(epochs=3, batch_size=8, lr=1e-3).resolved()
    calls = {"n": 0}
    real = train.answer_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss  # epoch 1 (2 steps) is fine, then NaN

    monkeypatch.setattr(train, "answer_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*last good checkpoint \(epoch 1\)"):
        train_model(model, tokenizer, make_dataset(16), options, out_dir=tmp_path, accelerator=make_accelerator(),
                    progress=False)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 0


def test_decoder_ignores_question_padding(tokenizer):
    """transformers' BLIP cross-attention drops the encoder mask; the engine restores BLIP's masking."""
    model = make_model(tokenizer, "F/T/T").eval()
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


def test_peak_memory_is_measured_from_the_reset():
    """On Linux the CPU figure is the process's resident high-water mark since the run's reset, not since the
    process started: a large allocation freed before the reset does not count."""
    device = torch.device("cpu")
    big = np.ones(60_000_000)  # ~460 MiB, resident
    big[::512] = 2.0
    before = peak_memory(device)["peak_bytes"]
    del big
    reset_peak_memory(device)
    after = peak_memory(device)
    if after["kind"] != "process_peak_rss_of_run":
        pytest.skip("the resident peak can be reset on Linux only")
    assert after["peak_bytes"] < before - 300 * 2**20
