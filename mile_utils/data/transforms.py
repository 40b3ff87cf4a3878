"""Image preprocessing as BLIP does it, the reference code's quirk, and the torch Dataset the engine wraps."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .records import Record

# BLIP (and MISS) normalise with CLIP's statistics, not ImageNet's
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """PIL image -> float tensor (3, size, size): bicubic resize, CLIP mean/std normalisation (BLIP eval).

    ``reference_quirk=True`` reproduces the MILE reference code instead: no mean/std normalisation and the
    pixels divided by 255 twice (``ToTensor`` already scales to [0, 1], the code divides again), so the model
    sees values in [0, 1/255], far from the statistics a pretrained ViT was trained on. Use it only to
    reproduce the reference's numbers.
    """

    def __init__(self, image_size: int, reference_quirk: bool = False) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
        self.image_size = int(image_size)
        self.reference_quirk = bool(reference_quirk)
        self._mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        if self.reference_quirk:
            return x / 255.0
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, reference_quirk={self.reference_quirk})"


def unique_image_tensors(records: Sequence[Record], transform: ImageTransform) -> dict[str, torch.Tensor]:
    """One tensor per distinct image (by ``img_name``), each decoded once: the key the engine caches
    frozen-ViT embeddings on. SLAKE asks ~10 questions per image, so this is ~10x fewer decodes."""
    out: dict[str, torch.Tensor] = {}
    for rec in records:
        if rec.img_name not in out:
            out[rec.img_name] = transform(rec.load_image())
    return out


class VQADataset:
    """Records + an image transform, indexed by the engine's collator (``question_text(i)``, ``pixels(i)``).

    Records carrying instruction prompts
    (``Record.prompts``) give a prompt drawn per record and per epoch when ``train=True`` (call
    :meth:`set_epoch`), and always the first prompt otherwise, as MILE trained and evaluated.
    Decoded images are kept in memory by default when they are small (<= 128 px): a tiny-profile epoch
    then costs no JPEG/PNG decoding after the first.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: ImageTransform,
        *,
        train: bool = False,
        seed: int = 0,
        cache_images: bool | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.cache_images = transform.image_size <= 128 if cache_images is None else cache_images
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Choose which instruction prompt each record shows this epoch (training only)."""
        self.epoch = int(epoch)

    def question_text(self, index: int) -> str:
        rec = self.records[index]
        if not rec.prompts:
            return rec.question
        if not self.train:
            return rec.prompts[0]
        # str seeds hash deterministically (unlike hash()), so the draw is the same on every run and machine
        return random.Random(f"{self.seed}:{self.epoch}:{rec.qid}").choice(rec.prompts)

    def pixels(self, index: int) -> torch.Tensor:
        rec = self.records[index]
        cached = self._cache.get(rec.img_name)
        if cached is not None:
            return cached
        x = self.transform(rec.load_image())
        if self.cache_images:
            self._cache[rec.img_name] = x
        return x
