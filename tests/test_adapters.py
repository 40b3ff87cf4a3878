"""Component-wise PEFT on the tiny profile: which parameters train, what changes, save/load, generation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig
from peft.tuners.prefix_tuning import PrefixEncoder
from safetensors.torch import load_file, save_file
from torch import nn

from mile_utils.adapters import (
    ALLOWED,
    COMPONENTS,
    METHODS,
    PREFIX_ATTR,
    AdapterSpec,
    _prefix_key_values,
    apply_spec,
    count_parameters,
    load_adapters,
    model_spec,
    parameter_report,
    save_adapters,
    trainable_state_dict,
)
from mile_utils.model import build_model, build_tokenizer

CASES = [(comp, method) for comp in COMPONENTS for method in ALLOWED[comp] if method != "F"]
MIXED = ["T/T/lora", "F/lora/lora", "lora/lora/lora", "F/prefix/prefix", "F/ptv2/ptv2", "T/ia3/ia3"]


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


def _spec(comp: str, method: str) -> AdapterSpec:
    methods = dict.fromkeys(COMPONENTS, "F")
    methods[comp] = method
    return AdapterSpec(**methods)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    questions = ["is the lung abnormal?", "what organ is shown in this image?"]  # different lengths: padding
    answers = ["yes", "the left kidney"]
    q = tokenizer(questions, padding=True, return_tensors="pt")
    a = tokenizer(answers, padding=True, return_tensors="pt")
    a_ids = a.input_ids.clone()
    a_ids[:, 0] = tokenizer.bos_token_id  # [DEC] answer [SEP], as BLIP
    labels = a_ids.masked_fill(a.attention_mask == 0, -100)
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": q.input_ids,
        "attention_mask": q.attention_mask,
        "pixel_values": torch.randn(2, 3, 64, 64, generator=generator),
        "decoder_input_ids": a_ids,
        "decoder_attention_mask": a.attention_mask,
        "labels": labels,
    }


def _run(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(JTM output, decoder logits, loss), calling the components separately as the training engine does."""
    image = model.vision_model(pixel_values=b["pixel_values"]).last_hidden_state
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long)
    question = model.text_encoder(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"],
        encoder_hidden_states=image, encoder_attention_mask=image_mask,
    ).last_hidden_state
    out = model.text_decoder(
        input_ids=b["decoder_input_ids"], attention_mask=b["decoder_attention_mask"],
        encoder_hidden_states=question, encoder_attention_mask=b["attention_mask"], labels=b["labels"],
    )
    return question, out.logits, out.loss


def _train_steps(model: nn.Module, b: dict[str, torch.Tensor], steps: int = 2) -> None:
    """AdamW steps without weight decay, so only gradients move weights."""
    # two steps: LoRA's A gets no gradient while B is still zero, so one step would only move B
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        _run(model, b)[2].backward()
        optimizer.step()
    model.eval()


def _expected_trainable(model: nn.Module, comp: str, method: str) -> set[str]:
    attr = COMPONENTS[comp]
    names = [n for n, _ in model.named_parameters() if n.startswith(attr + ".")]
    if method == "T":
        return set(names)
    prefix = f".{PREFIX_ATTR}."
    marker = {"lora": ".lora_", "ia3": ".ia3_l.", "prefix": prefix, "ptv2": prefix}[method]
    return {n for n in names if marker in n}


# --- spec ---------------------------------------------------------------------------------------------------


def test_spec_parse_str_and_dict():
    spec = AdapterSpec.parse("f/LoRA/PTV2", rank=8)
    assert (spec.vit, spec.jtm, spec.dec, spec.rank) == ("F", "lora", "ptv2", 8)
    assert str(spec) == "F/lora/ptv2"
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    spec = AdapterSpec(vit="IA3", jtm="Prefix", dec="t")
    assert spec.methods == {"vit": "ia3", "jtm": "prefix", "dec": "T"}
    assert set(METHODS) == {"F", "T", "lora", "ia3", "prefix", "ptv2"}
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
        ("prefix/F/F", {}, "vit: prefix is not supported"),
        ("ptv2/T/T", {}, "vit: ptv2 is not supported"),
        ("F/lora/lora", {"rank": 0}, "rank"),
        ("F/lora/lora", {"lora_dropout": 1.5}, "lora_dropout"),
        ("F/prefix/prefix", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ],
)
def test_bad_specs_fail_clearly(text, options, match):
    with pytest.raises(ValueError, match=match):
        AdapterSpec.parse(text, **options)


def test_bad_spec_dict_fails_clearly():
    with pytest.raises(ValueError, match="unknown field"):
        AdapterSpec.from_dict({"vit": "F", "jtm": "T", "dec": "T", "rnk": 4})
    with pytest.raises(ValueError, match="expected a string"):
        AdapterSpec.parse(None)  # type: ignore[arg-type]


# --- which parameters train ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("comp", "method"), CASES + [("vit", "F")])
def test_exactly_intended_parameters_require_grad(comp, method):
    base = _model()
    adaptable = {n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    model = apply_spec(_model(), _spec(comp, method), seed=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = _expected_trainable(model, comp, method) if method != "F" else set()
    assert trainable == expected
    assert set(trainable_state_dict(model)) == expected
    assert method == "F" or expected

    attr = COMPONENTS[comp]
    adapted = {n for n, m in model.named_modules() if hasattr(m, "base_layer") and n.startswith(attr + ".")}
    if method == "lora" and comp == "vit":
        # every Linear and the patch-embedding conv of the ViT
        assert adapted == {n for n in adaptable if n.startswith(attr + ".")}
        assert f"{attr}.embeddings.patch_embedding" in adapted
    elif method == "lora":
        suffixes = {n.split(".layer.")[1].split(".", 1)[1] for n in adapted}
        assert suffixes == {"attention.self.query", "attention.self.value",
                            "crossattention.self.query", "crossattention.self.value"}
        assert len(adapted) == 4 * model.config.text_config.num_hidden_layers
    elif method == "ia3":
        modules = dict(model.named_modules())
        feedforward = {n for n in adapted if modules[n].is_feedforward}
        if comp == "vit":
            assert {n.rsplit(".", 1)[1] for n in adapted} == {"qkv", "projection"}
            assert {n.rsplit(".", 1)[1] for n in feedforward} == {"projection"}
        else:
            suffixes = {n.split(".layer.")[1].split(".", 1)[1] for n in adapted}
            assert suffixes == {"attention.self.key", "attention.self.value", "crossattention.self.key",
                                "crossattention.self.value", "attention.output.dense",
                                "crossattention.output.dense", "output.dense"}
            assert all(n.endswith("output.dense") for n in feedforward)
            assert len(feedforward) == 3 * model.config.text_config.num_hidden_layers
    elif method in ("prefix", "ptv2"):
        assert not adapted
        patched = {n for n, m in model.named_modules() if "forward" in vars(m)}
        layers = model.config.text_config.num_hidden_layers
        assert len(patched) == layers
        assert all(n.startswith(attr + ".") and n.endswith(".attention.self") for n in patched)
        encoder = getattr(getattr(model, attr), PREFIX_ATTR)
        assert hasattr(encoder, "transform") == (method == "prefix")


@pytest.mark.parametrize(("comp", "method"), CASES)
def test_training_changes_only_trainable_and_output(comp, method, batch):
    base = _model().eval()
    model = apply_spec(_model(), _spec(comp, method), seed=1).eval()
    with torch.no_grad():
        base_logits = _run(base, batch)[1]
        start_logits = _run(model, batch)[1]
    # LoRA (B = 0), IA3 (vectors = 1), F and T start exactly at the base model; prefixes act from the start
    assert torch.equal(start_logits, base_logits) == (method not in ("prefix", "ptv2"))

    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    _train_steps(model, batch)
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # state_dict names tied tensors twice (decoder embeddings = LM head); map them back to parameter names
    aliases = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    assert changed - aliases == trainable  # every trainable tensor moved, nothing frozen did (nor buffers)
    with torch.no_grad():
        # (ViT IA3's two small steps move the logits by ~1e-5 only: compare exactly)
        assert not torch.equal(_run(model, batch)[1], base_logits)


# --- save / load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("comp", "method"), CASES)
def test_save_and_load_back_identical(comp, method, batch, tmp_path):
    spec = _spec(comp, method)
    model = apply_spec(_model(), spec, seed=1)
    _train_steps(model, batch, steps=1)
    with torch.no_grad():
        expected = _run(model, batch)[1]
    save_adapters(model, spec, tmp_path)

    folder = tmp_path / comp
    if method == "T":
        assert (folder / "model.safetensors").is_file()
    else:
        config = PeftConfig.from_pretrained(str(folder))  # a peft config peft itself reads back
        assert config.peft_type.value == {"lora": "LORA", "ia3": "IA3"}.get(method, "PREFIX_TUNING")
        keys = set(load_file(folder / "adapter_model.safetensors"))
        if method in ("lora", "ia3"):  # peft's keys: module path relative to the component, no adapter name
            assert all(".default." not in k for k in keys)
            assert any(k.endswith(("lora_A.weight", "ia3_l")) for k in keys)
        else:
            assert "prompt_embeddings" in keys
    assert json.loads((tmp_path / "adapter_spec.json").read_text())["vit"] == spec.vit

    fresh = load_adapters(_model(), None, tmp_path).eval()  # spec read from the folder
    assert model_spec(fresh) == spec
    with torch.no_grad():
        assert torch.equal(_run(fresh, batch)[1], expected)


def test_prefix_loads_from_peft_format_alone(batch, tmp_path):
    spec = AdapterSpec.parse("F/prefix/prefix")
    model = apply_spec(_model(), spec, seed=1).eval()
    with torch.no_grad():
        expected = _run(model, batch)[1]
    save_adapters(model, spec, tmp_path)
    for comp in ("jtm", "dec"):  # keep only peft's `prompt_embeddings` (the projected prefix)
        path = tmp_path / comp / "adapter_model.safetensors"
        save_file({"prompt_embeddings": load_file(path)["prompt_embeddings"]}, path)
    fresh = load_adapters(_model(), spec, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(_run(fresh, batch)[1], expected, atol=1e-5)


def test_load_rejects_mismatches(tmp_path):
    spec = AdapterSpec.parse("F/lora/lora")
    save_adapters(apply_spec(_model(), spec), spec, tmp_path)
    with pytest.raises(ValueError, match="saved for"):
        load_adapters(_model(), AdapterSpec.parse("F/lora/lora", rank=8), tmp_path)
    with pytest.raises(ValueError, match="carries spec"):
        load_adapters(apply_spec(_model(), "F/ia3/ia3"), None, tmp_path)
    path = tmp_path / "jtm" / "adapter_model.safetensors"
    state = load_file(path)
    state.pop(sorted(state)[0])
    state["encoder.layer.0.bogus.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(ValueError, match="missing .*unexpected .*bogus"):
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
        jtm_base, logits_base, _ = _run(base, batch)
        jtm_prefix, logits_prefix, _ = _run(model, batch)
    # the reference's prefix on the encoder was a no-op: here the JTM output (and so the answer) changes
    assert not torch.allclose(jtm_prefix, jtm_base)
    assert not torch.allclose(logits_prefix, logits_base)
    model.train()
    _run(model, batch)[2].backward()
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
        question, logits, _ = _run(model, batch)
        for i in range(2):
            single = {k: v[i : i + 1] for k, v in batch.items()}
            q_len = int(batch["attention_mask"][i].sum())
            unpadded_q = {**single, "input_ids": single["input_ids"][:, :q_len],
                          "attention_mask": single["attention_mask"][:, :q_len]}
            assert torch.allclose(_run(model, unpadded_q)[0][0], question[i, :q_len], atol=1e-5)
            # the decoder keeps the padded question: transformers 5.x BLIP cross-attention ignores the
            # question padding mask (a base-model behaviour, not the prefix's); only the answer is unpadded
            a_len = int(batch["decoder_attention_mask"][i].sum())
            unpadded_a = {**single, **{k: single[k][:, :a_len]
                                       for k in ("decoder_input_ids", "decoder_attention_mask", "labels")}}
            assert torch.allclose(_run(model, unpadded_a)[1][0], logits[i, :a_len], atol=1e-5)


def test_prefix_layout_matches_peft():
    """Our per-layer slice equals peft's reshaping of the whole PrefixEncoder output."""
    model = apply_spec(_model(), "F/F/prefix", seed=1)
    encoder: PrefixEncoder = model.text_decoder.prefix_encoder
    cfg = model.config.text_config
    tokens = encoder.embedding.num_embeddings
    with torch.no_grad():
        flat = encoder(torch.arange(tokens).unsqueeze(0))  # peft: (batch, P, layers*2*hidden)
        peft_kv = flat.view(1, tokens, cfg.num_hidden_layers * 2, cfg.num_attention_heads, -1)
        peft_kv = peft_kv.permute([2, 0, 3, 1, 4]).split(2)
        for layer in range(cfg.num_hidden_layers):
            key, value = _prefix_key_values(encoder, layer, cfg.num_attention_heads)
            assert torch.allclose(key, peft_kv[layer][0], atol=1e-6)
            assert torch.allclose(value, peft_kv[layer][1], atol=1e-6)


# --- counting and misc --------------------------------------------------------------------------------------


def test_count_parameters_tied_once_and_components_sum():
    model = apply_spec(_model(), "T/T/T")
    counts = count_parameters(model)
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert counts["trainable"] == counts["total"] == unique and counts["percent"] == 100.0
    assert sum(c["total"] for c in counts["components"].values()) == counts["total"]
    embeddings = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert model.text_decoder.cls.predictions.decoder.weight is embeddings  # tied, counted once above

    lora = apply_spec(_model(), "F/lora/lora")
    counts = count_parameters(lora)
    comps = counts["components"]
    assert counts["trainable"] == comps["jtm"]["adapter"] + comps["dec"]["adapter"]
    assert counts["total"] == unique + counts["trainable"]
    assert counts["components"]["jtm"]["method"] == "lora"
    plain = count_parameters(_model())  # a plain model: everything trains
    assert plain["components"]["vit"]["method"] == "T"


def test_parameter_report_meta_and_tiny():
    report = parameter_report("F/lora/lora", profile="tiny")
    assert report["spec"] == "F/lora/lora" and report["trainable"] > 0
    paper = parameter_report(AdapterSpec.parse("T/T/T"), profile="paper")
    assert paper["total"] == 361_478_972
    assert {k: v["total"] for k, v in paper["components"].items()} == {
        "vit": 86_339_328, "jtm": 137_258_496, "dec": 137_881_148}


def test_apply_twice_and_seed():
    model = apply_spec(_model(), "F/lora/lora", seed=3)
    with pytest.raises(ValueError, match="already carries"):
        apply_spec(model, "F/F/F")
    again = apply_spec(_model(), "F/lora/lora", seed=3)
    first, second = trainable_state_dict(model), trainable_state_dict(again)
    assert list(first) == list(second)
    assert all(torch.equal(first[n], second[n]) for n in first)
