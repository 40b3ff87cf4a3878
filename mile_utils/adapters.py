"""Component-wise PEFT of MISS/BLIP VQA: one spec gives the ViT, the JTM and the decoder each F, T or a method.
lora, ia3, prefix, ptv2: the reference study's settings; newer methods: peft's defaults on the LoRA targets, VeRA
and OFT on Linears only (peft's VeRA has no Conv2d, peft 0.21's OFT Conv2d is no identity at init). Load weights
first. peft's tuners adapt each component in place; its ``PrefixEncoder`` keys/values we prepend per self-attention."""

from __future__ import annotations

import json
import math
import types
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoints import check_keys
from .files import atomic_write, write_json
from .model import COMPONENTS, build_model  # model.py never imports this module: no cycle
from .profiles import Profile, get_profile

PEFT = ("lora", "dora", "ia3", "vera", "loha", "lokr", "adalora", "oft", "ln")  # peft tuners in place
METHODS: tuple[str, ...] = ("F", "T", *PEFT, "prefix", "ptv2")  # the vocabulary of the spec and of the CLI
RANKED = ("lora", "dora", "loha", "lokr", "adalora")  # the methods the spec's rank sets (AdaLoRA: target)
REFUSED: dict[tuple[str, str], str] = {("vit", m): "the ViT has no token prompt to prepend to (the study tunes "
                                       "prefixes of the text stacks only)" for m in ("prefix", "ptv2")}  # the reason
# the reference's LoRA targets: text query/value of self- and cross-attention; ViT every Linear, the patch Conv2d
LORA_TARGETS: dict[str, tuple[str, ...]] = {"vit": ("qkv", "projection", "fc1", "fc2", "patch_embedding"),
                                            **dict.fromkeys(("jtm", "dec"), ("query", "value"))}
SPEC_ATTR = "mile_adapter_spec"  # set on the model by apply_spec: which spec it carries
TUNER_ATTR = "_mile_tuner"  # plain (unregistered) reference from a component to its peft tuner (AdaLoRA's budget)
SPEC_FILE, WEIGHTS_FILE = "adapter_spec.json", "adapter_model.safetensors"
# peft warns on each VeRA config/load without saved projections (ours are rebuilt from peft's PRNG key) and on
# each LN-tuning layer (it asks a LayerNorm for in/out features): nothing to act on
warnings.filterwarnings("ignore", r"(Specified to not (save|load) vera_A|Unsupported layer type .*LayerNorm)")


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
    total_step: int = 1000  # AdaLoRA's budget schedule length: set it to the run's optimiser steps
    # True reproduces the reference code's defect (chapter 11 measures it): the JTM's prefix encoder is built,
    # counted as trainable and saved, but never reaches the attention, so the JTM runs as if frozen
    jtm_prefix_noop: bool = False

    def __post_init__(self) -> None:
        lookup = {m.lower(): m for m in METHODS}
        for comp in COMPONENTS:  # frozen dataclass: normalise "LoRA"/"PTV2"/"f" to the canonical spelling
            value = getattr(self, comp)
            method = lookup.get(value.strip().lower()) if isinstance(value, str) else None
            if method is None:
                raise ValueError(f"{comp}: unknown method {value!r}; expected one of {', '.join(METHODS)} (any case)")
            if (comp, method) in REFUSED:
                raise ValueError(f"{comp}: {method} is not supported: {REFUSED[comp, method]}")
            object.__setattr__(self, comp, method)
        alpha, dropout, noop = self.lora_alpha, self.lora_dropout, self.jtm_prefix_noop
        checks = {k: (type(getattr(self, k)) is int and getattr(self, k) >= 1, "a positive integer")
                  for k in ("rank", "num_virtual_tokens", "total_step")} | {
            "lora_alpha": (isinstance(alpha, (int, float)) and alpha > 0, "a positive number"),
            "lora_dropout": (isinstance(dropout, (int, float)) and 0 <= dropout < 1, "a number in [0, 1)"),
            "jtm_prefix_noop": (noop is False or (noop is True and self.jtm in ("prefix", "ptv2")),
                                "False, or True when jtm is prefix or ptv2")}
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"AdapterSpec.{name}: expected {expected}, got {getattr(self, name)!r}")

    @classmethod
    def parse(cls, text: AdapterSpec | str, **options: Any) -> AdapterSpec:
        """``"F/lora/lora"`` (vit/jtm/dec, any case) -> spec; ``options`` set rank etc.; a spec passes through."""
        if isinstance(text, AdapterSpec) and not options:
            return text
        parts = [p.strip() for p in text.split("/")] if isinstance(text, str) else []
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"spec {text!r}: expected a string of three methods vit/jtm/dec separated by '/', "
                             f"e.g. 'F/lora/lora' (methods: {', '.join(METHODS)})")
        return cls(*parts, **options)

    def __str__(self) -> str:
        return f"{self.vit}/{self.jtm}/{self.dec}"

    @property
    def methods(self) -> dict[str, str]:
        return {comp: getattr(self, comp) for comp in COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        """The fields, less those that do not act here (the identity of runs without them stays as it was)."""
        unused = {"total_step": "adalora" not in self.methods.values(), "jtm_prefix_noop": not self.jtm_prefix_noop}
        return {k: v for k, v in asdict(self).items() if not unused.get(k)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        if not isinstance(data, dict) or set(data) - (known := {f.name for f in fields(cls)}):
            raise ValueError(f"AdapterSpec.from_dict: expected a dict with some of {sorted(known)}, got {data!r}")
        return cls(**data)


def _peft_config(spec: AdapterSpec, comp: str, component: nn.Module) -> peft.PeftConfig:
    method, targets = getattr(spec, comp), list(LORA_TARGETS[comp])
    linear = [t for t in targets if t != "patch_embedding"]  # VeRA, OFT: no Conv2d (module docstring)
    # IA3 (targets, feed-forward ones): the one choice that gives the paper's 0.061% for IA3/IA3/IA3
    ia3, ia3_ff = (["qkv", "projection"], ["projection"]) if comp == "vit" else (["key", "value", "output.dense"],
                                                                                  ["output.dense"])
    lora = {"r": spec.rank, "lora_alpha": spec.lora_alpha, "lora_dropout": spec.lora_dropout, "bias": "none"}
    norms = sorted({n.rsplit(".", 1)[-1] for n, m in component.named_modules() if isinstance(m, nn.LayerNorm)})
    cls, options = {
        "lora": (peft.LoraConfig, lora), "dora": (peft.LoraConfig, {**lora, "use_dora": True}),
        "ia3": (peft.IA3Config, {"target_modules": ia3, "feedforward_modules": ia3_ff}),
        "vera": (peft.VeraConfig, {"target_modules": linear, "save_projection": False}),
        "loha": (peft.LoHaConfig, {"r": spec.rank}), "lokr": (peft.LoKrConfig, {"r": spec.rank}),
        "adalora": (peft.AdaLoraConfig, {"target_r": spec.rank, "total_step": spec.total_step}),
        "oft": (peft.OFTConfig, {"target_modules": linear}), "ln": (peft.LNTuningConfig, {"target_modules": norms}),
    }[method]
    return cls(**{"target_modules": targets, **options})


def _prefix_attention(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      encoder_hidden_states: None = None, cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``BlipTextSelfAttention.forward`` (eager) with the component's P prefix keys/values prepended: peft's encoder
    output is (P, layers*2, heads, head_dim), slot 2i = layer i's keys, 2i+1 its values (this layer takes its slice),
    joined after the KV-cache update (never cached), P visible mask columns on the left, expanded to the batch."""
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query, key, value = (f(hidden_states).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
    if cache is not None:  # the decoder's EncoderDecoderCache, or the JTM's own
        key, value = getattr(cache, "self_attention_cache", cache).update(key, value, self.layer_idx)
    lo, hi = 2 * self.layer_idx * self.all_head_size, 2 * (self.layer_idx + 1) * self.all_head_size
    kv = self._mile_prefix_owner._mile_prefix_kv[:, lo:hi]  # this forward's encoder output (_prefix_kv)
    kv = kv.view(len(kv), 2, self.num_attention_heads, self.attention_head_size).permute(1, 2, 0, 3)
    key = torch.cat([kv[0].to(key.dtype).expand(key.shape[0], -1, -1, -1), key], dim=2)
    value = torch.cat([kv[1].to(value.dtype).expand(value.shape[0], -1, -1, -1), value], dim=2)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
    if attention_mask is not None:  # 0 = attend
        mask = attention_mask.to(scores.device)
        scores = scores + torch.cat([mask.new_zeros((*mask.shape[:-1], kv.shape[2])), mask], dim=-1)
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.matmul(self.dropout(probs), value).permute(0, 2, 1, 3).contiguous()
    return context.view(*context.shape[:-2], self.all_head_size), probs


def _prefix_kv(component: nn.Module, args: Any) -> None:
    """Forward pre-hook: the prefix encoder's output (of embedding(arange(P))) once per forward, sliced per layer;
    projecting per layer with a slice of the weight made each layer's backward write a gradient the size of the
    whole projection (14M floats at the paper size: an F/F/prefix step took 2.5x F/F/lora's)."""
    encoder = component.prefix_encoder
    kv = encoder.transform(encoder.embedding.weight) if hasattr(encoder, "transform") else encoder.embedding.weight
    object.__setattr__(component, "_mile_prefix_kv", kv)


def _add_prefix(spec: AdapterSpec, component: nn.Module, method: str, inject: bool) -> None:
    cfg = (text := getattr(component, "bert", component)).config  # the decoder wraps its BERT stack as ``bert``
    config = peft.PrefixTuningConfig(
        num_virtual_tokens=spec.num_virtual_tokens, prefix_projection=method == "prefix", token_dim=cfg.hidden_size,
        encoder_hidden_size=cfg.hidden_size,  # peft's default when wrapping a model: the projection is square
        num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads, num_transformer_submodules=1)
    with torch.device(next(component.parameters()).device):
        component.prefix_encoder = peft.PrefixEncoder(config)
    for layer in text.encoder.layer if inject else ():  # self-attention only, never the cross-attention
        # a plain attribute, not a submodule: the component must not appear inside itself once per layer
        object.__setattr__(layer.attention.self, "_mile_prefix_owner", component)
        layer.attention.self.forward = types.MethodType(_prefix_attention, layer.attention.self)
    if inject:
        component.register_forward_pre_hook(_prefix_kv)


def apply_spec(model: nn.Module, spec: AdapterSpec | str, *, seed: int | None = None) -> nn.Module:
    """Freeze ``model``, then train, adapt or keep frozen each component (``seed``: the adapters' init); return it."""
    spec = AdapterSpec.parse(spec)
    if getattr(model, SPEC_ATTR, None) is not None:
        raise ValueError(f"model already carries adapter spec {getattr(model, SPEC_ATTR)}; build a fresh model")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # the CPU generator is restored after
        if seed is not None:
            torch.manual_seed(seed)
        model.requires_grad_(False)
        for comp, method in spec.methods.items():
            component = getattr(model, COMPONENTS[comp])
            if method == "T":
                component.requires_grad_(True)
            elif method in ("prefix", "ptv2"):
                _add_prefix(spec, component, method, inject=not (comp == "jtm" and spec.jtm_prefix_noop))
            elif method in PEFT:
                config = _peft_config(spec, comp, component)
                # what peft.inject_adapter_in_model does, keeping the tuner: VeRA's shared projections and
                # AdaLoRA's rank allocator live on it (inject refuses VeRA for that reason)
                tuner = peft.PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](
                    component, config, "default", low_cpu_mem_usage=next(component.parameters()).is_meta)
                object.__setattr__(component, TUNER_ATTR, tuner)  # not a submodule: it holds the component
                for ranknum in (p for n, p in component.named_parameters() if n.endswith(".ranknum.default")):
                    ranknum.requires_grad_(False)  # AdaLoRA's constant rank, left trainable by peft on meta only
    setattr(model, SPEC_ATTR, spec)
    return model


def adapter_step(model: nn.Module, step: int) -> None:
    """AdaLoRA's rank budget update (peft's ``update_and_allocate``) for each AdaLoRA component: call it after
    ``optimizer.step()`` and before ``zero_grad()`` with the 0-based global step. No-op for other methods."""
    for comp in (c for c, m in getattr(model, SPEC_ATTR).methods.items() if m == "adalora"):
        getattr(getattr(model, COMPONENTS[comp]), TUNER_ATTR).update_and_allocate(step)


def _carried(model: nn.Module, what: str) -> AdapterSpec:
    if (carried := getattr(model, SPEC_ATTR, None)) is None:
        raise ValueError(f"{what}: the model carries no adapter spec; call apply_spec first")
    return carried


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters of an adapted model, whole and per component (tied ones once); ``adapter``:
    what the method added and trains (a no-op JTM prefix included, as the reference counted it)."""
    def count(module: nn.Module) -> dict[str, int]:
        params = list(module.parameters())
        return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
    components = {comp: {"method": method, **(c := count(getattr(model, COMPONENTS[comp]))),
                         "adapter": 0 if method in ("F", "T") else c["trainable"]}
                  for comp, method in _carried(model, "count_parameters").methods.items()}
    return {**(whole := count(model)), "percent": 100.0 * whole["trainable"] / whole["total"], "components": components}


def parameter_report(spec: AdapterSpec | str, profile: str | Profile = "paper") -> dict[str, Any]:
    """:func:`count_parameters` for ``spec`` on a ``profile`` model built on the meta device (no weights)."""
    model = apply_spec(build_model(profile, device="meta"), spec)
    return {"spec": str(getattr(model, SPEC_ATTR)), "profile": get_profile(profile).name, **count_parameters(model)}


def _trainable_state(model: nn.Module, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """``<comp>.<key>`` -> the trainable tensors (peft's state dict for peft tuners)."""
    state: dict[str, torch.Tensor] = {}
    for comp, method in spec.methods.items():
        component = getattr(model, COMPONENTS[comp])
        if method == "adalora":  # at full rank (pruned ranks are zeros): the shapes of a fresh model
            config = component.peft_config["default"]
            pattern, config.rank_pattern = config.rank_pattern, None
            part = peft.get_peft_model_state_dict(component)
            config.rank_pattern = pattern
        elif method in PEFT:
            part = peft.get_peft_model_state_dict(component)
        else:
            part = {n: p for n, p in component.named_parameters() if p.requires_grad}
        state.update({f"{comp}.{k}": v for k, v in part.items()})
    return state


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the trainable tensors (keys ``<comp>.<key>``) and the model's spec into ``directory``; return it."""
    carried, root = _carried(model, "save_adapters"), Path(directory)
    state = {k: t.detach().contiguous() for k, t in _trainable_state(model, carried).items()}
    atomic_write(root / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"spec": str(carried)}))
    write_json(root / SPEC_FILE, carried.to_dict())
    return root


def load_adapters(model: nn.Module, spec: AdapterSpec | str | None, directory: str | Path) -> nn.Module:
    """Load what :func:`save_adapters` wrote into ``model`` (base weights already loaded; a plain model gets the
    saved spec applied first) and return it; ``spec``, if given, must be the saved one."""
    spec_path, path = Path(directory) / SPEC_FILE, Path(directory) / WEIGHTS_FILE
    if not spec_path.is_file() or not path.is_file():
        raise FileNotFoundError(f"{directory}: expected {SPEC_FILE} and {WEIGHTS_FILE} (written by save_adapters)")
    saved = AdapterSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
    carried = getattr(model, SPEC_ATTR, None)
    if (spec is not None and AdapterSpec.parse(spec) != saved) or carried not in (None, saved):
        raise ValueError(f"{spec_path}: adapters were saved for {saved!r}, not {spec!r} (model carries {carried!r})")
    if carried is None:
        apply_spec(model, saved)
    state = load_file(str(path))
    check_keys(str(path), _trainable_state(model, saved), state)  # no silent partial or empty load
    for comp, method in saved.methods.items():
        component = getattr(model, COMPONENTS[comp])
        part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(comp + ".")}
        if method in PEFT:
            peft.set_peft_model_state_dict(component, part)
        else:
            component.load_state_dict(part, strict=False)  # checked above; the frozen rest stays
    return model
