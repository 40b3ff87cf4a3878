"""The one record type every dataset source returns, the checks that keep bad records out, and the records as
the training loop reads them: BLIP's image preprocessing (and the reference code's quirk), :class:`VQADataset`."""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# BLIP (and MISS) normalise with CLIP's statistics, not ImageNet's
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_yes_no(answer: str) -> bool:
    """Whether an answer is yes/no (VQA-RAD hub's and the paper tables' definition of 'closed')."""
    return str(answer).strip().lower().rstrip(".!") in ("yes", "no")


@dataclass(frozen=True)
class Record:
    """One VQA question about one image, in SLAKE's field names. ``qid`` (unique within a split) is what metrics
    and predictions match on. The image is ``image_root / img_name``, or ``image_bytes`` for sources that ship
    images inside a file (hub parquet). ``prompts``: MILE's instruction ``question_pool``, when there is one."""

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
    def is_closed(self) -> bool:
        return self.answer_type == "CLOSED"

    @property
    def is_yes_no(self) -> bool:
        return is_yes_no(self.answer)

    @property
    def image_path(self) -> Path | None:
        return Path(self.image_root) / self.img_name if self.image_root is not None else None

    def load_image(self, decode: bool = True) -> Image.Image | None:
        """The image as PIL RGB (grayscale scans replicated to three channels, as BLIP expects); ``decode=False``
        only checks that it is there. FileNotFoundError or ValueError say what is wrong."""
        path, data = self.image_path, self.image_bytes
        if data is None and (path is None or not path.is_file()):
            raise FileNotFoundError(f"image file {path} not found" if path else
                                    f"record qid={self.qid!r} has no image: no file, no embedded bytes")
        try:
            if decode:
                with Image.open(io.BytesIO(data) if data is not None else path) as img:  # type: ignore[arg-type]
                    return img.convert("RGB")
            return None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            where = path if data is None else f"bytes of record qid={self.qid!r}"
            raise ValueError(f"image {where} is unreadable: {err}") from err


def _field_problem(raw: Mapping[str, Any], names: Mapping[str, str]) -> tuple[str, str] | None:
    """(field as the file names it, what is wrong) of one raw record's text fields, or None when they are usable."""
    for name in ("img_name", "question", "answer", "qid"):
        value = raw.get(name)
        # a null reads as None from parquet and NaN from json: a bad record, never the answer "nan"
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
            return names.get(name, name), "missing, empty or null (expected a non-empty value)"
        if not isinstance(value, (str, int, float)):
            return names.get(name, name), f"expected text, got {type(value).__name__}"
    if str(raw.get("answer_type") or "").strip().upper() not in ("OPEN", "CLOSED"):
        return "answer_type", f"{raw.get('answer_type')!r}: expected OPEN or CLOSED"
    return None


def collect(rows: Iterable[Mapping[str, Any]], *, dataset: str, split: str, source: str, skip_bad: bool,
            verify: bool = False, names: Mapping[str, str] | None = None,
            empty_hint: str = "") -> tuple[list[Record], list[dict[str, Any]]]:
    """Records, and problems (file, index = position in the file, qid, field, message), of raw rows in SLAKE's
    field names that carry their ``file`` and ``index`` (and ``bad``: a problem the loader found). Bad rows raise
    (FileNotFoundError for a missing image) unless ``skip_bad``; a repeated qid is bad (predictions are matched by
    qid); no usable record is an error. Images must exist; ``verify`` decodes each one (once: SLAKE asks ~10
    questions per image)."""
    records: list[Record] = []
    problems: list[dict[str, Any]] = []
    checked: dict[tuple[Any, str], str] = {}
    seen: set[str] = set()
    names = names or {}
    for raw in rows:
        bad = raw.get("bad") or _field_problem(raw, names)
        if bad is None:
            answer = raw["answer"]  # numbers stored as numbers: 2.0 and 2 both read "2"
            answer = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()
            rec = Record(
                img_name=str(raw["img_name"]).strip(), question=str(raw["question"]).strip(), answer=answer,
                answer_type=str(raw["answer_type"]).strip().upper(), qid=raw["qid"], split=split,
                content_type=str(raw.get("content_type") or "unknown").strip(), image_root=raw.get("image_root"),
                q_lang=str(raw.get("q_lang") or "en"), prompts=tuple(raw.get("prompts") or ()),
                image_bytes=raw.get("image_bytes"))
            if (key := (rec.image_root, rec.img_name)) not in checked:
                try:
                    rec.load_image(verify)
                    checked[key] = ""
                except (FileNotFoundError, ValueError) as err:
                    checked[key] = str(err)
            bad = ((names.get("img_name", "img_name"), checked[key]) if checked[key] else
                   ("qid", "duplicate qid in this split") if str(rec.qid) in seen else None)
        if bad is not None:
            problems.append({"file": raw["file"], "index": raw["index"], "qid": raw.get("qid"), "field": bad[0],
                             "message": bad[1]})
            continue
        seen.add(str(rec.qid))
        records.append(rec)
    described = [f"{p['file']}: record {p['index']} (qid={p['qid']!r}), field {p['field']!r}: {p['message']}"
                 for p in problems]
    if problems and not skip_bad:
        more = f"{len(problems) - 1} more bad records; " if len(problems) > 1 else ""
        error = FileNotFoundError if "not found" in problems[0]["message"] else ValueError
        raise error(f"{described[0]} ({more}pass --skip-bad (python: skip_bad=True) to skip bad records and list "
                    "them)")
    if not records:
        raise ValueError(f"{source}: split {split!r} of dataset {dataset!r} has no usable records{empty_hint}"
                         + (f" ({len(problems)} skipped as bad)" if problems else ""))
    if problems:
        warnings.warn(f"skipped {len(problems)} bad records of {source} (skip_bad): " + "; ".join(described[:5]),
                      stacklevel=3)
    return records, problems


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
        size = int(self.image_size)  # PIL's resize to the same size is a plain copy
        img = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
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
