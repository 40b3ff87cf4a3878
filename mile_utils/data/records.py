"""The one record type every dataset source returns; BLIP's image preprocessing; :class:`VQADataset`."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP (and MISS) normalise with CLIP's, not ImageNet's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_yes_no(answer: str) -> bool:
    return str(answer).strip().lower().rstrip(".!") in ("yes", "no")  # 'closed' for VQA-RAD's hub and the paper


@dataclass(frozen=True)
class Record:
    """One VQA question in SLAKE's field names; ``qid`` (unique within a split) is what predictions match on. The
    image is ``image_root / img_name``, or ``image_bytes`` (hub parquet). ``prompts``: MILE's ``question_pool``."""

    img_name: str
    question: str
    answer: str
    answer_type: str
    content_type: str
    qid: int | str
    split: str = ""
    image_root: str | None = None
    q_lang: str = "en"
    prompts: tuple[str, ...] = ()
    image_bytes: bytes | None = field(default=None, repr=False, compare=False, hash=False)

    @property
    def is_yes_no(self) -> bool:
        return is_yes_no(self.answer)

    @property
    def image_path(self) -> Path | None:
        return Path(self.image_root) / self.img_name if self.image_root is not None else None

    def load_image(self, decode: bool = True) -> Image.Image | None:
        """The image as PIL RGB (grayscale to 3 channels, as BLIP expects); ``decode=False``: only check it exists."""
        path, data = self.image_path, self.image_bytes
        if data is None and (path is None or not path.is_file()):
            raise FileNotFoundError(f"image file {path} not found" if path else
                                    f"record qid={self.qid!r} has no image: no file, no embedded bytes")
        if not decode:
            return None
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as img:  # type: ignore[arg-type]
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            where = path if data is None else f"bytes of record qid={self.qid!r}"
            raise ValueError(f"image {where} is unreadable: {err}") from err


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (3, size, size) tensor as BLIP evaluates: bicubic resize, CLIP normalisation. ``reference_quirk``:
    MILE's code instead, pixels divided by 255 twice, no normalisation (in [0, 1/255]), to reproduce its numbers."""

    image_size: int
    reference_quirk: bool = False

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
        if self.reference_quirk:
            return x / 255.0
        return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


class VQADataset:
    """Records + an image transform, read by the engine's collator. Instruction records give a prompt drawn per
    record and epoch when ``train``, else the first, as MILE did. Small images (<= 128 px) are kept in memory."""

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
