"""Component-wise PEFT on the tiny profile: which parameters train, what changes, save/load, generation.

Speed: the tiny random model is built once and deep-copied per test; each method is tested on every component
it can adapt at once (x/x/x), each component's output computed from the base model's upstream outputs, so a
change in a component's output is that component's own."""

from __future__ import annotations

import copy
import functools
import json
import re

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

# each method on every component that takes it; T with a frozen JTM between trained components
CASES = ["T/F/T"] + ["/".join(m if (c, m) not in REFUSED else "F" for c in COMPONENTS)
                     for m in METHODS if m not in ("F", "T")]
MIXED = ["lora/ia3/T", "dora/vera/ln", "oft/adalora/lokr", "loha/ptv2/prefix"]  # every method, with generate
# what each method adds to the component (peft's parameter names; the prefix encoder is ours)
MARKERS = {"lora": ".lora_", "dora": ".lora_", "adalora": ".lora_", "ia3": ".ia3_l.", "vera": ".vera_lambda_",
           "loha": ".hada_", "lokr": ".lokr_", "oft": ".oft_", "ln": ".ln_tuning_layers.",
           "prefix": ".prefix_encoder.", "ptv2": ".prefix_encoder."}


@functools.cache
def _base() -> nn.Module:
    """The tiny random model with a working ViT: BLIP's vision config initialises with std 1e-10, which leaves
    a random ViT's output (almost) constant and its gradients ~1e-25; we use std 0.02, as the text stacks."""
    model = build_model("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if "norm" not in name and not name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _model() -> nn.Module:
    """A fresh copy of the base model (deep copy: patched forwards are rebound to the copy)."""
    return copy.deepcopy(_base())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread. With two on a loaded CPU, OpenMP's waiting threads made these tests
    10-30x slower (measured: one method's test 38 s wall with two threads, 1.3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _run(model: nn.Module, b: dict[str, torch.Tensor], upstream: dict[str, torch.Tensor] | None = None
         ) -> dict[str, torch.Tensor]:
    """Each component's output and the loss, calling the components separately as the training engine does;
    ``upstream`` (another run's outputs) feeds the JTM and the decoder instead of this model's own."""
    image = model.vision_model(pixel_values=b["pixel_values"]).last_hidden_state
    image_in = image if upstream is None else upstream["vit"]
    question = model.text_encoder(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"],
        encoder_hidden_states=image_in, encoder_attention_mask=torch.ones(image_in.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    out = model.text_decoder(
        input_ids=b["decoder_input_ids"], attention_mask=b["decoder_attention_mask"], labels=b["labels"],
        encoder_hidden_states=question if upstream is None else upstream["jtm"],
        encoder_attention_mask=b["attention_mask"],
    )
    return {"vit": image, "jtm": question, "dec": out.logits, "loss": out.loss}


@pytest.fixture(scope="module")
def base_out(batch) -> dict[str, torch.Tensor]:
    """The base model's outputs: the reference every adapted model is compared with."""
    with torch.no_grad():
        return _run(_base(), batch)


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
                            "oft", "ln"}
    defaults = AdapterSpec()
    settings = (defaults.rank, defaults.lora_alpha, defaults.lora_dropout, defaults.num_virtual_tokens)
    assert settings == (4, 32, 0.1, 10)
    noop = AdapterSpec.parse("F/ptv2/prefix", jtm_prefix_noop=True)  # part of the identity only when set
    assert noop.to_dict()["jtm_prefix_noop"] is True and AdapterSpec.from_dict(noop.to_dict()) == noop
    assert "jtm_prefix_noop" not in AdapterSpec.parse("F/ptv2/prefix").to_dict()


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
        ("F/lora/prefix", {"jtm_prefix_noop": True}, "jtm_prefix_noop: expected False, or True when jtm is prefix"),
        ("F/prefix/F", {"jtm_prefix_noop": 1}, "jtm_prefix_noop"),
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


@pytest.mark.parametrize("text", CASES)
def test_method_trains_only_its_parameters_changes_its_components_and_reloads(text, batch, base_out, tmp_path):
    spec = AdapterSpec.parse(text, total_step=4)
    model = apply_spec(_model(), spec, seed=1).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for comp, method in spec.methods.items():
        inside = {n for n, _ in model.named_parameters() if n.startswith(COMPONENTS[comp] + ".")}
        expected |= inside if method == "T" else {n for n in inside if method != "F" and MARKERS[method] in n}
    assert expected and trainable == expected
    with torch.no_grad():
        start = _run(model, batch, base_out)
    # peft methods start at the base model (zero/identity init; OFT's rotation up to rounding); prefixes act
    for comp, method in spec.methods.items():
        same = torch.allclose(start[comp], base_out[comp], atol=1e-3)
        assert same == (method not in ("prefix", "ptv2")), comp

    state = {n: t.clone() for n, t in model.state_dict().items()}
    _train_steps(model, batch)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(state[n], t)}
    # state_dict names tied tensors twice (decoder embeddings = LM head); map them back to parameter names
    aliases = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    assert changed - aliases == trainable  # every trainable tensor moved, nothing frozen did (nor buffers)
    with torch.no_grad():
        after = _run(model, batch, base_out)  # each component on the base's upstream outputs: its own change
    for comp, method in spec.methods.items():  # a frozen one is untouched (ViT IA3 moves by ~1e-5: exact test)
        assert torch.equal(after[comp], base_out[comp]) == (method == "F"), comp

    save_adapters(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.split(".", 1)[0] for k in saved} == {c for c, m in spec.methods.items() if m != "F"}
    assert sum(t.numel() for t in saved.values()) == count_parameters(model)["trainable"]
    assert json.loads((tmp_path / "adapter_spec.json").read_text()) == spec.to_dict()
    fresh = load_adapters(_model(), None, tmp_path).eval()  # spec read from the folder
    with torch.no_grad():
        again = _run(fresh, batch, base_out)
    assert all(torch.equal(again[c], after[c]) for c in COMPONENTS)


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
    for method in ("vera", "oft"):  # peft's VeRA has no Conv2d layer, its OFT one is broken: the ViT's Linears
        model = apply_spec(_model(), f"{method}/F/F")
        assert {n.rsplit(".", 1)[1] for n, m in model.named_modules() if hasattr(m, "base_layer")} == set(
            LORA_TARGETS["vit"]) - {"patch_embedding"}


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
    save_adapters(model, tmp_path)
    fresh = load_adapters(_model(), None, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_run(fresh, batch)["dec"], expected)


def test_load_rejects_mismatches(tmp_path):
    spec = AdapterSpec.parse("F/lora/lora")
    save_adapters(apply_spec(_model(), spec), tmp_path)
    with pytest.raises(ValueError, match="saved for"):
        load_adapters(_model(), AdapterSpec.parse("F/lora/lora", rank=8), tmp_path)
    with pytest.raises(ValueError, match=r"saved for .*model carries .*'ia3'"):
        load_adapters(apply_spec(_model(), "F/ia3/ia3"), None, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    save_file({**state, "dec.bogus.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not match.*\n.*unexpected keys.*\n.*bogus"):
        load_adapters(_model(), spec, tmp_path)
    save_file({k: v for k, v in state.items() if not k.startswith("jtm.")}, path)
    with pytest.raises(ValueError, match=r"missing keys, in the model but not in the checkpoint \(16\)"):
        load_adapters(_model(), spec, tmp_path)
    first = next(iter(state))
    save_file({**state, first: state[first][:1]}, path)
    with pytest.raises(ValueError, match=rf"shape mismatches.*\n    {re.escape(first)}: \(1, "):
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


@pytest.mark.parametrize("text", ["F/prefix/ptv2", "F/ptv2/prefix"])
def test_jtm_prefix_noop_reproduces_the_reference(text, batch, base_out, tmp_path):
    """The reference's defect on demand: the same prefix parameters (same initialisation), counted and saved,
    but the JTM runs as without them and its prefix gets no gradient; the decoder's prefix acts as usual."""
    real = apply_spec(_model(), text, seed=1).eval()
    noop = apply_spec(_model(), AdapterSpec.parse(text, jtm_prefix_noop=True), seed=1).eval()
    real_state, noop_state = real.state_dict(), noop.state_dict()
    assert list(real_state) == list(noop_state) and all(torch.equal(real_state[k], noop_state[k]) for k in real_state)
    assert count_parameters(noop)["trainable"] == count_parameters(real)["trainable"]
    with torch.no_grad():
        real_out, noop_out = _run(real, batch, base_out), _run(noop, batch, base_out)
    assert torch.equal(noop_out["jtm"], base_out["jtm"]) and not torch.allclose(real_out["jtm"], base_out["jtm"])
    assert torch.equal(noop_out["dec"], real_out["dec"])  # the same decoder prefix, on the same question states
    jtm_prefix = {n: p.clone() for n, p in noop.text_encoder.prefix_encoder.named_parameters()}
    dec_prefix = {n: p.clone() for n, p in noop.text_decoder.prefix_encoder.named_parameters()}
    _train_steps(noop, batch)
    assert all(torch.equal(p, jtm_prefix[n]) for n, p in noop.text_encoder.prefix_encoder.named_parameters())
    assert not any(torch.equal(p, dec_prefix[n]) for n, p in noop.text_decoder.prefix_encoder.named_parameters())
    save_adapters(noop, tmp_path)
    fresh = load_adapters(_model(), None, tmp_path).eval()
    assert fresh.mile_adapter_spec.jtm_prefix_noop
    with torch.no_grad():
        assert torch.equal(_run(fresh, batch)["jtm"], base_out["jtm"])


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
    with pytest.raises(ValueError, match="call apply_spec first"):  # a plain model: no spec to describe it by
        count_parameters(_model())


def test_parameter_report_meta_and_tiny():
    report = parameter_report("F/lora/lora", profile="tiny")
    assert report["spec"] == "F/lora/lora" and report["trainable"] > 0
    paper = parameter_report(AdapterSpec.parse("T/T/T"), profile="paper")
    assert paper["total"] == 361_478_972
    assert {k: v["total"] for k, v in paper["components"].items()} == {
        "vit": 86_339_328, "jtm": 137_258_496, "dec": 137_881_148}
    for method in set(METHODS) - {"F", "T"}:  # the spec's rank sizes the RANKED methods, and only them
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
