"""Component-wise PEFT on the tiny profile: which parameters train, what changes, save/load, generation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mile_utils.adapters import (
    LORA_TARGETS,
    METHODS,
    RANKED,
    REFUSED,
    AdapterSpec,
    adapter_step,
    apply_spec,
    count_parameters,
    load_adapters,
    parameter_report,
    save_adapters,
)
from mile_utils.model import COMPONENTS, build_model, build_tokenizer

CASES = [(c, m) for c in COMPONENTS for m in METHODS if m not in ("F", "qlora") and (c, m) not in REFUSED]
MIXED = ["T/T/lora", "lora/lora/lora", "F/prefix/prefix", "T/ia3/ia3", "dora/vera/ln", "oft/adalora/lokr",
         "loha/ptv2/dora"]
# what each method adds to the component (peft's parameter names; the prefix encoder is ours)
MARKERS = {"lora": ".lora_", "dora": ".lora_", "adalora": ".lora_", "ia3": ".ia3_l.", "vera": ".vera_lambda_",
           "loha": ".hada_", "lokr": ".lokr_", "oft": ".oft_", "ln": ".ln_tuning_layers.",
           "prefix": ".prefix_encoder.", "ptv2": ".prefix_encoder."}


def _model() -> nn.Module:
    """The tiny random model with a working ViT: BLIP's vision config initialises with std 1e-10, which leaves
    a random ViT's output (almost) constant and its gradients ~1e-25; we use std 0.02, as the text stacks."""
    model = build_model("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if "norm" not in name and not name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def _spec(comp: str, method: str, **options) -> AdapterSpec:
    return AdapterSpec(**{**dict.fromkeys(COMPONENTS, "F"), comp: method}, **options)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    questions = ["is the lung abnormal?", "what organ is shown in this image?"]  # different lengths: padding
    q = tokenizer(questions, padding=True, return_tensors="pt")
    a = tokenizer(["yes", "the left kidney"], padding=True, return_tensors="pt")
    a_ids = a.input_ids.clone()
    a_ids[:, 0] = tokenizer.bos_token_id  # [DEC] answer [SEP], as BLIP
    return {
        "input_ids": q.input_ids,
        "attention_mask": q.attention_mask,
        "pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        "decoder_input_ids": a_ids,
        "decoder_attention_mask": a.attention_mask,
        "labels": a_ids.masked_fill(a.attention_mask == 0, -100),
    }


def _run(model: nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each component's output and the loss, calling the components separately as the training engine does."""
    image = model.vision_model(pixel_values=b["pixel_values"]).last_hidden_state
    question = model.text_encoder(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"],
        encoder_hidden_states=image, encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    out = model.text_decoder(
        input_ids=b["decoder_input_ids"], attention_mask=b["decoder_attention_mask"],
        encoder_hidden_states=question, encoder_attention_mask=b["attention_mask"], labels=b["labels"],
    )
    return {"vit": image, "jtm": question, "dec": out.logits, "loss": out.loss}


def _train_steps(model: nn.Module, b: dict[str, torch.Tensor], steps: int = 2) -> None:
    """AdamW steps without weight decay, so only gradients move weights."""
    # two steps: LoRA's A (LoHa's, LoKr's, AdaLoRA's factors) gets no gradient while its partner is still zero
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        optimizer.zero_grad()
        _run(model, b)["loss"].backward()
        optimizer.step()
        adapter_step(model, step)
    model.eval()


# --- spec ---------------------------------------------------------------------------------------------------


def test_spec_parse_str_and_dict():
    spec = AdapterSpec.parse("f/LoRA/PTV2", rank=8)
    assert (spec.vit, spec.jtm, spec.dec, spec.rank) == ("F", "lora", "ptv2", 8)
    assert str(spec) == "F/lora/ptv2"
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    assert "total_step" not in spec.to_dict()  # only AdaLoRA specs carry it (run identities stay as they were)
    ada = AdapterSpec.parse("F/adalora/T", total_step=50)
    assert AdapterSpec.from_dict(ada.to_dict()) == ada and ada.to_dict()["total_step"] == 50
    spec = AdapterSpec(vit="IA3", jtm="Prefix", dec="DoRA")
    assert spec.methods == {"vit": "ia3", "jtm": "prefix", "dec": "dora"}
    assert set(METHODS) == {"F", "T", "lora", "ia3", "prefix", "ptv2", "dora", "vera", "loha", "lokr", "adalora",
                            "oft", "ln", "qlora"}
    defaults = AdapterSpec()
    settings = (defaults.rank, defaults.lora_alpha, defaults.lora_dropout, defaults.num_virtual_tokens)
    assert settings == (4, 32, 0.1, 10)


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        ("F/lora", {}, "three methods"),
        ("F/lora/lora/T", {}, "three methods"),
        ("F//lora", {}, "three methods"),
        ("F/adapter/lora", {}, "jtm: unknown method 'adapter'"),
        ("prefix/F/F", {}, "vit: prefix is not supported: the ViT has no token prompt"),
        ("ptv2/T/T", {}, "vit: ptv2 is not supported"),
        ("F/lora/lora", {"rank": 0}, "rank"),
        ("F/lora/lora", {"lora_dropout": 1.5}, "lora_dropout"),
        ("F/prefix/prefix", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ("F/adalora/F", {"total_step": 0}, "total_step"),
    ],
)
def test_bad_specs_fail_clearly(text, options, match):
    with pytest.raises(ValueError, match=match):
        AdapterSpec.parse(text, **options)


def test_bad_spec_dict_fails_clearly():
    with pytest.raises(ValueError, match="expected a dict with some of"):
        AdapterSpec.from_dict({"vit": "F", "jtm": "T", "dec": "T", "rnk": 4})
    with pytest.raises(ValueError, match="expected a string"):
        AdapterSpec.parse(None)  # type: ignore[arg-type]


# --- each method on each component: what trains, what changes, save/load -------------------------------------


@pytest.mark.parametrize(("comp", "method"), CASES)
def test_method_trains_only_its_parameters_changes_its_component_and_reloads(comp, method, batch, tmp_path):
    base = _model().eval()
    model = apply_spec(_model(), _spec(comp, method, total_step=4), seed=1).eval()
    attr = COMPONENTS[comp]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    inside = {n for n, _ in model.named_parameters() if n.startswith(attr + ".")}
    expected = inside if method == "T" else {n for n in inside if MARKERS[method] in n}
    assert expected and trainable == expected
    with torch.no_grad():
        before = _run(base, batch)
        start = _run(model, batch)
    # peft methods start at the base model (zero/identity init; OFT's rotation up to rounding); prefixes act
    assert torch.allclose(start["dec"], before["dec"], atol=1e-3) == (method not in ("prefix", "ptv2"))

    state = {n: t.clone() for n, t in model.state_dict().items()}
    _train_steps(model, batch)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(state[n], t)}
    # state_dict names tied tensors twice (decoder embeddings = LM head); map them back to parameter names
    aliases = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    assert changed - aliases == trainable  # every trainable tensor moved, nothing frozen did (nor buffers)
    with torch.no_grad():
        after = _run(model, batch)
    upstream = list(COMPONENTS)[: list(COMPONENTS).index(comp)]
    assert all(torch.equal(after[c], before[c]) for c in upstream)  # components before it are untouched
    assert not torch.equal(after[comp], before[comp])  # its own output moved (ViT IA3's by ~1e-5: exact test)

    save_adapters(model, None, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.startswith(comp + ".") for k in saved)
    assert sum(t.numel() for t in saved.values()) == count_parameters(model)["trainable"]
    assert json.loads((tmp_path / "adapter_spec.json").read_text())[comp] == method
    fresh = load_adapters(_model(), None, tmp_path).eval()  # spec read from the folder
    with torch.no_grad():
        assert torch.equal(_run(fresh, batch)["dec"], after["dec"])


def test_lora_and_ia3_targets():
    model = apply_spec(_model(), "lora/lora/ia3", seed=1)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "base_layer")}
    vit = {n for n in adapted if n.startswith("vision_model.")}
    linear = {n for n, m in _model().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert vit == {n for n in linear if n.startswith("vision_model.")}  # every Linear and the patch conv
    layers = model.config.text_config.num_hidden_layers
    jtm = {n.split(".layer.")[1].split(".", 1)[1] for n in adapted if n.startswith("text_encoder.")}
    assert jtm == {f"{a}.self.{p}" for a in ("attention", "crossattention") for p in ("query", "value")}
    dec = {n: m for n, m in model.named_modules() if n in adapted and n.startswith("text_decoder.")}
    assert {n.split(".layer.")[1].split(".", 1)[1] for n in dec} == {
        f"{a}.self.{p}" for a in ("attention", "crossattention") for p in ("key", "value")} | {
        "attention.output.dense", "crossattention.output.dense", "output.dense"}
    feedforward = [n for n, m in dec.items() if m.is_feedforward]
    assert all(n.endswith("output.dense") for n in feedforward) and len(feedforward) == 3 * layers
    vera = apply_spec(_model(), "vera/F/F")  # peft's VeRA has no Conv2d layer: the ViT's Linears only
    assert {n.rsplit(".", 1)[1] for n, m in vera.named_modules() if hasattr(m, "base_layer")} == set(
        LORA_TARGETS["vit"]) - {"patch_embedding"}


def test_qlora_fails_cleanly_without_cuda_or_bitsandbytes():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: qlora can run here")
    with pytest.raises(RuntimeError, match="qlora needs (bitsandbytes|a CUDA GPU)"):
        apply_spec(_model(), "F/F/qlora")


def test_adalora_budget_is_allocated_and_saved(batch, tmp_path):
    """peft's rank allocator runs through adapter_step: after total_step, pruned ranks are zeros, and the saved
    full-rank tensors reload to the same outputs."""
    model = apply_spec(_model(), AdapterSpec.parse("F/F/adalora", total_step=3), seed=1)
    _train_steps(model, batch, steps=4)
    config = model.text_decoder.peft_config["default"]
    assert config.rank_pattern  # the allocator ran and pruned
    pruned = sum(int((~torch.tensor(mask)).sum()) for mask in config.rank_pattern.values())
    assert pruned > 0
    with torch.no_grad():
        expected = _run(model, batch)["dec"]
    save_adapters(model, None, tmp_path)
    fresh = load_adapters(_model(), None, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_run(fresh, batch)["dec"], expected)


def test_load_rejects_mismatches(tmp_path):
    spec = AdapterSpec.parse("F/lora/lora")
    save_adapters(apply_spec(_model(), spec), spec, tmp_path)
    with pytest.raises(ValueError, match="saved for"):
        load_adapters(_model(), AdapterSpec.parse("F/lora/lora", rank=8), tmp_path)
    with pytest.raises(ValueError, match=r"saved for .*model carries .*'ia3'"):
        load_adapters(apply_spec(_model(), "F/ia3/ia3"), None, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    save_file({**state, "dec.bogus.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: dec \(lora\) expects 16 tensors.*bogus"):
        load_adapters(_model(), spec, tmp_path)
    save_file({k: v for k, v in state.items() if not k.startswith("jtm.")}, path)
    with pytest.raises(ValueError, match=r"jtm \(lora\) expects 16 tensors, the file has 0"):
        load_adapters(_model(), spec, tmp_path)
    save_file({**state, "vit.x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="33 tensors, of which 32 belong"):
        load_adapters(_model(), spec, tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapters(_model(), spec, tmp_path)


# --- mixed specs, generation, prefix on the JTM -------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED)
def test_mixed_specs_forward_loss_generate(text, batch, tokenizer):
    model = apply_spec(_model(), text, seed=1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], labels=batch["decoder_input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    tokens = model.generate(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                            num_beams=3, max_length=10, min_length=1)
    assert tokens.shape[0] == 2 and 2 <= tokens.shape[1] <= 10
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()


@pytest.mark.parametrize("method", ["prefix", "ptv2"])
def test_prefix_acts_on_the_jtm(method, batch):
    base = _model().eval()
    model = apply_spec(_model(), AdapterSpec(vit="F", jtm=method, dec="F"), seed=1).eval()
    with torch.no_grad():
        plain, prefixed = _run(base, batch), _run(model, batch)
    # the reference's prefix on the encoder was a no-op: here the JTM output (and so the answer) changes
    assert not torch.allclose(prefixed["jtm"], plain["jtm"])
    assert not torch.allclose(prefixed["dec"], plain["dec"])
    model.train()
    _run(model, batch)["loss"].backward()
    grads = [p.grad for p in model.text_encoder.prefix_encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("text", ["F/prefix/prefix", "F/ptv2/ptv2"])
def test_prefix_generation_same_with_and_without_cache(text, batch):
    model = apply_spec(_model(), text, seed=1).eval()
    kwargs = dict(attention_mask=batch["attention_mask"], num_beams=3, max_length=10, min_length=1)
    cached = model.generate(batch["input_ids"], batch["pixel_values"], use_cache=True, **kwargs)
    uncached = model.generate(batch["input_ids"], batch["pixel_values"], use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_prefix_is_batch_and_padding_agnostic(batch):
    """Each sample alone, without padding, gives its outputs inside the padded batch: the prefix columns of
    the mask are visible, the padding stays hidden, and the prefix follows the batch size."""
    model = apply_spec(_model(), "F/prefix/prefix", seed=1).eval()
    with torch.no_grad():
        full = _run(model, batch)
        for i in range(2):
            single = {k: v[i : i + 1] for k, v in batch.items()}
            q_len = int(batch["attention_mask"][i].sum())
            unpadded_q = {**single, "input_ids": single["input_ids"][:, :q_len],
                          "attention_mask": single["attention_mask"][:, :q_len]}
            assert torch.allclose(_run(model, unpadded_q)["jtm"][0], full["jtm"][i, :q_len], atol=1e-5)
            # the decoder keeps the padded question: transformers 5.x BLIP cross-attention ignores the
            # question padding mask (a base-model behaviour, not the prefix's); only the answer is unpadded
            a_len = int(batch["decoder_attention_mask"][i].sum())
            unpadded_a = {**single, **{k: single[k][:, :a_len]
                                       for k in ("decoder_input_ids", "decoder_attention_mask", "labels")}}
            assert torch.allclose(_run(model, unpadded_a)["dec"][0], full["dec"][i, :a_len], atol=1e-5)


# --- counting and misc --------------------------------------------------------------------------------------


def test_count_parameters_tied_once_and_components_sum():
    model = apply_spec(_model(), "T/T/T")
    counts = count_parameters(model)
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert counts["trainable"] == counts["total"] == unique and counts["percent"] == 100.0
    assert sum(c["total"] for c in counts["components"].values()) == counts["total"]
    embeddings = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert model.text_decoder.cls.predictions.decoder.weight is embeddings  # tied, counted once above

    counts = count_parameters(apply_spec(_model(), "F/lora/ln"))
    comps = counts["components"]
    assert counts["trainable"] == comps["jtm"]["adapter"] + comps["dec"]["adapter"] > 0
    assert counts["total"] == unique + counts["trainable"]
    assert (comps["jtm"]["method"], comps["vit"]["adapter"]) == ("lora", 0)
    plain = count_parameters(_model())  # a plain model: everything trains
    assert plain["components"]["vit"]["method"] == "T"


def test_parameter_report_meta_and_tiny():
    report = parameter_report("F/lora/lora", profile="tiny")
    assert report["spec"] == "F/lora/lora" and report["trainable"] > 0
    paper = parameter_report(AdapterSpec.parse("T/T/T"), profile="paper")
    assert paper["total"] == 361_478_972
    assert {k: v["total"] for k, v in paper["components"].items()} == {
        "vit": 86_339_328, "jtm": 137_258_496, "dec": 137_881_148}
    for method in set(METHODS) - {"F", "T", "qlora"}:  # the spec's rank sizes the RANKED methods, and only them
        counts = [parameter_report(AdapterSpec.parse(f"F/F/{method}", rank=r), "tiny")["trainable"] for r in (4, 8)]
        # (AdaLoRA's rank is its target budget: it starts at init_r 12 whatever the rank)
        assert (counts[0] != counts[1]) == (method in RANKED and method != "adalora"), method
    # meta-device counts equal a real model's, for the newer methods too
    for text in ("dora/vera/loha", "lokr/adalora/oft", "ln/ln/ln"):
        real = count_parameters(apply_spec(_model(), text))
        assert {k: real[k] for k in ("trainable", "total")} == {
            k: parameter_report(text, profile="tiny")[k] for k in ("trainable", "total")}


def test_apply_twice_and_seed():
    model = apply_spec(_model(), "F/lora/lora", seed=3)
    with pytest.raises(ValueError, match="already carries"):
        apply_spec(model, "F/F/F")
    again = apply_spec(_model(), "F/lora/lora", seed=3)
    first, second = model.state_dict(), again.state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[n], second[n]) for n in first)
