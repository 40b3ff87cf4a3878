"""The one record type every dataset source returns, and the checks that keep bad records out."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

ANSWER_TYPES = ("OPEN", "CLOSED")
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation", "dev": "validation"}
SKIP_HINT = "pass --skip-bad (python: skip_bad=True) to skip bad records and list them"


def normalize_split(split: str, allowed: Iterable[str] = SPLITS, dataset: str = "") -> str:
    """``val``/``validate``/``valid``/``dev`` -> ``validation``; a split outside ``allowed`` is an error."""
    name = SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    if name not in tuple(allowed):
        where = f" for dataset {dataset!r}" if dataset else ""
        raise ValueError(f"unknown split {split!r}{where} (--split / split=): expected one of {list(allowed)}"
                         f" (aliases: {', '.join(SPLIT_ALIASES)})")
    return name


def is_yes_no(answer: str) -> bool:
    """Whether an answer is yes/no (VQA-RAD hub's and the paper tables' definition of 'closed')."""
    return str(answer).strip().lower().rstrip(".!") in ("yes", "no")


@dataclass(frozen=True)
class Record:
    """One VQA question about one image, in SLAKE's field names.

    ``qid`` is the key everything is matched on (metrics, predictions files); it is unique within a split.
    The image is ``image_root / img_name`` on disk, or ``image_bytes`` for sources that ship images inside a
    file (hub parquet). ``prompts`` holds instruction-format prompts (MILE's ``question_pool``) when present.
    ``where`` is (file, position of the record in that file), for messages.
    """

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
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    image_bytes: bytes | None = field(default=None, repr=False, compare=False, hash=False)
    where: tuple[str, int] | None = field(default=None, repr=False, compare=False, hash=False)

    @property
    def is_closed(self) -> bool:
        return self.answer_type == "CLOSED"

    @property
    def is_yes_no(self) -> bool:
        return is_yes_no(self.answer)

    @property
    def image_path(self) -> Path | None:
        return Path(self.image_root) / self.img_name if self.image_root is not None else None

    def load_image(self) -> Image.Image:
        """The image as PIL RGB (grayscale scans are replicated to three channels, as BLIP expects)."""
        bad = image_problem(self.image_path, self.image_bytes, verify=False)
        if bad is not None:
            raise (FileNotFoundError if bad[1] else ValueError)(f"{bad[0]} (record qid={self.qid!r})")
        try:
            with Image.open(io.BytesIO(self.image_bytes) if self.image_bytes is not None
                            else self.image_path) as img:  # type: ignore[arg-type]
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"image {self.img_name!r} is unreadable (record qid={self.qid!r}): {err}") from err


def image_problem(path: Path | None, data: bytes | None, verify: bool) -> tuple[str, bool] | None:
    """None if the image is usable, else (what is wrong, whether a file is missing). ``verify`` decodes it."""
    if data is None:
        if path is None:
            return "no image: neither a file nor embedded bytes", False
        if not path.is_file():
            return f"image file {path} not found", True
    if verify:
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as img:  # type: ignore[arg-type]
                img.load()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            return f"image {path if data is None else 'bytes'} is unreadable: {err}", False
    return None


class Bad(Exception):
    """What is wrong with one raw record: the field (as the file names it) and what was expected."""

    def __init__(self, field: str, message: str, qid: Any = None, missing_file: bool = False) -> None:
        super().__init__(message)
        self.field, self.message, self.qid, self.missing_file = field, message, qid, missing_file


def describe(problem: Mapping[str, Any]) -> str:
    return (f"{problem['file']}: record {problem['index']} (qid={problem['qid']!r}), "
            f"field {problem['field']!r}: {problem['message']}")


def _empty(value: Any) -> bool:
    # a null in a parquet file reads as None or NaN: never the answer "nan"
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _record(raw: Mapping[str, Any], split: str, names: Mapping[str, str], verify: bool) -> Record:
    """Validate one raw record (SLAKE field names; ``names`` gives the file's own) into a :class:`Record`."""
    qid = raw.get("qid")
    for name in ("img_name", "question", "answer", "qid"):
        value = raw.get(name)
        if _empty(value):
            raise Bad(names.get(name, name), "missing, empty or null (expected a non-empty value)", qid)
        if not isinstance(value, (str, int, float)):
            raise Bad(names.get(name, name), f"expected text, got {type(value).__name__}", qid)
    answer = raw["answer"]
    # some sources store numeric answers as numbers; 2.0 and 2 must both read "2"
    answer = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()
    answer_type = str(raw.get("answer_type") or "").strip().upper()
    if answer_type not in ANSWER_TYPES:
        raise Bad("answer_type", f"{raw.get('answer_type')!r}: expected OPEN or CLOSED", qid)
    root = raw.get("image_root")
    bad = image_problem(Path(root) / str(raw["img_name"]).strip() if root is not None else None,
                        raw.get("image_bytes"), verify)
    if bad is not None:
        raise Bad(names.get("img_name", "img_name"), bad[0], qid, bad[1])
    return Record(img_name=str(raw["img_name"]).strip(), question=str(raw["question"]).strip(), answer=answer,
                  answer_type=answer_type, content_type=str(raw.get("content_type") or "unknown").strip(),
                  qid=qid, split=split, image_root=root, q_lang=str(raw.get("q_lang") or "en"),
                  prompts=tuple(raw.get("prompts") or ()), meta=dict(raw.get("meta") or {}),
                  image_bytes=raw.get("image_bytes"), where=(raw["file"], raw["index"]))


def collect(rows: Iterable[Mapping[str, Any]], *, dataset: str, split: str, source: str,
            skip_bad: bool, verify: bool = False, names: Mapping[str, str] | None = None,
            empty_hint: str = "") -> tuple[list[Record], list[dict[str, Any]]]:
    """Records and problems (file, index in the file, qid, field, message) of raw rows that carry their
    ``file`` and ``index``. Bad rows raise (FileNotFoundError for a missing image) unless ``skip_bad``;
    duplicate qids are bad (predictions are matched by qid); no usable record is an error."""
    records: list[Record] = []
    problems: list[dict[str, Any]] = []
    missing: list[bool] = []
    seen: set[str] = set()
    for raw in rows:
        try:
            if isinstance(raw.get("bad"), Bad):
                raise raw["bad"]
            rec = _record(raw, split, names or {}, verify)
            if str(rec.qid) in seen:
                raise Bad("qid", "duplicate qid in this split", rec.qid)
        except Bad as bad:
            problems.append({"file": raw["file"], "index": raw["index"], "qid": bad.qid, "field": bad.field,
                             "message": bad.message})
            missing.append(bad.missing_file)
            continue
        seen.add(str(rec.qid))
        records.append(rec)
    if problems and not skip_bad:
        more = f"{len(problems) - 1} more bad records; " if len(problems) > 1 else ""
        raise (FileNotFoundError if missing[0] else ValueError)(f"{describe(problems[0])} ({more}{SKIP_HINT})")
    if not records:
        raise ValueError(f"{source}: split {split!r} of dataset {dataset!r} has no usable records{empty_hint}"
                         + (f" ({len(problems)} skipped as bad)" if problems else ""))
    if problems:
        warnings.warn(f"skipped {len(problems)} bad records of {source} (skip_bad): "
                      + "; ".join(describe(p) for p in problems[:5]), stacklevel=3)
    return records, problems
