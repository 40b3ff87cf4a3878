"""Model sizes and training defaults: ``tiny`` (CPU, minutes) and ``paper`` (MISS size, 480 px, GPU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    image_size: int
    patch_size: int
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_mlp: int
    text_hidden: int  # JTM and decoder: two BERT-style stacks of the same size, as in BLIP/MISS
    text_layers: int
    text_heads: int
    text_mlp: int
    max_positions: int
    vocab_size: int | None  # None: from the tokenizer (tiny); paper: bert-base-uncased + [DEC] + [ENC]
    batch_size: int
    lr: float
    min_lr: float
    weight_decay: float
    epochs: int
    max_question_tokens: int
    max_answer_tokens: int
    # regularisation in training (off in eval): BERT dropout (hidden and attention) of the JTM and decoder, and
    # the ViT's stochastic depth at its last block (BLIP's linear schedule from 0); MISS uses 0.1 and 0.1
    text_dropout: float = 0.0
    vit_drop_path: float = 0.0
    num_beams: int = 3  # generation, as in the reference: beam 3, at most 10 tokens, at least 1
    max_answer_length: int = 10
    min_answer_length: int = 1
    # initial lr of a method's adapter parameters, as (method, lr) pairs (frozen, hashable); the rest train at
    # ``lr``. Tiny: the methods whose loss barely moves at 1e-3 get the rate of lowest training loss in a sweep
    # of F/x/x (results/lr-sweep-tiny.json); the paper profile trains every part at one rate, as the reference.
    method_lr: tuple[tuple[str, float], ...] = ()


PAPER = Profile(
    name="paper", image_size=480, patch_size=16, vit_hidden=768, vit_layers=12, vit_heads=12, vit_mlp=3072,
    text_hidden=768, text_layers=12, text_heads=12, text_mlp=3072, max_positions=512, vocab_size=30524,
    batch_size=20, lr=1e-5, min_lr=0.0, weight_decay=0.05, epochs=130, max_question_tokens=35, max_answer_tokens=10,
    text_dropout=0.1, vit_drop_path=0.1)
TINY = Profile(
    name="tiny", image_size=64, patch_size=8, vit_hidden=128, vit_layers=2, vit_heads=4, vit_mlp=256,
    text_hidden=128, text_layers=2, text_heads=4, text_mlp=256, max_positions=128, vocab_size=None,
    batch_size=32, lr=1e-3, min_lr=1e-5, weight_decay=0.05, epochs=3, max_question_tokens=35, max_answer_tokens=10,
    method_lr=tuple((m, 3e-2) for m in ("ia3", "ptv2", "vera", "adalora", "loha", "lokr", "ln")))
PROFILES: dict[str, Profile] = {p.name: p for p in (TINY, PAPER)}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile) or profile in PROFILES:
        return profile if isinstance(profile, Profile) else PROFILES[profile]
    raise ValueError(f"unknown profile {profile!r}: expected one of {sorted(PROFILES)}")
