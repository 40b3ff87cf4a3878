"""Component-wise PEFT of MISS/BLIP VQA: one spec says, for the ViT, the JTM and the decoder, F/T/or a method.

This module is the one place that knows the component names (:data:`COMPONENTS`) and which layers each method
targets (:data:`LORA_TARGETS`, :data:`IA3_TARGETS`). The settings are those of the reference study:

* ``lora``: rank r (4 or 8), alpha 32, dropout 0.1. Text stacks: ``query`` and ``value`` of self- AND
  cross-attention (peft's default for BERT; suffix matching hits both). ViT: every Linear (``qkv``,
  ``projection``, ``fc1``, ``fc2``) plus the patch-embedding Conv2d.
* ``ia3``: text stacks: ``key``, ``value`` and ``output.dense``, with ``output.dense`` feed-forward (it hits
  ``attention.output.dense``, ``crossattention.output.dense`` and the FFN's ``output.dense``). ViT: the paper
  does not publish its modules; ``qkv`` plus ``projection`` as feed-forward (the analogue of
  ``attention.output.dense``) is our choice because it alone reproduces the paper's 0.061% for IA3/IA3/IA3
  (36,864 ViT parameters; see :data:`IA3_TARGETS` for the alternatives we checked).
* ``prefix``: 10 virtual tokens with peft's projection MLP; ``ptv2``: 10 virtual tokens without projection.
  The parameters are peft's :class:`~peft.tuners.prefix_tuning.PrefixEncoder`, but the key/value prefixes
  are injected here, into every self-attention layer of the component (see
  :func:`_prefix_self_attention_forward`), because peft only injects prefixes for a whole top-level model. In
  the reference code, prefix on the JTM built the encoder and never used it; here it really acts on the JTM.

LoRA/IA3 are injected in place with :func:`peft.inject_adapter_in_model` on each component, so the model stays
a ``BlipForQuestionAnswering`` whose ``vision_model``/``text_encoder``/``text_decoder`` can be called directly
and whose ``generate`` (beam search) works unchanged. Load base weights before :func:`apply_spec`.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, inject_adapter_in_model
from peft.tuners.prefix_tuning import PrefixEncoder
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from .profiles import Profile, get_profile

METHODS: tuple[str, ...] = ("F", "T", "lora", "ia3", "prefix", "ptv2")
COMPONENTS: dict[str, str] = {"vit": "vision_model", "jtm": "text_encoder", "dec": "text_decoder"}
PEFT_METHODS = ("lora", "ia3", "prefix", "ptv2")
# Prefix tuning of the image encoder is not part of the study (a ViT has no prompt interface for it).
ALLOWED: dict[str, tuple[str, ...]] = {
    "vit": ("F", "T", "lora", "ia3"),
    "jtm": METHODS,
    "dec": METHODS,
}

_TEXT_QV = ("query", "value")
# LoRA target module-name suffixes per component (peft suffix matching).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # every Linear of the ViT plus the patch-embedding conv, as the reference's ViT LoRA
    "vit": ("qkv", "projection", "fc1", "fc2", "patch_embedding"),
    "jtm": _TEXT_QV,
    "dec": _TEXT_QV,
}

_TEXT_IA3 = (("key", "value", "output.dense"), ("output.dense",))
# IA3 (targets, feed-forward targets) per component.
# The ViT modules are not published. ``qkv`` (scales keys and values; queries too, since BLIP fuses them) plus
# ``projection`` as feed-forward (the ViT's analogue of the text stacks' ``attention.output.dense``) adds
# 12 x (2304 + 768) = 36,864 parameters, which with the text stacks' 184,320 reproduces the paper's 0.061% for
# IA3/IA3/IA3. Other plausible choices do not: adding fc2 as feed-forward (the FFN ``output.dense`` analogue)
# gives 0.071%, qkv alone 0.059%, qkv + fc2 (feed-forward) 0.069%.
IA3_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vit": (("qkv", "projection"), ("projection",)),
    "jtm": _TEXT_IA3,
    "dec": _TEXT_IA3,
}

SPEC_ATTR = "mile_adapter_spec"  # set on the model by apply_spec: which spec it carries
PREFIX_ATTR = "prefix_encoder"  # the PrefixEncoder's attribute on the component (text_encoder / text_decoder)
_PREFIX_OWNER_ATTR = "_mile_prefix_owner"  # plain (unregistered) back-reference from a patched attention
SPEC_FILE = "adapter_spec.json"
_ADAPTER_NAME = "default"


def _normalise_method(value: object, comp: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{comp}: expected one of {', '.join(METHODS)}, got {value!r}")
    lookup = {m.lower(): m for m in METHODS}
    method = lookup.get(value.strip().lower())
    if method is None:
        raise ValueError(f"{comp}: unknown method {value!r}; expected one of {', '.join(METHODS)} (any case)")
    if method not in ALLOWED[comp]:
        raise ValueError(
            f"{comp}: {method} is not supported on the ViT (the study applies prefix/P-tuning v2 to the text "
            f"stacks only); use one of {', '.join(ALLOWED[comp])}"
        )
    return method


@dataclass(frozen=True)
class AdapterSpec:
    """Which method each component gets, plus the PEFT hyper-parameters (the reference study's defaults)."""

    vit: str = "F"
    jtm: str = "T"
    dec: str = "T"
    rank: int = 4
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    num_virtual_tokens: int = 10

    def __post_init__(self) -> None:
        for comp in COMPONENTS:
            # frozen dataclass: normalise "LoRA"/"PTV2"/"f" to the canonical spelling
            object.__setattr__(self, comp, _normalise_method(getattr(self, comp), comp))
        checks = (
            ("rank", isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
             "a positive integer"),
            ("lora_alpha", isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
             "a positive number"),
            ("lora_dropout", isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
             "a number in [0, 1)"),
            ("num_virtual_tokens",
             isinstance(self.num_virtual_tokens, int) and not isinstance(self.num_virtual_tokens, bool)
             and self.num_virtual_tokens >= 1, "a positive integer"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"AdapterSpec.{name}: expected {expected}, got {getattr(self, name)!r}")

    @classmethod
    def parse(cls, text: str, **options: Any) -> AdapterSpec:
        """``"F/lora/lora"`` (vit/jtm/dec, any case) -> spec; ``options`` set rank etc."""
        if not isinstance(text, str):
            raise ValueError(f"spec: expected a string like 'F/lora/lora', got {text!r}")
        parts = [p.strip() for p in text.split("/")]
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"spec {text!r}: expected three methods vit/jtm/dec separated by '/', e.g. 'F/lora/lora' "
                f"(methods: {', '.join(METHODS)})"
            )
        return cls(*parts, **options)

    def __str__(self) -> str:
        return f"{self.vit}/{self.jtm}/{self.dec}"

    def method(self, comp: str) -> str:
        if comp not in COMPONENTS:
            raise ValueError(f"unknown component {comp!r}: expected one of {', '.join(COMPONENTS)}")
        return getattr(self, comp)

    @property
    def methods(self) -> dict[str, str]:
        return {comp: getattr(self, comp) for comp in COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        if not isinstance(data, dict):
            raise ValueError(f"AdapterSpec.from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"AdapterSpec.from_dict: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**data)


def as_spec(spec: AdapterSpec | str) -> AdapterSpec:
    """A spec from an :class:`AdapterSpec` or its string form."""
    return spec if isinstance(spec, AdapterSpec) else AdapterSpec.parse(spec)


# --- model --------------------------------------------------------------------------------------------------


def _component(model: nn.Module, comp: str) -> nn.Module:
    return getattr(model, COMPONENTS[comp])


def _text_model(component: nn.Module) -> nn.Module:
    """The BERT stack of a text component: the JTM is a BlipTextModel, the decoder wraps one as ``bert``."""
    return getattr(component, "bert", component)


def _self_attentions(component: nn.Module) -> list[nn.Module]:
    """Each layer's self-attention (``layer.attention.self``, never the cross-attention), in layer order."""
    return [layer.attention.self for layer in _text_model(component).encoder.layer]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _lora_config(spec: AdapterSpec, comp: str) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(LORA_TARGETS[comp]),
        bias="none",
    )


def _ia3_config(comp: str) -> IA3Config:
    targets, feedforward = IA3_TARGETS[comp]
    return IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward))


def _prefix_config(spec: AdapterSpec, component: nn.Module, method: str) -> PrefixTuningConfig:
    cfg = _text_model(component).config
    return PrefixTuningConfig(
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=method == "prefix",
        token_dim=cfg.hidden_size,
        encoder_hidden_size=cfg.hidden_size,  # peft's default when wrapping a model: the projection is square
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_transformer_submodules=1,
    )


def _prefix_key_values(
    encoder: PrefixEncoder, layer: int, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s prefix keys and values, each (1, heads, P, head_dim), in peft's layout.

    peft views the encoder output (P, layers*2*hidden) as (P, layers*2, heads, head_dim) and takes slot 2i as
    layer i's keys and 2i+1 as its values; we compute only that slice of the last projection (cheaper, and no
    per-forward state to keep).
    """
    weight = encoder.embedding.weight  # = embedding(arange(P)): the virtual tokens
    n_tokens = weight.shape[0]
    hidden = encoder.mile_hidden_size
    lo, hi = 2 * layer * hidden, 2 * (layer + 1) * hidden
    if hasattr(encoder, "transform"):
        first, act, last = encoder.transform
        kv = nn.functional.linear(act(first(weight)), last.weight[lo:hi], last.bias[lo:hi])
    else:
        kv = weight[:, lo:hi]
    kv = kv.view(n_tokens, 2, num_heads, hidden // num_heads).permute(1, 2, 0, 3)
    return kv[0].unsqueeze(0), kv[1].unsqueeze(0)


def _prefix_self_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``BlipTextSelfAttention.forward`` (self-attention, eager) with P prefix keys/values prepended.

    The prefix is concatenated AFTER the KV-cache update, so the generation cache never stores prefix
    entries: positions (from the cache length) and beam reordering are unchanged. The additive mask gets P
    visible columns on the left; positions of real tokens are not shifted. The prefix is expanded to the batch
    at hand, so beam search's expanded batch works.
    """
    if encoder_hidden_states is not None:
        raise RuntimeError("prefix attention was patched onto a cross-attention module")
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query = self.query(hidden_states).view(shape).transpose(1, 2)
    key = self.key(hidden_states).view(shape).transpose(1, 2)
    value = self.value(hidden_states).view(shape).transpose(1, 2)
    if cache is not None:
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        key, value = self_cache.update(key, value, self.layer_idx, kwargs=kwargs)

    encoder = getattr(getattr(self, _PREFIX_OWNER_ATTR), PREFIX_ATTR)
    prefix_key, prefix_value = _prefix_key_values(encoder, self.layer_idx, self.num_attention_heads)
    batch = key.shape[0]
    prefix_key = prefix_key.to(key.dtype).expand(batch, -1, -1, -1)
    prefix_value = prefix_value.to(value.dtype).expand(batch, -1, -1, -1)
    key = torch.cat([prefix_key, key], dim=2)
    value = torch.cat([prefix_value, value], dim=2)

    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
    if attention_mask is not None:
        mask = attention_mask.to(scores.device)
        n_prefix = prefix_key.shape[2]
        if mask.dtype == torch.bool:  # True = attend
            pad = mask.new_ones((*mask.shape[:-1], n_prefix))
            scores = scores.masked_fill(~torch.cat([pad, mask], dim=-1), torch.finfo(scores.dtype).min)
        else:  # additive: 0 = attend
            pad = mask.new_zeros((*mask.shape[:-1], n_prefix))
            scores = scores + torch.cat([pad, mask], dim=-1)
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.matmul(self.dropout(probs), value)
    context = context.permute(0, 2, 1, 3).contiguous()
    context = context.view(*context.shape[:-2], self.all_head_size)
    return context, probs


def _add_prefix(spec: AdapterSpec, component: nn.Module, method: str) -> None:
    config = _prefix_config(spec, component, method)
    with torch.device(_device_of(component)):
        encoder = PrefixEncoder(config)
    encoder.mile_hidden_size = config.token_dim
    encoder.peft_config = config  # kept for save_adapters
    setattr(component, PREFIX_ATTR, encoder)
    for attention in _self_attentions(component):
        # a plain attribute (object.__setattr__), not a submodule: the encoder must not appear once per layer
        object.__setattr__(attention, _PREFIX_OWNER_ATTR, component)
        attention.forward = types.MethodType(_prefix_self_attention_forward, attention)


def apply_spec(model: nn.Module, spec: AdapterSpec | str, *, seed: int | None = None) -> nn.Module:
    """Freeze everything, then make each component F (frozen), T (trainable) or add its PEFT method.

    Works in place and returns ``model`` (still a ``BlipForQuestionAnswering``; module names are kept,
    adapters are added beside them). ``seed`` makes the adapters' random initialisation reproducible. A model
    carries at most one spec.
    """
    spec = as_spec(spec)
    if getattr(model, SPEC_ATTR, None) is not None:
        raise ValueError(f"model already carries adapter spec {model_spec(model)}; build a fresh model")
    missing = [attr for attr in COMPONENTS.values() if not hasattr(model, attr)]
    if missing:
        raise ValueError(f"apply_spec expects a BlipForQuestionAnswering; the model has no {missing}")
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model.requires_grad_(False)
        for comp, method in spec.methods.items():
            component = _component(model, comp)
            meta = _device_of(component).type == "meta"
            if method == "T":
                component.requires_grad_(True)
            elif method == "lora":
                # on the meta device peft must create the adapter weights there too (no allocation)
                inject_adapter_in_model(_lora_config(spec, comp), component, low_cpu_mem_usage=meta)
            elif method == "ia3":
                inject_adapter_in_model(_ia3_config(comp), component, low_cpu_mem_usage=meta)
            elif method in ("prefix", "ptv2"):
                _add_prefix(spec, component, method)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    # peft marks only its adapter weights trainable inside a component; a new prefix encoder is trainable
    setattr(model, SPEC_ATTR, spec)
    return model


def model_spec(model: nn.Module) -> AdapterSpec | None:
    """The spec :func:`apply_spec` put on ``model`` (None for a plain model)."""
    return getattr(model, SPEC_ATTR, None)


# --- counting -----------------------------------------------------------------------------------------------


def _is_adapter_param(name: str) -> bool:
    return ".lora_" in f".{name}" or ".ia3_l." in f".{name}." or name.startswith(f"{PREFIX_ATTR}.")


def count_parameters(model: nn.Module, spec: AdapterSpec | str | None = None) -> dict[str, Any]:
    """Trainable and total parameters, whole model and per component.

    ``total`` includes adapter parameters; tied/shared parameters count once (``parameters()`` de-duplicates);
    ``percent`` = 100 * trainable / total. ``adapter`` (per component) is what the method added.
    """
    spec = as_spec(spec) if spec is not None else model_spec(model)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    components: dict[str, dict[str, Any]] = {}
    for comp in COMPONENTS:
        named = list(_component(model, comp).named_parameters())
        comp_trainable = sum(p.numel() for _, p in named if p.requires_grad)
        comp_total = sum(p.numel() for _, p in named)
        if spec is not None:
            method = spec.method(comp)
        else:  # a plain model: describe what it is
            method = "T" if comp_trainable == comp_total else "F" if comp_trainable == 0 else "partial"
        components[comp] = {
            "method": method,
            "trainable": comp_trainable,
            "total": comp_total,
            "adapter": sum(p.numel() for n, p in named if _is_adapter_param(n)),
        }
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / total if total else 0.0,
        "components": components,
    }


def parameter_report(spec: AdapterSpec | str, profile: str | Profile = "paper") -> dict[str, Any]:
    """:func:`count_parameters` for ``spec`` on a ``profile`` model built on the meta device (no weights)."""
    from .model import build_model

    spec = as_spec(spec)
    model = apply_spec(build_model(profile, device="meta"), spec)
    report = count_parameters(model, spec)
    return {"spec": str(spec), "profile": get_profile(profile).name, **report}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that require grad, by their model names (what a training checkpoint needs to store).

    The tensors are detached views of the live parameters: clone them to keep a snapshot.
    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


# --- save / load --------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _prefix_state(encoder: PrefixEncoder) -> dict[str, torch.Tensor]:
    """peft's format (``prompt_embeddings``: the virtual tokens' key/value vectors, P x layers*2*hidden),
    plus, with a projection, the encoder's own weights so training can resume (peft keeps only the output)."""
    with torch.no_grad():
        if hasattr(encoder, "transform"):
            flat = encoder.transform(encoder.embedding.weight)
        else:
            flat = encoder.embedding.weight
    state = {"prompt_embeddings": flat.detach().clone().contiguous()}
    if hasattr(encoder, "transform"):
        own = encoder.state_dict()
        state.update({f"{PREFIX_ATTR}.{k}": v.detach().clone().contiguous() for k, v in own.items()})
    return state


def save_adapters(model: nn.Module, spec: AdapterSpec | str | None, directory: str | Path) -> Path:
    """Write the adapted components and return ``directory``.

    PEFT methods: ``dir/<comp>/adapter_config.json`` + ``adapter_model.safetensors`` (peft format, keys
    relative to the component); T components: ``dir/<comp>/model.safetensors``; plus
    ``dir/adapter_spec.json``. Frozen components write nothing.
    """
    spec = as_spec(spec) if spec is not None else model_spec(model)
    if spec is None:
        raise ValueError("save_adapters: the model carries no adapter spec; call apply_spec first")
    carried = model_spec(model)
    if carried is not None and carried != spec:
        raise ValueError(f"save_adapters: model carries spec {carried!r}, not {spec!r}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / SPEC_FILE, spec.to_dict())
    for comp, method in spec.methods.items():
        component = _component(model, comp)
        if method == "F":
            continue
        folder = root / comp
        folder.mkdir(exist_ok=True)
        if method == "T":
            # named_parameters de-duplicates tied weights (decoder embeddings = LM head): safetensors needs it
            state = {n: p.detach().contiguous() for n, p in component.named_parameters()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "component": comp})
        elif method in ("lora", "ia3"):
            component.peft_config[_ADAPTER_NAME].save_pretrained(str(folder))
            state = get_peft_model_state_dict(component, adapter_name=_ADAPTER_NAME)
            state = {k: v.contiguous() for k, v in state.items()}
            save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        else:
            encoder = getattr(component, PREFIX_ATTR)
            encoder.peft_config.save_pretrained(str(folder))
            state = _prefix_state(encoder)
            save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return root


def _check_keys(path: Path, found: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensors do not match the model; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )


def _check_config(path: Path, expected: PeftConfig) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing adapter config")
    saved = json.loads(path.read_text(encoding="utf-8"))
    want = expected.to_dict()
    for key in ("peft_type", "r", "lora_alpha", "num_virtual_tokens", "prefix_projection", "num_layers"):
        if key in want and saved.get(key) != (want[key].value if hasattr(want[key], "value") else want[key]):
            raise ValueError(f"{path}: field {key!r} is {saved.get(key)!r}, but the spec needs {want[key]!r}")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (saved with save_adapters?)")
    return load_file(str(path))


def _copy_into(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    _check_keys(path, set(state), set(params))
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def _load_prefix(component: nn.Module, folder: Path) -> None:
    encoder: PrefixEncoder = getattr(component, PREFIX_ATTR)
    _check_config(folder / "adapter_config.json", encoder.peft_config)
    path = folder / "adapter_model.safetensors"
    state = _load_tensors(path)
    if not hasattr(encoder, "transform"):
        _copy_into({"prompt_embeddings": encoder.embedding.weight}, state, path)
        return
    own = {k: v for k, v in state.items() if k.startswith(f"{PREFIX_ATTR}.")}
    if own:
        _copy_into({f"{PREFIX_ATTR}.{k}": v for k, v in encoder.named_parameters()}, own, path)
        return
    # peft's format holds only the projected prefix: serve it as a flat embedding (same outputs; the
    # projection MLP cannot be recovered, so further training continues on the flat prefix)
    _check_keys(path, set(state), {"prompt_embeddings"})
    flat_config = PrefixTuningConfig(**{**encoder.peft_config.to_dict(), "inference_mode": True})
    with torch.device(_device_of(component)):
        flat = PrefixEncoder(flat_config)
    _copy_into({"prompt_embeddings": flat.embedding.weight}, state, path)
    flat.embedding.weight.requires_grad_(encoder.embedding.weight.requires_grad)
    flat.mile_hidden_size = encoder.mile_hidden_size
    flat.peft_config = encoder.peft_config
    setattr(component, PREFIX_ATTR, flat)


def load_adapters(model: nn.Module, spec: AdapterSpec | str | None, directory: str | Path) -> nn.Module:
    """Load what :func:`save_adapters` wrote into ``model`` (base weights already loaded).

    ``spec=None`` reads ``dir/adapter_spec.json``. A plain model gets :func:`apply_spec` first; a model
    carrying another spec is an error. Returns ``model``.
    """
    root = Path(directory)
    spec_path = root / SPEC_FILE
    saved = None
    if spec_path.is_file():
        saved = AdapterSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
    spec = as_spec(spec) if spec is not None else saved
    if spec is None:
        raise FileNotFoundError(f"{spec_path}: missing, and no spec was given")
    if saved is not None and saved != spec:
        raise ValueError(f"{spec_path}: adapters were saved for {saved!r}, not {spec!r}")
    carried = model_spec(model)
    if carried is None:
        apply_spec(model, spec)
    elif carried != spec:
        raise ValueError(f"load_adapters: model carries spec {carried!r}, not {spec!r}")
    for comp, method in spec.methods.items():
        component = _component(model, comp)
        folder = root / comp
        if method == "F":
            continue
        if method == "T":
            path = folder / "model.safetensors"
            _copy_into(dict(component.named_parameters()), _load_tensors(path), path)
        elif method in ("lora", "ia3"):
            _check_config(folder / "adapter_config.json", component.peft_config[_ADAPTER_NAME])
            path = folder / "adapter_model.safetensors"
            state = _load_tensors(path)
            expected = get_peft_model_state_dict(component, adapter_name=_ADAPTER_NAME)
            _check_keys(path, set(state), set(expected))
            for key, tensor in state.items():
                if tensor.shape != expected[key].shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(expected[key].shape)}")
            set_peft_model_state_dict(component, state, adapter_name=_ADAPTER_NAME)
        else:
            _load_prefix(component, folder)
    return model
