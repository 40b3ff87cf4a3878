"""The one record type every dataset source returns, and the checks that keep bad records out."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

ANSWER_TYPES = ("OPEN", "CLOSED")
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
REQUIRED_FIELDS = ("img_name", "question", "answer", "qid")
YES_NO = ("yes", "no")


def normalize_split(split: str, allowed: Iterable[str] = SPLITS, dataset: str = "") -> str:
    """``val``/``valid``/``dev`` -> ``validation``; a split outside ``allowed`` is an error, not a default."""
    name = SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    allowed = tuple(allowed)
    if name not in allowed:
        where = f" for dataset {dataset!r}" if dataset else ""
        raise ValueError(f"unknown split {split!r}{where}: expected one of {list(allowed)}")
    return name


def is_yes_no(answer: str) -> bool:
    """Whether an answer is yes/no (VQA-RAD hub's and the paper tables' definition of 'closed')."""
    return str(answer).strip().lower().rstrip(".!") in YES_NO


@dataclass(frozen=True)
class Record:
    """One VQA question about one image, in SLAKE's field names.

    ``qid`` is the key everything is matched on (metrics, predictions files); it is unique within a split.
    The image is ``image_root / img_name`` on disk, or ``image_bytes`` for sources that ship images inside a
    file (hub parquet). ``prompts`` holds instruction-format prompts (MILE's ``question_pool``) when present.
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
        if self.image_bytes is not None:
            where: str = f"embedded image {self.img_name!r}"
            source: Any = io.BytesIO(self.image_bytes)
        else:
            path = self.image_path
            if path is None:
                raise ValueError(
                    f"record qid={self.qid!r}: no image_root and no image bytes for {self.img_name!r}"
                )
            if not path.is_file():
                raise FileNotFoundError(
                    f"image file {path} not found (record qid={self.qid!r}, field 'img_name')"
                )
            where, source = str(path), path
        try:
            with Image.open(source) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(
                f"image {where} is unreadable (record qid={self.qid!r}, field 'img_name'): {err}"
            ) from err

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (image bytes left out)."""
        d = asdict(self)
        d.pop("image_bytes")
        d["prompts"] = list(self.prompts)
        d["meta"] = dict(self.meta)
        return d


@dataclass(frozen=True)
class Problem:
    """A bad record: where it is (file, index, qid), which field, and what was expected."""

    file: str
    index: int | None
    qid: int | str | None
    field: str
    message: str
    missing_file: bool = False

    def __str__(self) -> str:
        where = self.file
        if self.index is not None:
            where += f": record {self.index}"
        return f"{where} (qid={self.qid!r}), field {self.field!r}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "qid": self.qid,
            "field": self.field,
            "message": self.message,
        }


class RecordList(list):
    """A list of :class:`Record` that remembers its source and what was skipped (``skip_bad=True``)."""

    def __init__(
        self,
        records: Iterable[Record] = (),
        *,
        dataset: str = "",
        split: str = "",
        source: str = "",
        skipped: Iterable[Problem] = (),
    ) -> None:
        super().__init__(records)
        self.dataset = dataset
        self.split = split
        self.source = source
        self.skipped: list[Problem] = list(skipped)


def raise_first(problems: list[Problem]) -> None:
    """Raise the first problem (FileNotFoundError for a missing file), saying how many more there are."""
    if not problems:
        return
    first = problems[0]
    more = (
        f" ({len(problems) - 1} more bad records; skip_bad=True skips and lists them)"
        if len(problems) > 1
        else ""
    )
    exc = FileNotFoundError if first.missing_file else ValueError
    raise exc(f"{first}{more}")


def check_image(path: Path | None, data: bytes | None, verify: bool) -> tuple[str, bool] | None:
    """None if the image is usable, else (what is wrong, whether a file is missing). ``verify`` decodes it."""
    if data is None:
        if path is None:
            return "no image: neither a file nor embedded bytes", False
        if not path.is_file():
            return f"image file {path} not found", True
        if not verify:
            return None
    if not verify:
        return None
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return f"image {path if data is None else 'bytes'} is unreadable: {err}", False
    return None


def build_record(
    raw: Mapping[str, Any],
    *,
    index: int,
    file: str,
    split: str,
    image_root: str | None,
    qid: Any = None,
    image_bytes: bytes | None = None,
    content_type: str | None = None,
    answer_type: str | None = None,
    q_lang: str = "en",
    prompts: tuple[str, ...] = (),
    meta: Mapping[str, Any] | None = None,
    verify_image: bool = False,
) -> Record | Problem:
    """Validate one raw record (SLAKE field names) into a :class:`Record`, or say what is wrong with it."""
    qid = raw.get("qid") if qid is None else qid
    for name in REQUIRED_FIELDS:
        value = qid if name == "qid" else raw.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return Problem(file, index, qid, name, "missing or empty (expected a non-empty value)")
        if name != "qid" and not isinstance(value, (str, int, float)):
            return Problem(file, index, qid, name, f"expected text, got {type(value).__name__}")
    answer = raw["answer"]
    # some sources store numeric answers as numbers; 2.0 and 2 must both read "2"
    answer = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()
    if answer_type is None:
        given = raw.get("answer_type")
        if given is None or not str(given).strip():
            return Problem(file, index, qid, "answer_type", "missing (expected OPEN or CLOSED)")
        answer_type = str(given).strip().upper()
    if answer_type not in ANSWER_TYPES:
        return Problem(file, index, qid, "answer_type", f"{answer_type!r} is not OPEN or CLOSED")
    if content_type is None:
        content_type = str(raw.get("content_type") or "unknown").strip() or "unknown"
    img_name = str(raw["img_name"]).strip()
    path = Path(image_root) / img_name if image_root is not None else None
    bad = check_image(path, image_bytes, verify_image)
    if bad is not None:
        return Problem(file, index, qid, "img_name", bad[0], missing_file=bad[1])
    return Record(
        img_name=img_name,
        question=str(raw["question"]).strip(),
        answer=answer,
        answer_type=answer_type,
        content_type=content_type,
        qid=qid,
        split=split,
        image_root=image_root,
        q_lang=q_lang,
        prompts=prompts,
        meta=dict(meta or {}),
        image_bytes=image_bytes,
    )


def finish(
    items: list[Record | Problem],
    *,
    dataset: str,
    split: str,
    source: str,
    skip_bad: bool,
    empty_hint: str = "",
) -> RecordList:
    """Split records from problems, reject duplicate qids and empty splits, raise unless ``skip_bad``."""
    records: list[Record] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, Problem):
            problems.append(item)
        elif str(item.qid) in seen:
            # predictions are matched by qid, so a repeated qid would make the metrics ambiguous
            problems.append(Problem(source, i, item.qid, "qid", "duplicate qid in this split"))
        else:
            seen.add(str(item.qid))
            records.append(item)
    if not skip_bad:
        raise_first(problems)
    if not records:
        raise ValueError(
            f"{source}: split {split!r} of dataset {dataset!r} has no usable records{empty_hint}"
            + (f" ({len(problems)} skipped as bad)" if problems else "")
        )
    return RecordList(records, dataset=dataset, split=split, source=source, skipped=problems)
