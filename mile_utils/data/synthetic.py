"""The built-in ``synthetic`` Med-VQA set: brain MRI slices of real anatomy (nilearn's MNI152 template and tissue maps),
T1 or T2-like, with 0-2 lesions; questions in SLAKE's mould, answers balanced per question text (a question-only model
stays near chance). Each image has its own seed ``(seed, index)``, so a bigger set holds the smaller ones' images."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import atomic_folder

GENERATOR_VERSION = 1
SIZES = {"full": 700, "small": 160}  # full: about SLAKE English question counts (4,919 train, 1,061 test)
# the pretraining variant never asks these open forms, so their answers are new to a model pretrained on it
UNASKED = {("Abnormality", "open"), ("Modality", "open"), ("Color", "open"), ("Position", "open")}
MIN_IMAGES = 6  # at least one image in each of the three splits
CANVAS = 128  # stored resolution; profiles resize (tiny 64 px, paper 480 px)
FOV_VOXELS = 200  # square field of view, in 1 mm template voxels
MIDLINE_X = 98  # template voxel index of x = 0 mm (affine offset -98)
BRAIN_CENTRE = (98, 117, 80)  # (x, y, z) voxel
PLANES = ("axial", "coronal", "sagittal")
MODALITIES = ("t1", "t2")
SLICE_RANGES = {"axial": (60, 126), "coronal": (50, 181), "sagittal": (35, 162)}  # [low, high) voxel index
LESION_RADIUS = {"small": (3.6, 5.0), "large": (8.0, 10.5)}  # canvas pixels (x0.5 at 64 px)
LESION_VALUE = {"bright": (0.96, 1.0), "dark": (0.02, 0.07)}
KIND = {"bright": "tumor", "dark": "cyst"}  # the open abnormality answer names the appearance
COLOR = {"bright": "white", "dark": "black"}
P_VIEW_FAMILY = 0.67  # chance that each plane/modality question family is asked (keeps them from dominating)
P_LESION_FAMILY = 0.7  # chance that each lesion-only question family is asked about a lesion image


@lru_cache(maxsize=1)
def _volumes() -> dict[str, np.ndarray]:
    """T1 template, grey and white matter maps at 1 mm in [0, 1], from nilearn's wheel (a missing file, nilearn
    < 0.10, raises FileNotFoundError naming it); nibabel alone avoids nilearn's slow import."""
    import nibabel as nib
    folder = Path(importlib.util.find_spec("nilearn").origin).parent / "datasets" / "data"
    return {key: np.asarray(nib.load(folder / f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz").dataobj,
                            dtype=np.float32) / 255.0 for key in ("t1", "gm", "wm")}


def _slice(plane: str, index: int, modality: str) -> np.ndarray:
    """A slice as displayed (superior/anterior up, radiological left-right, sagittal anterior on the left), in T1
    or a T2-like contrast: fluid bright, grey matter mid, white matter dark (the inverse ordering of T1)."""
    take = {"axial": lambda v: v[:, :, index], "coronal": lambda v: v[:, index, :], "sagittal": lambda v: v[index]}
    t1, gm, wm = (np.ascontiguousarray(take[plane](vol)[::-1, ::-1].T) for vol in _volumes().values())
    if modality == "t1":
        return t1
    brain = (t1 > 0.02).astype(np.float32)
    return np.clip(0.95 * np.clip(brain - gm - wm, 0.0, 1.0) + 0.55 * gm + 0.28 * wm, 0.0, 1.0) * brain


def _render(index: int, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """One image's ground truth (``meta.json``'s fields) and pixels, from its own generator."""
    from scipy import ndimage
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    # drawn in this order (left to right); half the images are normal
    plane, modality, count = PLANES[int(rng.integers(3))], MODALITIES[int(rng.integers(2))], (0, 0, 1, 2)[
        int(rng.integers(4))]
    side, size, intensity = [pair[int(rng.integers(2))] if count else None for pair in (
        ("left", "right"), ("small", "large"), ("bright", "dark"))]
    x, y, z = BRAIN_CENTRE
    dims = _volumes()["t1"].shape
    centre_r, centre_c = {"axial": (dims[1] - 1 - y, dims[0] - 1 - x), "coronal": (dims[2] - 1 - z, dims[0] - 1 - x),
                          "sagittal": (dims[2] - 1 - z, dims[1] - 1 - y)}[plane]
    for _attempt in range(50):
        index_3d = int(rng.integers(*SLICE_RANGES[plane]))
        if plane == "sagittal" and abs(index_3d - MIDLINE_X) < 8:
            continue  # the midline slice is mostly falx and CSF
        step = FOV_VOXELS / CANVAS / float(rng.uniform(0.92, 1.08))
        shift = rng.uniform(-5, 5, size=2) * step
        origin = (centre_r - step * CANVAS / 2 + shift[0], centre_c - step * CANVAS / 2 + shift[1])
        img = ndimage.affine_transform(_slice(plane, index_3d, modality), np.diag([step, step]),
                                       offset=origin, output_shape=(CANVAS, CANVAS), order=1, cval=0.0)
        brain = img > 0.08
        if brain.mean() < 0.15:
            continue  # too little brain to hold lesions and to look like a scan
        midline_col = (dims[0] - 1 - MIDLINE_X - origin[1]) / step
        lesions = _place_lesions(rng, brain, count, size, side if plane != "sagittal" else None, midline_col)
        if lesions is not None:
            break
    else:
        raise RuntimeError(f"synthetic image {index} (seed {seed}): found no slice that fits its lesions")
    img = np.clip(img * rng.uniform(0.9, 1.1), 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    rr, cc = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    for row, col, radius in lesions:  # an ellipse with an anti-aliased edge
        stretch, angle = float(rng.uniform(0.8, 1.25)), float(rng.uniform(0, np.pi))
        dr, dc, ca, sa = rr - row, cc - col, np.cos(angle), np.sin(angle)
        u, v = (ca * dr + sa * dc) * stretch, (-sa * dr + ca * dc) / stretch
        alpha = np.clip(radius + 0.5 - np.sqrt(u * u + v * v), 0.0, 1.0)
        value = rng.uniform(*LESION_VALUE[intensity]) + rng.normal(0, 0.02, img.shape)  # type: ignore[misc]
        img = img * (1 - alpha) + value * alpha
    img = img + rng.normal(0, 0.015, img.shape) * (img > 0.02)  # scanner noise, inside the head only
    pixels = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    # key order is meta.json's; side None when no lesion or sagittal
    scan = {"index": index, "img_name": f"syn{index:05d}.png", "plane": plane, "modality": modality,
            "slice_index": index_3d, "count": count, "side": side if plane != "sagittal" else None, "size": size,
            "intensity": intensity, "lesions": [[float(r), float(c), float(d)] for r, c, d in lesions]}
    return scan, pixels


def _place_lesions(rng: np.random.Generator, brain: np.ndarray, count: int, size: str | None,
                   side: str | None, midline_col: float) -> list[tuple[float, float, float]] | None:
    """Lesion centres well inside the brain, on the patient's ``side`` (image right = patient left)."""
    from scipy import ndimage
    depth, (rr, cc) = ndimage.distance_transform_edt(brain), np.ogrid[0 : brain.shape[0], 0 : brain.shape[1]]
    placed: list[tuple[float, float, float]] = []
    for radius in [float(rng.uniform(*LESION_RADIUS[size])) for _ in range(count)]:  # type: ignore[index]
        ok = depth > radius * 1.25 + 2
        if side:
            ok &= cc > midline_col + radius + 3 if side == "left" else cc < midline_col - radius - 3
        for row, col, r in placed:  # keep lesions apart so they can be counted
            ok &= (rr - row) ** 2 + (cc - col) ** 2 > (r + radius + 4) ** 2
        if not (candidates := np.argwhere(ok)).size:
            return None
        row, col = candidates[int(rng.integers(len(candidates)))]
        placed.append((float(row), float(col), radius))
    return placed


# One row per question family: group, content type, kind, fact, templates ("|" between them). Kinds: open (the
# answer is the fact), ask (yes/no naming the true value or a wrong one, p = 1/2 each), pair ("a or b", order
# shuffled), check (yes/no; each template names, after "=", the fact's value that makes the answer yes).
# Groups: view families asked with probability P_VIEW_FAMILY, core ones always, lesion (and sided, when lesions
# have a side) ones with probability P_LESION_FAMILY about images with lesions, as SLAKE asks about findings.
# Whether a family is asked never depends on its answer (answers stay balanced per question). Row order and the
# draws in _questions are the generator's (GENERATOR_VERSION 1): changing them changes the data.
FAMILIES = [row.split(maxsplit=4) for row in re.sub(r"\|\n\s*", "|", """
view Plane open plane Which plane is this image taken in?|In which plane is this image scanned?|
    What is the scanning plane of this image?
view Plane ask plane Is this {art} image?|Is this image taken in the {v} plane?
view Plane pair plane Is this image in the {a} or {b} plane?|Which plane is this, {a} or {b}?
view Modality open modality What is the MRI weighting of this image?|Which MRI sequence is used for this image?|
    What kind of MRI image is this?
view Modality ask modality Is this a {V} weighted image?|Is this image {V} weighted?
view Modality pair modality Is this a {A} or {B} weighted image?|Is this image {A} or {B} weighted?
core Abnormality check abnormal Is there a lesion in this image?=abnormal|Does this brain look abnormal?=abnormal|
    Does this brain look normal?=normal|Is the brain healthy?=normal
core Abnormality open kind What abnormality is seen in this image?|What is the main finding in this brain?|
    What disease is shown in this image?
core Quantity open count How many lesions are in this image?|How many lesions are there?|What is the number of lesions?
lesion Quantity check multiple Is there more than one lesion?=yes|Are there multiple lesions?=yes
lesion Size open size How large is the lesion?|What is the size of the lesion?
lesion Size ask size Is the lesion {v}?
lesion Size pair size Is the lesion {a} or {b}?
lesion Color open color What color is the lesion?|What color does the lesion have?
lesion Color check intensity Is the lesion hyperintense?=bright|Is the lesion hypointense?=dark
lesion Color pair intensity Is the lesion {a} or {b}?
sided Position open hemisphere Where is the lesion located?|Where is the abnormality?|
    Which part of the brain is abnormal?
sided Position ask side Is the lesion on the {v} side of the brain?|Is the abnormality in the {v} hemisphere?
sided Position pair side Is the lesion in the {a} or {b} hemisphere?
""").strip().splitlines()]
VALUES = {"plane": PLANES, "modality": MODALITIES, "size": ("small", "large"), "intensity": ("bright", "dark"),
          "side": ("left", "right")}
SAY = {"t1": "T1", "t2": "T2", "axial": "an axial", "coronal": "a coronal", "sagittal": "a sagittal"}


def _questions(scan: dict[str, Any], seed: int, variant: str = "") -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, content_type) of an image; ``pretraining`` drops UNASKED ones after all draws."""
    rng = np.random.default_rng([seed, scan["index"], GENERATOR_VERSION, 1])

    def pick(options: list[str]) -> str:  # a single option costs no draw
        return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
    count, side, intensity = scan["count"], scan["side"], scan["intensity"]
    facts = {"plane": scan["plane"], "modality": scan["modality"], "kind": scan["kind"], "count": str(count),
             "abnormal": "abnormal" if count else "normal", "multiple": "yes" if count > 1 else "no",
             "size": scan["size"] or "", "intensity": intensity or "", "color": COLOR[intensity or "bright"],
             "side": side or "", "hemisphere": f"{side} hemisphere"}
    chosen = [f for f in FAMILIES if f[0] == "core" or (f[0] == "view" and rng.random() < P_VIEW_FAMILY)
              or (f[0] in ("lesion", "sided") and count and (f[0] == "lesion" or side)
                  and rng.random() < P_LESION_FAMILY)]
    out = []
    for _, content_type, kind, fact, templates in chosen:
        truth = answer = facts[fact]
        others = [v for v in VALUES.get(fact, ()) if v != truth]
        a = b = truth
        if kind == "ask":
            a, answer = (truth, "yes") if rng.random() < 0.5 else (pick(others), "no")
        elif kind == "pair":
            b = pick(others)
            if rng.random() < 0.5:
                a, b = b, a
        question = pick(templates.split("|"))
        if kind == "check":
            question, value = question.split("=")
            answer = "yes" if truth == value else "no"
        question = question.format(v=a, art=SAY.get(a), V=SAY.get(a, a), a=a, b=b, A=SAY.get(a, a), B=SAY.get(b, b))
        if not (variant == "pretraining" and (content_type, kind) in UNASKED):
            out.append((question, answer, "OPEN" if kind == "open" else "CLOSED", content_type))
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("MILE_DATA_DIR") or Path.home() / ".cache" / "mile_book").expanduser()


def _write(out: Path, n_images: int, variant: str, seed: int) -> None:
    """SLAKE's layout plus ``meta.json`` (ground truth per image) and ``manifest.json`` (counts, SHA-256 per file)."""
    (out / "imgs").mkdir()
    # whole images go to one split (70 / 15 / 15 %), so no image is shared between train and test
    order = np.random.default_rng([seed, n_images, GENERATOR_VERSION, 2]).permutation(n_images)
    n_val = max(1, round(0.15 * n_images))
    n_train = min(max(1, round(0.70 * n_images)), n_images - n_val - 1)
    splits = {int(i): "train" if k < n_train else "validation" if k < n_train + n_val else "test"
              for k, i in enumerate(order)}
    per_split, meta = {"train": [], "validation": [], "test": []}, []  # type: ignore[var-annotated]
    for index in range(n_images):
        scan, pixels = _render(index, seed)
        # compress_level fixed and no optimisation pass: identical bytes for identical pixels
        Image.fromarray(pixels, mode="L").save(out / "imgs" / scan["img_name"], format="PNG", compress_level=6)
        meta.append({**scan, "split": splits[index], "kind": KIND.get(scan["intensity"], "none")})
        for k, (question, answer, answer_type, content_type) in enumerate(_questions(meta[-1], seed, variant)):
            per_split[splits[index]].append({
                "img_id": index, "img_name": scan["img_name"], "question": question, "answer": answer, "q_lang": "en",
                "location": "Brain", "modality": "MRI", "answer_type": answer_type, "base_type": "vqa",
                "content_type": content_type, "qid": index * 100 + k})
    for name, rows in {**per_split, "meta": meta}.items():
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    digests = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_images": n_images,
                **({"variant": variant} if variant else {}), "questions": {k: len(v) for k, v in per_split.items()},
                "images": {k: sum(1 for s in splits.values() if s == k) for k in per_split}, "sha256": digests}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def synthetic_dir(size: int | str | None = None, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The set's folder in ``cache_dir`` ($MILE_DATA_DIR, ~/.cache/mile_book) named by its settings; made atomically.
    ``size``: ``None``/``"full"`` -> 700 images, ``"small"`` -> 160, or a number (at least 6), each optionally as the
    ``"pretraining:<size>"`` variant (``"pretraining"`` = 700 images); the chapters' set is the plain one."""
    variant, _, key = ("full" if size is None else str(size).strip().lower()).rpartition(":")
    variant, key = ("pretraining", "full") if key == "pretraining" and not variant else (variant, key)
    n_images = SIZES[key] if key in SIZES else int(key) if key.isdigit() else None
    if n_images is None or n_images < MIN_IMAGES or variant not in ("", "pretraining"):
        raise ValueError(f"synthetic size {size!r} (--size / size=): expected 'full', 'small' or a number of "
                         f"images, at least {MIN_IMAGES} (one per split), optionally as 'pretraining:<size>'")
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    spec = json.dumps({"version": GENERATOR_VERSION, "n_images": n_images, "seed": seed,
                       **({"variant": variant} if variant else {})}, sort_keys=True)
    final = base / f"synthetic-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if (final / "manifest.json").is_file():
        return final
    # another process may finish the same set first: its bytes are identical, so either copy will do
    return atomic_folder(final, lambda tmp: _write(tmp, n_images, variant, seed), done="manifest.json")
