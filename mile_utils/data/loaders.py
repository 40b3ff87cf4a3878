"""Loaders for every dataset source, all returning :class:`~mile_utils.data.records.RecordList`.

Local copies come first; the Hugging Face hub is used only when asked (``hub=True`` or a hub id), so an
offline machine never waits on the network and never silently substitutes another dataset.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .records import (
    SPLITS,
    Problem,
    Record,
    RecordList,
    build_record,
    check_image,
    finish,
    is_yes_no,
    normalize_split,
)
from .synthetic import default_cache_dir, synthetic_dir

DATASETS = ("synthetic", "slake", "vqa-rad", "instruction")
SLAKE_HUB_ID = "BoKelvin/SLAKE"
VQA_RAD_HUB_ID = "flaviagiammarino/vqa-rad"
OSF_VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
OSF_VQA_RAD_IMAGES = "VQA_RAD Image Folder"
OSF_TEST_PHRASES = ("test_freeform", "test_para")
OSF_TRAIN_PHRASES = ("freeform", "para")


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _not_a_dict(path: Path, index: int, raw: Any) -> Problem:
    return Problem(str(path), index, None, "(record)", f"expected a JSON object, got {type(raw).__name__}")


# ---------------------------------------------------------------- SLAKE (and the synthetic set, same layout)
def _slake_root(root: Path) -> Path:
    """Accept the ``Slake1.0`` folder itself or a folder above it."""
    if (root / "train.json").is_file() or not (root / "Slake1.0").is_dir():
        return root
    return root / "Slake1.0"


def read_slake_folder(
    root: str | Path,
    split: str,
    *,
    dataset: str = "slake",
    lang: str | None = "en",
    skip_bad: bool = False,
    verify_images: bool = False,
    image_root: str | Path | None = None,
) -> RecordList:
    """SLAKE's official layout: ``<root>/{train,validation,test}.json`` and images ``<root>/imgs/<img_name>``.

    ``lang="en"`` keeps English questions (``q_lang``), as the literature's SLAKE results do; ``None``
    keeps all languages.
    """
    split = normalize_split(split, SPLITS, dataset)
    base = _slake_root(Path(root).expanduser())
    path = base / f"{split}.json"
    images = str(Path(image_root) if image_root is not None else base / "imgs")
    items: list[Record | Problem] = []
    for i, raw in enumerate(_read_json_list(path)):
        if not isinstance(raw, dict):
            items.append(_not_a_dict(path, i, raw))
            continue
        q_lang = str(raw.get("q_lang") or "en")
        if lang is not None and q_lang != lang:
            continue
        extra = {k: raw[k] for k in ("img_id", "location", "modality", "base_type", "triple") if k in raw}
        items.append(
            build_record(
                raw,
                index=i,
                file=str(path),
                split=split,
                image_root=images,
                q_lang=q_lang,
                meta=extra,
                verify_image=verify_images,
            )
        )
    hint = f" in language {lang!r} (field q_lang)" if lang else ""
    return finish(items, dataset=dataset, split=split, source=str(path), skip_bad=skip_bad, empty_hint=hint)


def _hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - datasets depends on huggingface_hub
        raise FileNotFoundError("hub loading needs huggingface_hub (pip install datasets)") from err
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow_patterns))
    except Exception as err:  # network, auth or missing-repo errors all mean: no local data
        raise FileNotFoundError(
            f"could not fetch the hub dataset {repo_id!r} ({type(err).__name__}: {err}). Without network, "
            "download it elsewhere and pass its folder with root=... / --root (or a file with path=...)"
        ) from err


def _slake_from_hub(repo_id: str, split: str, **kwargs: Any) -> RecordList:
    snap = _hub_snapshot(repo_id)
    images = snap / "imgs"
    if not images.is_dir():
        archive = snap / "imgs.zip"
        if not archive.is_file():
            raise FileNotFoundError(f"hub dataset {repo_id!r} has neither imgs/ nor imgs.zip in {snap}")
        target = default_cache_dir() / f"slake-hub-{hashlib.sha256(str(snap).encode()).hexdigest()[:12]}"
        if not (target / ".complete").is_file():
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(target)
            (target / ".complete").write_text("ok", encoding="utf-8")
        images = target / "imgs" if (target / "imgs").is_dir() else target
    return read_slake_folder(snap, split, image_root=images, **kwargs)


# ---------------------------------------------------------------- VQA-RAD
def _image_bytes(value: Any) -> tuple[bytes | None, str]:
    """Image bytes and original path from a hub parquet cell ({'bytes', 'path'} struct or raw bytes)."""
    if isinstance(value, Mapping):
        data, name = value.get("bytes"), value.get("path") or ""
    else:
        data, name = value, ""
    return (bytes(data) if data is not None else None), str(name)


def _parquet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"parquet file or folder {path} not found")
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if p.name.startswith(f"{split}-") or p.stem == split or f"/{split}/" in p.as_posix()
    )
    if not files:
        raise FileNotFoundError(
            f"no parquet file for split {split!r} under {path} (expected e.g. "
            f"data/{split}-00000-of-00001.parquet, as on the hub)"
        )
    return files


def read_vqa_rad_parquet(
    path: str | Path, split: str, *, skip_bad: bool = False, verify_images: bool = False
) -> RecordList:
    """The hub layout (``flaviagiammarino/vqa-rad``: columns image, question, answer; train 1,793 / test 451).

    It has no answer type, so CLOSED means a yes/no answer; no qid either, so qids are ``<split>_<row>``.
    Images live in the file; ``img_name`` is a hash of their bytes so equal images share one name (and one
    cached embedding).
    """
    import pandas as pd

    split = normalize_split(split, ("train", "test"), "vqa-rad")
    items: list[Record | Problem] = []
    files = _parquet_files(Path(path).expanduser(), split)
    row = 0
    for file in files:
        frame = pd.read_parquet(file)
        missing = [c for c in ("image", "question", "answer") if c not in frame.columns]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; expected image, question, answer")
        for raw in frame.to_dict("records"):
            qid = f"{split}_{row:05d}"
            data, name = _image_bytes(raw["image"])
            if data is None:
                items.append(Problem(str(file), row, qid, "image", "no image bytes in this row"))
            else:
                img_name = f"vqarad-{hashlib.sha1(data).hexdigest()[:16]}"
                answer_type = "CLOSED" if is_yes_no(str(raw["answer"])) else "OPEN"
                items.append(
                    build_record(
                        {"img_name": img_name, "question": raw["question"], "answer": raw["answer"]},
                        index=row,
                        file=str(file),
                        split=split,
                        image_root=None,
                        qid=qid,
                        image_bytes=data,
                        answer_type=answer_type,
                        content_type="unknown",
                        meta={"image_path": name},
                        verify_image=verify_images,
                    )
                )
            row += 1
    return finish(items, dataset="vqa-rad", split=split, source=", ".join(map(str, files)), skip_bad=skip_bad)


def read_vqa_rad_osf(
    path: str | Path,
    split: str,
    *,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    verify_images: bool = False,
) -> RecordList:
    """The original OSF release: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``.

    ``phrase_type`` test_freeform / test_para marks the test split (451 questions), freeform / para train.
    ``qid`` is the file's ``qid`` field when every record has a distinct one, else the record's index.
    ``content_type`` is the file's ``question_type`` (e.g. PRES, ABN, POS).
    """
    split = normalize_split(split, ("train", "test"), "vqa-rad")
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / OSF_VQA_RAD_JSON
    rows = _read_json_list(path)
    if image_root is None:
        image_root = (
            path.parent / OSF_VQA_RAD_IMAGES if (path.parent / OSF_VQA_RAD_IMAGES).is_dir() else path.parent
        )
    qids = [r.get("qid") if isinstance(r, dict) else None for r in rows]
    use_field = all(q is not None for q in qids) and len({str(q) for q in qids}) == len(qids)
    wanted = OSF_TEST_PHRASES if split == "test" else OSF_TRAIN_PHRASES
    items: list[Record | Problem] = []
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            items.append(_not_a_dict(path, i, raw))
            continue
        qid = raw["qid"] if use_field else i
        phrase = str(raw.get("phrase_type") or "").strip().lower()
        if phrase not in OSF_TEST_PHRASES + OSF_TRAIN_PHRASES:
            items.append(
                Problem(
                    str(path),
                    i,
                    qid,
                    "phrase_type",
                    f"{raw.get('phrase_type')!r}: expected freeform, para, test_freeform or test_para",
                )
            )
            continue
        if phrase not in wanted:
            continue
        fields = {
            "img_name": raw.get("image_name"),
            "question": raw.get("question"),
            "answer": raw.get("answer"),
            "answer_type": raw.get("answer_type"),
        }
        content = str(raw.get("question_type") or "unknown").strip() or "unknown"
        extra = {k: raw[k] for k in ("phrase_type", "image_organ", "qid_linked_id") if k in raw}
        item = build_record(
            fields,
            index=i,
            file=str(path),
            split=split,
            image_root=str(image_root),
            qid=qid,
            content_type=content,
            meta=extra,
            verify_image=verify_images,
        )
        if isinstance(item, Problem) and item.field == "img_name" and fields["img_name"] is None:
            item = Problem(item.file, item.index, item.qid, "image_name", item.message, item.missing_file)
        items.append(item)
    return finish(items, dataset="vqa-rad", split=split, source=str(path), skip_bad=skip_bad)


def _vqa_rad(split: str, root: Path | None, path: Path | None, hub: bool | str, **kwargs: Any) -> RecordList:
    if path is not None or root is not None:
        # an explicit file, else a folder holding the OSF json or hub-style parquet files
        target = path if path is not None else root
        assert target is not None
        osf = target.suffix.lower() == ".json" or (target.is_dir() and (target / OSF_VQA_RAD_JSON).is_file())
        if osf:
            # images: root when both are given, else the OSF image folder next to the json
            return read_vqa_rad_osf(target, split, image_root=root if path is not None else None, **kwargs)
        return read_vqa_rad_parquet(target, split, **kwargs)
    snap = _hub_snapshot(VQA_RAD_HUB_ID if hub is True else str(hub), allow_patterns=["*.parquet"])
    return read_vqa_rad_parquet(snap, split, **kwargs)


# ---------------------------------------------------------------- MILE instruction format
def _instruction_file(root: Path | None, path: Path | None, split: str) -> Path:
    if path is not None:
        return path
    assert root is not None
    exact = root / f"{split}.json"
    if exact.is_file():
        return exact
    matches = sorted(p for p in root.glob("*.json") if split in p.stem)
    if len(matches) == 1:
        return matches[0]
    raise FileNotFoundError(
        f"no single instruction JSON for split {split!r} in {root} (found "
        f"{[m.name for m in matches]}); pass the file with path=... / --path"
    )


def read_instruction_json(
    path: str | Path,
    split: str = "train",
    *,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    verify_images: bool = False,
) -> RecordList:
    """MILE's instruction format: a JSON list of ``{img_name, qid, answer, question_pool: [prompt, ...]}``.

    ``Record.prompts`` keeps the pool (training draws one per epoch, evaluation uses the first, see
    :class:`~mile_utils.data.transforms.VQADataset`); ``Record.question`` is the first prompt. Without an
    ``answer_type`` field, CLOSED means a yes/no answer. Images are under ``image_root`` (default: the
    file's folder, or its ``imgs/`` subfolder when there is one).
    """
    path = Path(path).expanduser()
    split = normalize_split(split, SPLITS, "instruction")
    if image_root is None:
        image_root = path.parent / "imgs" if (path.parent / "imgs").is_dir() else path.parent
    items: list[Record | Problem] = []
    for i, raw in enumerate(_read_json_list(path)):
        if not isinstance(raw, dict):
            items.append(_not_a_dict(path, i, raw))
            continue
        pool = raw.get("question_pool")
        if not isinstance(pool, list) or not pool or not all(isinstance(p, str) and p.strip() for p in pool):
            items.append(
                Problem(
                    str(path),
                    i,
                    raw.get("qid"),
                    "question_pool",
                    "expected a non-empty list of prompt strings",
                )
            )
            continue
        answer_type = raw.get("answer_type")
        answer_type = (
            str(answer_type).strip().upper()
            if answer_type
            else "CLOSED"
            if is_yes_no(str(raw.get("answer", "")))
            else "OPEN"
        )
        fields = {**raw, "question": pool[0]}
        items.append(
            build_record(
                fields,
                index=i,
                file=str(path),
                split=split,
                image_root=str(image_root),
                answer_type=answer_type,
                prompts=tuple(p.strip() for p in pool),
                verify_image=verify_images,
            )
        )
    return finish(items, dataset="instruction", split=split, source=str(path), skip_bad=skip_bad)


# ---------------------------------------------------------------- one entry point
def load_records(
    dataset: str = "synthetic",
    split: str = "train",
    *,
    root: str | Path | None = None,
    path: str | Path | None = None,
    size: int | str | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    lang: str | None = "en",
    hub: bool | str = False,
    verify_images: bool = False,
) -> RecordList:
    """Records of one split of ``dataset`` (``synthetic``, ``slake``, ``vqa-rad`` or ``instruction``).

    * ``synthetic``: generated (or read from the cache; ``root`` overrides the cache folder), ``size`` and
      ``seed`` choose the set.
    * ``slake``: ``root`` = the ``Slake1.0`` folder; ``hub=True`` (or a hub id) downloads ``BoKelvin/SLAKE``.
    * ``vqa-rad``: ``path`` = the OSF json or a hub-style parquet file/folder, or ``root`` = a folder with
      either; ``hub=True`` downloads ``flaviagiammarino/vqa-rad``. Splits train/test only.
    * ``instruction``: ``path`` = a MILE instruction JSON (or ``root`` with ``<split>.json``); images under
      ``root`` (default: next to the file).

    Bad records raise ValueError/FileNotFoundError naming file, record index, qid and field; ``skip_bad=True``
    drops them and lists them in ``.skipped``. Image files are checked to exist; ``verify_images=True`` also
    decodes each one (slower, what ``summarize_dataset`` does).
    """
    key = str(dataset).strip().lower().replace("_", "-")
    if key == "vqarad":
        key = "vqa-rad"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {list(DATASETS)}")
    root_p = Path(root).expanduser() if root is not None else None
    path_p = Path(path).expanduser() if path is not None else None
    common = {"skip_bad": skip_bad, "verify_images": verify_images}
    if key == "synthetic":
        folder = synthetic_dir(size=size, seed=seed, cache_dir=root_p)
        return read_slake_folder(folder, split, dataset="synthetic", lang="en", **common)
    if key == "slake":
        if root_p is not None or path_p is not None:
            folder = root_p if root_p is not None else path_p.parent  # type: ignore[union-attr]
            return read_slake_folder(folder, split, lang=lang, **common)
        if hub:
            return _slake_from_hub(SLAKE_HUB_ID if hub is True else str(hub), split, lang=lang, **common)
        raise FileNotFoundError(
            "slake needs a local copy (root=<Slake1.0 folder> / --root) or hub=True "
            f"to download {SLAKE_HUB_ID}"
        )
    if key == "vqa-rad":
        if root_p is None and path_p is None and not hub:
            raise FileNotFoundError(
                f"vqa-rad needs path=<'{OSF_VQA_RAD_JSON}' or a parquet file>, root=<folder>,"
                f" or hub=True to download {VQA_RAD_HUB_ID}"
            )
        return _vqa_rad(split, root_p, path_p, hub, **common)
    if root_p is None and path_p is None:
        raise FileNotFoundError("instruction needs path=<instruction JSON> (images under root=...)")
    file = _instruction_file(root_p, path_p, normalize_split(split, SPLITS, "instruction"))
    return read_instruction_json(file, split, image_root=root_p if path_p is not None else None, **common)


def summarize_dataset(
    dataset: str = "synthetic",
    split: str = "train",
    *,
    root: str | Path | None = None,
    path: str | Path | None = None,
    skip_bad: bool = False,
    size: int | str | None = None,
    seed: int = 0,
    hub: bool | str = False,
    lang: str | None = "en",
    max_problems: int = 10,
) -> dict[str, Any]:
    """Counts of one split, every image decoded once to prove it is readable.

    Returns ``records, images, open, closed, yes_no, content_types``, the answer vocabulary size, and with
    ``skip_bad=True`` how many records were skipped and the first ``max_problems`` of them.
    """
    records = load_records(
        dataset,
        split,
        root=root,
        path=path,
        size=size,
        seed=seed,
        skip_bad=skip_bad,
        lang=lang,
        hub=hub,
        verify_images=False,
    )
    problems = list(records.skipped)
    good: list[Record] = []
    decoded: dict[str, str | None] = {}  # img_name -> problem text; each image decoded once
    for i, rec in enumerate(records):
        if rec.img_name not in decoded:
            bad = check_image(rec.image_path, rec.image_bytes, verify=True)
            decoded[rec.img_name] = None if bad is None else bad[0]
        if decoded[rec.img_name] is None:
            good.append(rec)
            continue
        problem = Problem(records.source, i, rec.qid, "img_name", decoded[rec.img_name] or "")
        if not skip_bad:
            raise ValueError(str(problem))
        problems.append(problem)
    if not good:
        raise ValueError(f"{records.source}: split {split!r} has no record with a readable image")
    return {
        "dataset": records.dataset,
        "split": records.split,
        "source": records.source,
        "records": len(good),
        "images": len({r.img_name for r in good}),
        "open": sum(r.answer_type == "OPEN" for r in good),
        "closed": sum(r.answer_type == "CLOSED" for r in good),
        "yes_no": sum(r.is_yes_no for r in good),
        "answers": len({r.answer.lower() for r in good}),
        "content_types": dict(sorted(Counter(r.content_type for r in good).items())),
        "skipped": len(problems),
        "problems": [p.to_dict() for p in problems[:max_problems]],
    }
