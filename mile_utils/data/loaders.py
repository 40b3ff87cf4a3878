"""Every dataset source read into lists of :class:`~mile_utils.data.records.Record`; bad records raise errors
naming file, position, qid and field. The network only with ``--hub`` / ``hub=True``: offline, nothing waits."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from ..files import atomic_folder
from .records import Record, is_yes_no
from .synthetic import default_cache_dir, synthetic_dir

DATASETS = ("synthetic", "slake", "vqa-rad", "instruction")
HUB_IDS = {"slake": "BoKelvin/SLAKE", "vqa-rad": "flaviagiammarino/vqa-rad"}
# file names per split: the official Slake1.0 ships validate.json, the built-in set validation.json
SPLIT_FILES = {"train": ("train",), "validation": ("validation", "validate", "val"), "test": ("test",)}
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation", "dev": "validation"}
OSF_JSON, OSF_IMAGES = "VQA_RAD Dataset Public.json", "VQA_RAD Image Folder"
OSF_PHRASES = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}


def _field_problem(raw: Mapping[str, Any], names: Mapping[str, str]) -> tuple[str, str] | None:
    """(field as the file names it, what is wrong), or None when the record's text fields are usable."""
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


def _collect(rows: Iterable[Mapping[str, Any]], key: str, split: str, source: str, skip_bad: bool, verify: bool,
             lang: str | None) -> tuple[list[Record], list[dict[str, Any]]]:
    """Records and problems of raw rows in SLAKE's field names, each with its ``file``, ``index`` (position in the
    file) and maybe ``bad`` (found by the reader). A repeated qid is bad: predictions are matched by qid."""
    records, problems, seen = [], [], set()
    checked: dict[tuple[Any, str], str] = {}  # image -> problem ("" = none); SLAKE asks ~10 questions per image
    names = {"img_name": "image_name"} if key == "vqa-rad" else {}  # field names as the file has them
    for raw in rows:
        if (bad := raw.get("bad") or _field_problem(raw, names)) is None:
            answer = raw["answer"]  # numbers stored as numbers: 2.0 and 2 both read "2"
            answer = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()
            rec = Record(img_name=str(raw["img_name"]).strip(), question=str(raw["question"]).strip(), answer=answer,
                         answer_type=str(raw["answer_type"]).strip().upper(), qid=raw["qid"], split=split,
                         content_type=str(raw.get("content_type") or "unknown").strip(),
                         image_root=raw.get("image_root"), q_lang=str(raw.get("q_lang") or "en"),
                         prompts=tuple(raw.get("prompts") or ()), image_bytes=raw.get("image_bytes"))
            if (image := (rec.image_root, rec.img_name)) not in checked:
                try:
                    rec.load_image(verify)
                    checked[image] = ""
                except (FileNotFoundError, ValueError) as err:
                    checked[image] = str(err)
            bad = ((names.get("img_name", "img_name"), checked[image]) if checked[image] else
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
        raise error(f"{described[0]} ({more}pass --skip-bad (python: skip_bad=True) to skip bad records and list them)")
    if not records:
        hint = f" in language {lang!r} (field q_lang)" if lang and key == "slake" else ""
        raise ValueError(f"{source}: split {split!r} of dataset {key!r} has no usable records{hint}"
                         + (f" ({len(problems)} skipped as bad)" if problems else ""))
    if problems:
        warnings.warn(f"skipped {len(problems)} bad records of {source} (skip_bad): " + "; ".join(described[:5]),
                      stacklevel=3)
    return records, problems


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found (--root / root=, --path / path=)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [{**raw, "file": str(path), "index": i} if isinstance(raw, dict) else
            {"file": str(path), "index": i, "bad": ("(record)", f"expected a JSON object, got {type(raw).__name__}")}
            for i, raw in enumerate(data)]


def _split_file(folder: Path, split: str) -> Path:
    if not (found := [folder / f"{stem}.json" for stem in SPLIT_FILES[split] if (folder / f"{stem}.json").is_file()]):
        tried = " or ".join(f"{s}.json" for s in SPLIT_FILES[split])
        raise FileNotFoundError(f"no {tried} in {folder}: pass the dataset folder with --root (python: root=...)")
    return found[0]


def _slake(root: Path, split: str, lang: str | None, images: Path | None = None) -> list[dict[str, Any]]:
    """SLAKE's ``{train,validate,test}.json`` and ``imgs/`` in ``root`` (``Slake1.0`` or above); ``lang``: q_lang."""
    if not (root / "train.json").is_file() and (root / "Slake1.0").is_dir():
        root = root / "Slake1.0"
    return [{**raw, "image_root": str(images or root / "imgs")} for raw in _read_json_list(_split_file(root, split))
            if lang is None or "bad" in raw or str(raw.get("q_lang") or "en") == lang]


def _hub(key: str, repo_id: str, split: str, lang: str | None) -> list[dict[str, Any]]:
    try:
        snap = Path(snapshot_download(repo_id, repo_type="dataset",
                                      allow_patterns=["*.parquet"] if key == "vqa-rad" else None))
    except Exception as err:  # network, auth or missing-repo errors all mean: no local data
        raise FileNotFoundError(f"could not fetch the hub dataset {repo_id!r} ({type(err).__name__}: {err}). Without "
                                "network, download it elsewhere; pass its folder with --root (python: root=...) or a "
                                "file with --path") from err
    if key == "vqa-rad":
        return _vqa_rad(snap, split, None)
    images = None
    if not (snap / "imgs").is_dir():  # BoKelvin/SLAKE ships its images as imgs.zip: unpacked once into the cache
        if not (snap / "imgs.zip").is_file():
            raise FileNotFoundError(f"hub dataset {repo_id!r} has neither imgs/ nor imgs.zip in {snap}")
        images = default_cache_dir() / f"slake-hub-{hashlib.sha256(str(snap).encode()).hexdigest()[:12]}"
        if not images.is_dir():
            atomic_folder(images, lambda tmp: shutil.unpack_archive(snap / "imgs.zip", tmp), done="imgs")
        images = images / "imgs" if (images / "imgs").is_dir() else images
    return _slake(snap, split, lang, images)


def _parquet_split(file: Path) -> str | None:
    """The split of a hub parquet file, from its name (``test-00000-of-00001.parquet``) or folder."""
    return next((s for s in ("train", "test", "validation") if file.name.startswith(f"{s}-")
                 or file.stem == s or file.parent.name == s), None)


def _vqa_rad(target: Path, split: str, images: Path | None) -> list[dict[str, Any]]:
    """The OSF release (json + image folder; ``phrase_type`` test_* = test; its ``qid`` when distinct, else the row)
    and the hub's parquet (image, question, answer; CLOSED = yes/no; qid ``<split>_<row>``; images named by hash)."""
    import pyarrow.parquet as pq
    target = target / OSF_JSON if (target / OSF_JSON).is_file() else target
    held = _parquet_split(target) if target.suffix.lower() == ".parquet" else split
    if target.is_file() and held != split:
        raise ValueError(f"{target} holds split {held!r}, not {split!r} (--split / split=): pass the {split} "
                         "parquet file or the folder holding them with --path (python: path=...)" if held else
                         f"cannot tell which split {target} holds: a hub parquet file is named <split>-*.parquet")
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*.parquet") if _parquet_split(p) == split)
    if not files:
        raise FileNotFoundError(f"no '{OSF_JSON}' and no parquet file of split {split!r} under {target} "
                                f"(expected e.g. data/{split}-00000-of-00001.parquet, as on the hub)")
    out: list[dict[str, Any]] = []
    for file in files:
        if osf := file.suffix.lower() == ".json":
            rows, folder = _read_json_list(file), images or file.parent / OSF_IMAGES
        else:
            table = pq.read_table(file)
            if {"image", "question", "answer"} - set(table.column_names):
                raise ValueError(f"{file}: columns {table.column_names}; expected image, question, answer")
            rows = [{**raw, "file": str(file), "index": i} for i, raw in enumerate(table.to_pylist())]
        qids, offset = [raw.get("qid") for raw in rows], len(out)  # hub qids count rows over all its files
        own_qids = None not in qids and len({str(q) for q in qids}) == len(qids)
        for raw in rows:
            i, image = raw["index"], raw.get("image") or {}
            raw["qid"] = raw.get("qid") if own_qids else i if osf else f"{split}_{offset + i:05d}"
            phrase = str(raw.get("phrase_type") or "").strip().lower()
            if "bad" in raw:
                pass
            elif osf and phrase not in OSF_PHRASES:
                raw["bad"] = ("phrase_type", f"{raw.get('phrase_type')!r}: expected freeform, para, test_freeform "
                              "or test_para")
            elif osf and OSF_PHRASES[phrase] != split:
                continue
            elif osf:
                raw.update(img_name=raw.get("image_name"), content_type=raw.get("question_type"),
                           image_root=str(folder if folder.is_dir() else file.parent))
            elif image.get("bytes") is None:
                raw["bad"] = ("image", "no image bytes in this row")
            else:
                digest = hashlib.sha1(image["bytes"]).hexdigest()[:16]  # equal images, one name
                raw.update(image_bytes=image["bytes"], img_name=f"vqarad-{digest}",
                           answer_type="CLOSED" if is_yes_no(str(raw.get("answer"))) else "OPEN")
            out.append(raw)
    return out


def _instruction(path: Path, split: str, images: Path | None) -> list[dict[str, Any]]:
    """MILE's instruction JSON: ``question_pool`` -> ``prompts`` (the first: ``question``); untyped: CLOSED = yes/no."""
    path = _split_file(path, split) if path.is_dir() else path
    images = images or (path.parent / "imgs" if (path.parent / "imgs").is_dir() else path.parent)
    rows = _read_json_list(path)
    for raw in (r for r in rows if "bad" not in r):
        pool = raw.get("question_pool")
        if not isinstance(pool, list) or not pool or not all(isinstance(p, str) and p.strip() for p in pool):
            raw["bad"] = ("question_pool", "expected a non-empty list of prompt strings")
        else:
            kind = raw.get("answer_type") or ("CLOSED" if is_yes_no(str(raw.get("answer"))) else "OPEN")
            raw.update(question=pool[0], prompts=tuple(p.strip() for p in pool), answer_type=kind)
        raw["image_root"] = str(images)
    return rows


def _load(dataset: str, split: str, *, root: str | Path | None = None, path: str | Path | None = None,
          size: int | str | None = None, seed: int = 0, skip_bad: bool = False, lang: str | None = "en",
          hub: bool | str = False, verify_images: bool = False) -> tuple[list[Record], list[dict], str, str]:
    key = {"vqarad": "vqa-rad"}.get(k := str(dataset).strip().lower().replace("_", "-"), k)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (--dataset / dataset=): expected one of {list(DATASETS)}")
    allowed = ("train", "test") if key == "vqa-rad" else tuple(SPLIT_FILES)
    name = SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    if name not in allowed:
        raise ValueError(f"unknown split {split!r} for dataset {key!r} (--split / split=): expected one of "
                         f"{list(allowed)} (aliases: {', '.join(SPLIT_ALIASES)})")
    split = name
    root_p, path_p = (Path(p).expanduser() if p is not None else None for p in (root, path))
    local, hub_id = path_p or root_p, HUB_IDS.get(key) if hub is True else str(hub) if hub else None
    images = root_p if path_p else None  # images: --root when a file is given with --path, else next to the file
    if key == "synthetic":
        rows = _slake(synthetic_dir(size=size, seed=seed, cache_dir=root_p), split, "en")
    elif local is not None and key == "instruction":
        rows = _instruction(local, split, images)
    elif local is not None:
        rows = _slake(root_p or path_p.parent, split, lang) if key == "slake" else _vqa_rad(local, split, images)  # type: ignore[union-attr]
    elif hub_id and key in HUB_IDS:
        rows = _hub(key, hub_id, split, lang)
    else:
        hint = f", or --hub (python: hub=True) to download {HUB_IDS[key]}" if key in HUB_IDS else ""
        raise FileNotFoundError(f"{key} needs a local copy: --root (python: root=...) for the dataset folder "
                                f"or --path (python: path=...) for its file{hint}")
    source = rows[0]["file"] if rows else str(local or key)
    return (*_collect(rows, key, split, source, skip_bad, verify_images, lang), source, key)


def load_records(dataset: str = "synthetic", split: str = "train", **kwargs: Any) -> list[Record]:
    """Records of one split (train, validation alias val/valid/validate/dev, test) of ``dataset``: ``synthetic``
    (``size``, ``seed``; ``root``: its cache), ``slake`` (``root``: Slake1.0; ``lang``: one language, None all),
    ``vqa-rad`` (``path``: OSF json or hub parquet file/folder, or ``root``), ``instruction`` (``path``: MILE JSON, or
    ``root`` with ``<split>.json``). ``hub=True`` (or an id) downloads SLAKE/VQA-RAD; ``skip_bad``: warn, drop bad."""
    return _load(dataset, split, **kwargs)[0]


def summarize_dataset(dataset: str = "synthetic", split: str = "train", **kwargs: Any) -> dict[str, Any]:
    """Counts of one split (``load_records``'s arguments; each image decoded once) and the first skipped records."""
    good, problems, source, key = _load(dataset, split, **{**kwargs, "verify_images": True})
    return {"dataset": key, "split": good[0].split, "source": source, "records": len(good),
            "images": len({r.img_name for r in good}), "open": sum(r.answer_type == "OPEN" for r in good),
            "closed": sum(r.answer_type == "CLOSED" for r in good), "yes_no": sum(r.is_yes_no for r in good),
            "answers": len({r.answer.lower() for r in good}),
            "content_types": dict(sorted(Counter(r.content_type for r in good).items())),
            "skipped": len(problems), "problems": problems[:10]}
