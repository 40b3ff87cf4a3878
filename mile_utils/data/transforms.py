"""Image preprocessing as BLIP does it, the reference code's quirk, and the dataset the engine's collator reads."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .records import Record

# BLIP (and MISS) normalise with CLIP's statistics, not ImageNet's
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float tensor (3, size, size): bicubic resize, CLIP mean/std normalisation (BLIP eval).
    ``reference_quirk=True``: the MILE reference code's instead, no normalisation and the pixels divided by 255
    twice (``ToTensor``, then the code), so the model sees [0, 1/255]. Only to reproduce its numbers."""

    image_size: int
    reference_quirk: bool = False

    def __post_init__(self) -> None:
        if int(self.image_size) <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size!r}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img, size = image.convert("RGB"), int(self.image_size)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        if self.reference_quirk:
            return x / 255.0
        return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


class VQADataset:
    """Records + an image transform, read by the engine's collator (``question_text(i)``, ``pixels(i)``).
    Instruction records (``Record.prompts``) give a prompt drawn per record and epoch when ``train`` (see
    :meth:`set_epoch`), else the first, as MILE did. Small decoded images (<= 128 px) are kept in memory."""

    def __init__(self, records: Sequence[Record], transform: ImageTransform, *, train: bool = False, seed: int = 0,
                 cache_images: bool | None = None) -> None:
        self.records, self.transform, self.train, self.seed, self.epoch = list(records), transform, train, seed, 0
        self.cache_images = transform.image_size <= 128 if cache_images is None else cache_images
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def question_text(self, index: int) -> str:
        rec = self.records[index]
        if not rec.prompts or not self.train:
            return rec.prompts[0] if rec.prompts else rec.question
        # str seeds hash deterministically (unlike hash()), so the draw is the same on every run and machine
        return random.Random(f"{self.seed}:{self.epoch}:{rec.qid}").choice(rec.prompts)

    def pixels(self, index: int) -> torch.Tensor:
        rec = self.records[index]
        if rec.img_name in self._cache:
            return self._cache[rec.img_name]
        x = self.transform(rec.load_image())
        if self.cache_images:
            self._cache[rec.img_name] = x
        return x
