"""Every dataset source read into plain lists of :class:`~mile_utils.data.records.Record`.

Local copies come first; the Hugging Face hub is used only when asked (``--hub`` / ``hub=True``), so an
offline machine never waits on the network and never silently substitutes another dataset.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from .records import SPLITS, Bad, Record, collect, describe, image_problem, is_yes_no, normalize_split
from .synthetic import default_cache_dir, synthetic_dir

DATASETS = ("synthetic", "slake", "vqa-rad", "instruction")
SLAKE_HUB_ID = "BoKelvin/SLAKE"
VQA_RAD_HUB_ID = "flaviagiammarino/vqa-rad"
OSF_VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
OSF_VQA_RAD_IMAGES = "VQA_RAD Image Folder"
OSF_PHRASES = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}
# file names per split: the official Slake1.0 ships validate.json, the built-in set validation.json
SPLIT_FILES = {"train": ("train",), "validation": ("validation", "validate", "val"), "test": ("test",)}


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found (--root / root=, --path / path=)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _rows(path: Path, data: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """(position in the file, raw) pairs; a non-object entry becomes a problem at its position."""
    return [(i, raw if isinstance(raw, dict) else
             {"bad": Bad("(record)", f"expected a JSON object, got {type(raw).__name__}")})
            for i, raw in enumerate(data)]


def _split_file(folder: Path, split: str) -> Path:
    for stem in SPLIT_FILES[split]:
        if (folder / f"{stem}.json").is_file():
            return folder / f"{stem}.json"
    tried = " or ".join(f"{s}.json" for s in SPLIT_FILES[split])
    raise FileNotFoundError(f"no {tried} in {folder}: pass the dataset folder with --root (python: root=...)")


# ---------------------------------------------------------------- SLAKE (and the synthetic set, same layout)
def _slake(root: Path, split: str, dataset: str, lang: str | None, images: Path | None = None) -> tuple:
    """SLAKE's official layout: ``<root>/{train,validate,test}.json`` and ``<root>/imgs/<img_name>``, root
    being the ``Slake1.0`` folder or one above it. ``lang="en"`` keeps English questions (``q_lang``)."""
    if not (root / "train.json").is_file() and (root / "Slake1.0").is_dir():
        root = root / "Slake1.0"
    path = _split_file(root, split)
    out = []
    for i, raw in _rows(path, _read_json_list(path)):
        if lang is not None and "bad" not in raw and str(raw.get("q_lang") or "en") != lang:
            continue  # filtered, yet positions stay those of the file
        extra = {k: raw[k] for k in ("img_id", "location", "modality", "base_type", "triple") if k in raw}
        out.append({**raw, "file": str(path), "index": i, "image_root": str(images or root / "imgs"),
                    "meta": extra})
    return out, str(path), f" in language {lang!r} (field q_lang)" if lang else ""


def _hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow_patterns))
    except Exception as err:  # network, auth or missing-repo errors all mean: no local data
        raise FileNotFoundError(
            f"could not fetch the hub dataset {repo_id!r} ({type(err).__name__}: {err}). Without network, "
            "download it elsewhere and pass its folder with --root (python: root=...) or a file with --path"
        ) from err


def _slake_hub(repo_id: str, split: str, lang: str | None) -> tuple:
    snap = _hub_snapshot(repo_id)
    images = snap / "imgs"
    if not images.is_dir():
        if not (snap / "imgs.zip").is_file():
            raise FileNotFoundError(f"hub dataset {repo_id!r} has neither imgs/ nor imgs.zip in {snap}")
        target = default_cache_dir() / f"slake-hub-{hashlib.sha256(str(snap).encode()).hexdigest()[:12]}"
        if not (target / ".complete").is_file():
            with zipfile.ZipFile(snap / "imgs.zip") as zf:
                zf.extractall(target)
            (target / ".complete").write_text("ok", encoding="utf-8")
        images = target / "imgs" if (target / "imgs").is_dir() else target
    return _slake(snap, split, "slake", lang, images)


# ---------------------------------------------------------------- VQA-RAD: OSF json or hub parquet, one path
def _parquet_split(file: Path) -> str | None:
    """The split a hub parquet file holds, from its name (``test-00000-of-00001.parquet``) or folder."""
    return next((s for s in ("train", "test", "validation") if file.name.startswith(f"{s}-")
                 or file.stem == s or file.parent.name == s), None)


def _vqa_rad_files(target: Path, split: str) -> list[Path]:
    if target.is_dir() and (target / OSF_VQA_RAD_JSON).is_file():
        return [target / OSF_VQA_RAD_JSON]
    if target.is_file():
        held = _parquet_split(target) if target.suffix.lower() == ".parquet" else split
        if held != split:
            raise ValueError(
                f"{target} holds split {held!r}, not {split!r} (--split / split=): pass the {split} parquet file "
                "or the folder holding them with --path (python: path=...)" if held else
                f"cannot tell which split {target} holds: a hub parquet file is named <split>-*.parquet")
        return [target]
    files = sorted(p for p in target.rglob("*.parquet") if _parquet_split(p) == split) if target.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no '{OSF_VQA_RAD_JSON}' and no parquet file of split {split!r} under "
                                f"{target} (expected e.g. data/{split}-00000-of-00001.parquet, as on the hub)")
    return files


def _vqa_rad(target: Path, split: str, images: Path | None) -> tuple:
    """The OSF release (``VQA_RAD Dataset Public.json``, ``phrase_type`` test_freeform/test_para = test) and
    the hub's parquet (``flaviagiammarino/vqa-rad``: image, question, answer) read by one path. The hub has no
    answer type (CLOSED = a yes/no answer) and no qid (``<split>_<row>``); its images live in the file and are
    named by a hash of their bytes. OSF ``question_type`` becomes ``content_type``."""
    import pyarrow.parquet as pq

    split = normalize_split(split, ("train", "test"), "vqa-rad")
    out, row = [], 0
    for file in _vqa_rad_files(target, split):
        osf = file.suffix.lower() == ".json"
        if osf:
            data = _read_json_list(file)
            folder = images or (file.parent / OSF_VQA_RAD_IMAGES if (file.parent / OSF_VQA_RAD_IMAGES).is_dir()
                                else file.parent)
        else:
            table = pq.read_table(file)
            missing = [c for c in ("image", "question", "answer") if c not in table.column_names]
            if missing:
                raise ValueError(f"{file}: missing column(s) {missing}; expected image, question, answer")
            data, folder = table.to_pylist(), None
        qids = [r.get("qid") if isinstance(r, dict) else None for r in data]
        own_qids = None not in qids and len({str(q) for q in qids}) == len(qids)
        for i, raw in _rows(file, data):
            qid = raw.get("qid") if own_qids else i if osf else f"{split}_{row:05d}"
            row += 1
            base = {"file": str(file), "index": i, "qid": qid}
            if osf and "bad" not in raw:
                phrase = str(raw.get("phrase_type") or "").strip().lower()
                if phrase not in OSF_PHRASES:
                    raw = {"bad": Bad("phrase_type", f"{raw.get('phrase_type')!r}: expected freeform, para, "
                                      "test_freeform or test_para", qid)}
                elif OSF_PHRASES[phrase] != split:
                    continue
            if "bad" in raw:
                out.append({**base, **raw})
                continue
            image = raw.get("image") if not osf else None
            blob = image.get("bytes") if isinstance(image, dict) else image
            if not osf and blob is None:
                out.append({**base, "bad": Bad("image", "no image bytes in this row", qid)})
                continue
            out.append({**base, "question": raw.get("question"), "answer": raw.get("answer"),
                        "answer_type": raw.get("answer_type") if "answer_type" in raw
                        else "CLOSED" if is_yes_no(str(raw.get("answer"))) else "OPEN",
                        "content_type": raw.get("question_type"), "image_root": str(folder) if osf else None,
                        "img_name": raw.get("image_name") if osf else
                        f"vqarad-{hashlib.sha1(bytes(blob)).hexdigest()[:16]}",
                        "image_bytes": None if osf else bytes(blob),
                        "meta": {k: raw[k] for k in ("phrase_type", "image_organ", "qid_linked_id") if k in raw}})
    return out, str(target), ""


# ---------------------------------------------------------------- MILE instruction format
def _instruction(path: Path, split: str, images: Path | None) -> tuple:
    """MILE's instruction JSON: ``{img_name, qid, answer, question_pool: [prompt, ...]}`` per record.

    ``Record.prompts`` keeps the pool (see :class:`~mile_utils.data.transforms.VQADataset`), ``question`` is
    its first prompt; without ``answer_type``, CLOSED means a yes/no answer. Images are under ``images``
    (default: the file's folder, or its ``imgs/`` subfolder when there is one)."""
    if path.is_dir():
        path = _split_file(path, split)
    images = images or (path.parent / "imgs" if (path.parent / "imgs").is_dir() else path.parent)
    out = []
    for i, raw in _rows(path, _read_json_list(path)):
        pool = raw.get("question_pool")
        if "bad" not in raw and (not isinstance(pool, list) or not pool
                                 or not all(isinstance(p, str) and p.strip() for p in pool)):
            raw = {"bad": Bad("question_pool", "expected a non-empty list of prompt strings", raw.get("qid"))}
        elif "bad" not in raw:
            kind = raw.get("answer_type") or ("CLOSED" if is_yes_no(str(raw.get("answer"))) else "OPEN")
            raw = {**raw, "question": pool[0], "prompts": tuple(p.strip() for p in pool), "answer_type": kind}
        out.append({**raw, "file": str(path), "index": i, "image_root": str(images)})
    return out, str(path), ""


# ---------------------------------------------------------------- one entry point
def _load(dataset: str, split: str, *, root: str | Path | None = None, path: str | Path | None = None,
          size: int | str | None = None, seed: int = 0, skip_bad: bool = False, lang: str | None = "en",
          hub: bool | str = False, verify_images: bool = False) -> tuple[list[Record], list[dict], str, str]:
    key = {"vqarad": "vqa-rad"}.get(k := str(dataset).strip().lower().replace("_", "-"), k)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (--dataset / dataset=): expected one of {list(DATASETS)}")
    root_p = Path(root).expanduser() if root is not None else None
    path_p = Path(path).expanduser() if path is not None else None
    if key != "vqa-rad":
        split = normalize_split(split, SPLITS, key)
    if key == "synthetic":
        rows = _slake(synthetic_dir(size=size, seed=seed, cache_dir=root_p), split, key, "en")
    elif key == "slake" and (root_p or path_p):
        rows = _slake(root_p or path_p.parent, split, key, lang)  # type: ignore[union-attr]
    elif key == "slake" and hub:
        rows = _slake_hub(SLAKE_HUB_ID if hub is True else str(hub), split, lang)
    elif key == "vqa-rad" and (root_p or path_p):
        # images: --root when a file is given with --path, else next to the json
        rows = _vqa_rad(path_p or root_p, split, root_p if path_p else None)  # type: ignore[arg-type]
    elif key == "vqa-rad" and hub:
        rows = _vqa_rad(_hub_snapshot(VQA_RAD_HUB_ID if hub is True else str(hub), ["*.parquet"]), split, None)
    elif key == "instruction" and (root_p or path_p):
        rows = _instruction(path_p or root_p, split, root_p if path_p else None)  # type: ignore[arg-type]
    else:
        hub_hint = f", or --hub (python: hub=True) to download {SLAKE_HUB_ID}" if key == "slake" else \
            f", or --hub (python: hub=True) to download {VQA_RAD_HUB_ID}" if key == "vqa-rad" else ""
        raise FileNotFoundError(f"{key} needs a local copy: --root (python: root=...) for the dataset folder "
                                f"or --path (python: path=...) for its file{hub_hint}")
    split = split if key != "vqa-rad" else normalize_split(split, ("train", "test"), key)
    records, problems = collect(rows[0], dataset=key, split=split, source=rows[1], skip_bad=skip_bad,
                                verify=verify_images, empty_hint=rows[2],
                                names={"img_name": "image_name"} if key == "vqa-rad" else None)
    return records, problems, rows[1], key


def load_records(dataset: str = "synthetic", split: str = "train", **kwargs: Any) -> list[Record]:
    """Records of one split of ``dataset`` (``synthetic``, ``slake``, ``vqa-rad`` or ``instruction``).

    * ``synthetic``: generated (or read from the cache; ``root`` overrides the cache folder); ``size`` and
      ``seed`` choose the set.
    * ``slake``: ``root`` = the ``Slake1.0`` folder (``validate.json`` is the validation split); ``hub=True``
      (or a hub id) downloads ``BoKelvin/SLAKE``; ``lang`` keeps one language (None: all).
    * ``vqa-rad``: ``path`` = the OSF json or a hub parquet file/folder, or ``root`` = a folder with either;
      ``hub=True`` downloads ``flaviagiammarino/vqa-rad``. Splits train/test only.
    * ``instruction``: ``path`` = a MILE instruction JSON (or ``root`` with ``<split>.json``); images under
      ``root`` (default: next to the file).

    Bad records raise ValueError/FileNotFoundError naming file, position in the file, qid and field;
    ``skip_bad=True`` (CLI ``--skip-bad``) drops them with a warning that lists them. Image files are checked
    to exist; ``verify_images=True`` also decodes each one.
    """
    return _load(dataset, split, **kwargs)[0]


def summarize_dataset(dataset: str = "synthetic", split: str = "train", *, skip_bad: bool = False,
                      max_problems: int = 10, **kwargs: Any) -> dict[str, Any]:
    """Counts of one split (``load_records``'s arguments), every image decoded once to prove it readable:
    ``records, images, open, closed, yes_no, answers, content_types``, and how many records were skipped
    (``skip_bad=True``) with the first ``max_problems`` of them."""
    records, problems, source, key = _load(dataset, split, skip_bad=skip_bad, **kwargs)
    good: list[Record] = []
    decoded: dict[str, tuple[str, bool] | None] = {}  # img_name -> problem; each image decoded once
    for rec in records:
        if rec.img_name not in decoded:
            decoded[rec.img_name] = image_problem(rec.image_path, rec.image_bytes, verify=True)
        bad = decoded[rec.img_name]
        if bad is None:
            good.append(rec)
            continue
        file, index = rec.where or (source, None)
        problem = {"file": file, "index": index, "qid": rec.qid, "field": "img_name", "message": bad[0]}
        if not skip_bad:
            raise ValueError(f"{describe(problem)} (pass --skip-bad (python: skip_bad=True) to skip and list)")
        problems.append(problem)
    if not good:
        raise ValueError(f"{source}: split {split!r} has no record with a readable image")
    return {
        "dataset": key, "split": good[0].split, "source": source, "records": len(good),
        "images": len({r.img_name for r in good}),
        "open": sum(r.answer_type == "OPEN" for r in good), "closed": sum(r.is_closed for r in good),
        "yes_no": sum(r.is_yes_no for r in good), "answers": len({r.answer.lower() for r in good}),
        "content_types": dict(sorted(Counter(r.content_type for r in good).items())),
        "skipped": len(problems), "problems": problems[:max_problems],
    }
