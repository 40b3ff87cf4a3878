"""The built-in ``synthetic`` Med-VQA set: brain MRI slices from real anatomy with controlled findings.

Anatomy is the MNI152 (ICBM 2009a) T1 template and its grey/white-matter maps, which ``nilearn`` ships inside
its wheel, so nothing is downloaded. Each image is one slice (axial, coronal or sagittal) in T1 contrast or a
T2-like contrast computed from the tissue maps (CSF bright, white matter dark), with 0-2 round lesions whose
side, size and intensity are drawn at random. Questions follow SLAKE's mould (content types Plane, Modality,
Abnormality, Quantity, Position, Size, Color; OPEN and CLOSED, yes/no and "a or b" choices).

Design choices that make the set useful for the book:

* every answer is balanced within its question text (yes/no questions ask about the true value or a wrong one
  with probability 1/2; "a or b" choices shuffle the order), so a question-only model stays near chance;
* lesions are >= ~4 px across at 64 px and far brighter/darker than tissue, so a tiny model can see them;
* each image is drawn from its own seed ``(seed, index)``: a bigger set contains the smaller sets' images;
* left/right mean the patient's side, shown in radiological convention (patient's left on the image's right),
  as in SLAKE and VQA-RAD; sagittal slices get no left/right questions.

Files are written in the SLAKE folder layout (``imgs/<img_name>``, ``train.json``, ``validation.json``,
``test.json``), plus ``meta.json`` (the ground-truth attributes per image) and ``manifest.json`` (sizes and a
SHA-256 per file), into a cache folder; a folder is only visible once complete (written aside, then renamed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

GENERATOR_VERSION = 1
SIZES = {"full": 700, "small": 160}  # full: about SLAKE English question counts (4,919 train, 1,061 test)
MIN_IMAGES = 6  # at least one image in each of the three splits
SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15}  # test takes the rest
CANVAS = 128  # stored resolution; profiles resize (tiny 64 px, paper 480 px)
FOV_VOXELS = 200  # square field of view, in 1 mm template voxels
MIDLINE_X = 98  # template voxel index of x = 0 mm (affine offset -98)
BRAIN_CENTRE = (98, 117, 80)  # (x, y, z) voxel
PLANES = ("axial", "coronal", "sagittal")
MODALITIES = ("t1", "t2")
QUESTION_NAMES = {"t1": "T1", "t2": "T2"}
SLICE_RANGES = {"axial": (60, 125), "coronal": (50, 180), "sagittal": (35, 161)}
LESION_RADIUS = {"small": (3.6, 5.0), "large": (8.0, 10.5)}  # canvas pixels (x0.5 at 64 px)
LESION_VALUE = {"bright": (0.96, 1.0), "dark": (0.02, 0.07)}
KIND = {"bright": "tumor", "dark": "cyst"}  # the open abnormality answer names the appearance
COLOR = {"bright": "white", "dark": "black"}
P_VIEW_FAMILY = 0.67  # chance that each plane/modality question family is asked (keeps them from dominating)
P_LESION_FAMILY = 0.7  # chance that each lesion-only question family is asked about a lesion image


@dataclass(frozen=True)
class Scan:
    """Ground truth of one synthetic image (what its questions are about)."""

    index: int
    img_name: str
    plane: str
    modality: str
    slice_index: int
    count: int
    side: str | None  # patient's side of the lesions; None when no lesion or sagittal
    size: str | None
    intensity: str | None
    lesions: tuple[tuple[float, float, float], ...]  # (row, col, radius) on the 128 px canvas

    @property
    def kind(self) -> str:
        return KIND[self.intensity] if self.intensity else "none"


# ---------------------------------------------------------------- anatomy
def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the synthetic dataset needs nilearn (it ships the MNI152 template): pip install nilearn"
        )
    return Path(spec.origin).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def _volumes() -> dict[str, np.ndarray]:
    """T1 template, grey and white matter maps at 1 mm, as float32 in [0, 1]; read from nilearn's wheel."""
    import nibabel as nib  # nilearn's dependency; importing nibabel alone avoids nilearn's slow import

    out = {}
    for key in ("t1", "gm", "wm"):
        path = _nilearn_data_dir() / f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"MNI152 template file {path} not found: this nilearn version does not "
                "ship it (nilearn >= 0.10 does)"
            )
        out[key] = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32) / 255.0
    return out


def _take(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A slice as displayed: superior/anterior up, radiological left-right, sagittal anterior on the left."""
    s = {"axial": vol[:, :, index], "coronal": vol[:, index, :], "sagittal": vol[index, :, :]}[plane]
    return np.ascontiguousarray(s[::-1, ::-1].T)


def _contrast_slice(plane: str, index: int, modality: str) -> np.ndarray:
    vols = _volumes()
    t1 = _take(vols["t1"], plane, index)
    if modality == "t1":
        return t1
    gm, wm = _take(vols["gm"], plane, index), _take(vols["wm"], plane, index)
    brain = (t1 > 0.02).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    # T2-like: fluid bright, grey matter mid, white matter dark (the inverse ordering of T1)
    return np.clip(0.95 * csf + 0.55 * gm + 0.28 * wm, 0.0, 1.0) * brain


def _centre_in_display(plane: str) -> tuple[float, float]:
    x, y, z = BRAIN_CENTRE
    dims = _volumes()["t1"].shape
    row_col = {
        "axial": (dims[1] - 1 - y, dims[0] - 1 - x),
        "coronal": (dims[2] - 1 - z, dims[0] - 1 - x),
        "sagittal": (dims[2] - 1 - z, dims[1] - 1 - y),
    }
    return row_col[plane]


# ---------------------------------------------------------------- images
def _disc_alpha(
    shape: tuple[int, int], row: float, col: float, radius: float, stretch: float, angle: float
) -> np.ndarray:
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dr, dc = rr - row, cc - col
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (ca * dr + sa * dc) * stretch, (-sa * dr + ca * dc) / stretch
    dist = np.sqrt(u * u + v * v)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)  # anti-aliased edge


def _render(index: int, seed: int) -> tuple[Scan, np.ndarray]:
    """Draw one image's attributes and pixels from its own generator (``seed``, ``index``)."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    plane = PLANES[int(rng.integers(3))]
    modality = MODALITIES[int(rng.integers(2))]
    count = (0, 0, 1, 2)[int(rng.integers(4))]  # half the images are normal
    side = ("left", "right")[int(rng.integers(2))] if count else None
    size = ("small", "large")[int(rng.integers(2))] if count else None
    intensity = ("bright", "dark")[int(rng.integers(2))] if count else None
    centre_r, centre_c = _centre_in_display(plane)
    dims = _volumes()["t1"].shape
    for _attempt in range(50):
        lo, hi = SLICE_RANGES[plane]
        index_3d = int(rng.integers(lo, hi + 1))
        if plane == "sagittal" and abs(index_3d - MIDLINE_X) < 8:
            continue  # the midline slice is mostly falx and CSF
        zoom = float(rng.uniform(0.92, 1.08))
        step = FOV_VOXELS / CANVAS / zoom
        shift = rng.uniform(-5, 5, size=2) * step
        origin = (centre_r - step * CANVAS / 2 + shift[0], centre_c - step * CANVAS / 2 + shift[1])
        img = ndimage.affine_transform(
            _contrast_slice(plane, index_3d, modality),
            np.diag([step, step]),
            offset=origin,
            output_shape=(CANVAS, CANVAS),
            order=1,
            cval=0.0,
        )
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
    for row, col, radius in lesions:
        alpha = _disc_alpha(
            img.shape, row, col, radius, float(rng.uniform(0.8, 1.25)), float(rng.uniform(0, np.pi))
        )
        value = rng.uniform(*LESION_VALUE[intensity]) + rng.normal(0, 0.02, img.shape)  # type: ignore[misc]
        img = img * (1 - alpha) + value * alpha
    img = img + rng.normal(0, 0.015, img.shape) * (img > 0.02)  # scanner noise, inside the head only
    pixels = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    scan = Scan(
        index=index,
        img_name=f"syn{index:05d}.png",
        plane=plane,
        modality=modality,
        slice_index=index_3d,
        count=count,
        side=side if plane != "sagittal" else None,
        size=size,
        intensity=intensity,
        lesions=tuple((float(r), float(c), float(d)) for r, c, d in lesions),
    )
    return scan, pixels


def _place_lesions(
    rng: np.random.Generator,
    brain: np.ndarray,
    count: int,
    size: str | None,
    side: str | None,
    midline_col: float,
) -> list[tuple[float, float, float]] | None:
    """Lesion centres well inside the brain, on the patient's ``side`` (image right = patient left)."""
    from scipy import ndimage

    if count == 0:
        return []
    depth = ndimage.distance_transform_edt(brain)
    radii = [float(rng.uniform(*LESION_RADIUS[size])) for _ in range(count)]  # type: ignore[index]
    cols = np.arange(brain.shape[1])[None, :]
    placed: list[tuple[float, float, float]] = []
    for radius in radii:
        ok = depth > radius * 1.25 + 2
        if side == "left":
            ok &= cols > midline_col + radius + 3
        elif side == "right":
            ok &= cols < midline_col - radius - 3
        for row, col, r in placed:  # keep lesions apart so they can be counted
            rr, cc = np.ogrid[0 : brain.shape[0], 0 : brain.shape[1]]
            ok &= (rr - row) ** 2 + (cc - col) ** 2 > (r + radius + 4) ** 2
        candidates = np.argwhere(ok)
        if len(candidates) == 0:
            return None
        row, col = candidates[int(rng.integers(len(candidates)))]
        placed.append((float(row), float(col), radius))
    return placed


# ---------------------------------------------------------------- questions
QA = tuple[str, str, str, str]  # question, answer, answer_type, content_type
_ARTICLE = {"axial": "an axial", "coronal": "a coronal", "sagittal": "a sagittal"}


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _other(rng: np.random.Generator, values: tuple[str, ...], value: str) -> str:
    return _pick(rng, [v for v in values if v != value])


def _asked(rng: np.random.Generator, values: tuple[str, ...], truth: str) -> tuple[str, str]:
    """The value a yes/no question names: the true one (yes) or a wrong one (no), each with p = 1/2."""
    if rng.random() < 0.5:
        return truth, "yes"
    return _other(rng, values, truth), "no"


def _pair(rng: np.random.Generator, values: tuple[str, ...], truth: str) -> tuple[str, str]:
    """The two options of an "a or b" question, in random order so the order says nothing."""
    pair = [truth, _other(rng, values, truth)]
    if rng.random() < 0.5:
        pair.reverse()
    return pair[0], pair[1]


def _plane_open(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(
        rng,
        (
            "Which plane is this image taken in?",
            "In which plane is this image scanned?",
            "What is the scanning plane of this image?",
        ),
    )
    return q, s.plane, "OPEN", "Plane"


def _plane_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    p, ans = _asked(rng, PLANES, s.plane)
    q = _pick(rng, (f"Is this {_ARTICLE[p]} image?", f"Is this image taken in the {p} plane?"))
    return q, ans, "CLOSED", "Plane"


def _plane_choice(s: Scan, rng: np.random.Generator) -> QA:
    a, b = _pair(rng, PLANES, s.plane)
    q = _pick(rng, (f"Is this image in the {a} or {b} plane?", f"Which plane is this, {a} or {b}?"))
    return q, s.plane, "CLOSED", "Plane"


def _modality_open(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(
        rng,
        (
            "What is the MRI weighting of this image?",
            "Which MRI sequence is used for this image?",
            "What kind of MRI image is this?",
        ),
    )
    return q, s.modality, "OPEN", "Modality"


def _modality_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    m, ans = _asked(rng, MODALITIES, s.modality)
    q = _pick(
        rng,
        (f"Is this a {QUESTION_NAMES[m]} weighted image?", f"Is this image {QUESTION_NAMES[m]} weighted?"),
    )
    return q, ans, "CLOSED", "Modality"


def _modality_choice(s: Scan, rng: np.random.Generator) -> QA:
    a, b = (QUESTION_NAMES[m] for m in _pair(rng, MODALITIES, s.modality))
    q = _pick(rng, (f"Is this a {a} or {b} weighted image?", f"Is this image {a} or {b} weighted?"))
    return q, s.modality, "CLOSED", "Modality"


def _abnormal_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    q, when_abnormal = (
        ("Is there a lesion in this image?", "yes"),
        ("Does this brain look abnormal?", "yes"),
        ("Does this brain look normal?", "no"),
        ("Is the brain healthy?", "no"),
    )[int(rng.integers(4))]
    ans = when_abnormal if s.count else ("no" if when_abnormal == "yes" else "yes")
    return q, ans, "CLOSED", "Abnormality"


def _abnormal_open(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(
        rng,
        (
            "What abnormality is seen in this image?",
            "What is the main finding in this brain?",
            "What disease is shown in this image?",
        ),
    )
    return q, s.kind, "OPEN", "Abnormality"


def _count_open(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(
        rng,
        (
            "How many lesions are in this image?",
            "How many lesions are there?",
            "What is the number of lesions?",
        ),
    )
    return q, str(s.count), "OPEN", "Quantity"


def _count_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(rng, ("Is there more than one lesion?", "Are there multiple lesions?"))
    return q, "yes" if s.count > 1 else "no", "CLOSED", "Quantity"


def _position_open(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(
        rng,
        ("Where is the lesion located?", "Where is the abnormality?", "Which part of the brain is abnormal?"),
    )
    return q, f"{s.side} hemisphere", "OPEN", "Position"


def _position_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    side, ans = _asked(rng, ("left", "right"), s.side or "")
    q = _pick(
        rng,
        (f"Is the lesion on the {side} side of the brain?", f"Is the abnormality in the {side} hemisphere?"),
    )
    return q, ans, "CLOSED", "Position"


def _position_choice(s: Scan, rng: np.random.Generator) -> QA:
    a, b = _pair(rng, ("left", "right"), s.side or "")
    return f"Is the lesion in the {a} or {b} hemisphere?", s.side or "", "CLOSED", "Position"


def _size_open(s: Scan, rng: np.random.Generator) -> QA:
    return (
        _pick(rng, ("How large is the lesion?", "What is the size of the lesion?")),
        s.size or "",
        "OPEN",
        "Size",
    )


def _size_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    size, ans = _asked(rng, ("small", "large"), s.size or "")
    return f"Is the lesion {size}?", ans, "CLOSED", "Size"


def _size_choice(s: Scan, rng: np.random.Generator) -> QA:
    a, b = _pair(rng, ("small", "large"), s.size or "")
    return f"Is the lesion {a} or {b}?", s.size or "", "CLOSED", "Size"


def _color_open(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(rng, ("What color is the lesion?", "What color does the lesion have?"))
    return q, COLOR[s.intensity or "bright"], "OPEN", "Color"


def _color_yes_no(s: Scan, rng: np.random.Generator) -> QA:
    q = _pick(rng, ("Is the lesion hyperintense?", "Is the lesion hypointense?"))
    when_bright = "yes" if "hyper" in q else "no"
    ans = when_bright if s.intensity == "bright" else ("no" if when_bright == "yes" else "yes")
    return q, ans, "CLOSED", "Color"


def _color_choice(s: Scan, rng: np.random.Generator) -> QA:
    a, b = _pair(rng, ("bright", "dark"), s.intensity or "")
    return f"Is the lesion {a} or {b}?", s.intensity or "", "CLOSED", "Color"


Family = Callable[[Scan, np.random.Generator], QA]
# Whether a family is asked never depends on its answer, so answers stay balanced within each question text.
# asked about every image, each with probability P_VIEW_FAMILY
VIEW_FAMILIES: tuple[Family, ...] = (
    _plane_open,
    _plane_yes_no,
    _plane_choice,
    _modality_open,
    _modality_yes_no,
    _modality_choice,
)
# asked about every image (half the images are normal, so these are balanced too)
CORE_FAMILIES: tuple[Family, ...] = (
    _abnormal_yes_no,
    _abnormal_open,
    _count_open,
)
# asked, each with probability P_LESION_FAMILY, only about images with lesions (as SLAKE asks about findings)
LESION_FAMILIES: tuple[Family, ...] = (
    _count_yes_no,
    _size_open,
    _size_yes_no,
    _size_choice,
    _color_open,
    _color_yes_no,
    _color_choice,
)
SIDED_FAMILIES: tuple[Family, ...] = (_position_open, _position_yes_no, _position_choice)


def _questions(scan: Scan, seed: int) -> list[QA]:
    rng = np.random.default_rng([seed, scan.index, GENERATOR_VERSION, 1])
    families = [f for f in VIEW_FAMILIES if rng.random() < P_VIEW_FAMILY] + list(CORE_FAMILIES)
    if scan.count:
        optional = LESION_FAMILIES + (SIDED_FAMILIES if scan.side else ())
        families += [f for f in optional if rng.random() < P_LESION_FAMILY]
    return [family(scan, rng) for family in families]


# ---------------------------------------------------------------- the set on disk
def parse_size(size: int | str | None) -> int:
    """``None``/``"full"`` -> 700 images, ``"small"`` -> 160, or a number of images (at least 6)."""
    if size is None:
        return SIZES["full"]
    if isinstance(size, str) and size.strip().lower() in SIZES:
        return SIZES[size.strip().lower()]
    try:
        n = int(size)
    except (TypeError, ValueError):
        raise ValueError(f"synthetic size {size!r}: expected 'full', 'small' or a number of images") from None
    if n < MIN_IMAGES:
        raise ValueError(f"synthetic size {n}: need at least {MIN_IMAGES} images (one per split)")
    return n


def split_of(n_images: int, seed: int) -> dict[int, str]:
    """Image index -> split; whole images go to one split, so no image is shared between train and test."""
    order = np.random.default_rng([seed, n_images, GENERATOR_VERSION, 2]).permutation(n_images)
    n_train = max(1, round(SPLIT_FRACTIONS["train"] * n_images))
    n_val = max(1, round(SPLIT_FRACTIONS["validation"] * n_images))
    n_train = min(n_train, n_images - n_val - 1)
    return {
        int(i): ("train" if k < n_train else "validation" if k < n_train + n_val else "test")
        for k, i in enumerate(order)
    }


def default_cache_dir() -> Path:
    """``$MILE_DATA_DIR`` if set, else ``~/.cache/mile_book``."""
    env = os.environ.get("MILE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mile_book"


def cache_key(n_images: int, seed: int) -> str:
    spec = json.dumps({"version": GENERATOR_VERSION, "n_images": n_images, "seed": seed}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def generate_synthetic(out_dir: str | Path, *, size: int | str | None = None, seed: int = 0) -> Path:
    """Write the set into ``out_dir`` (created; must not exist or be empty) and return it."""
    n_images = parse_size(size)
    out = Path(out_dir)
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    splits = split_of(n_images, seed)
    per_split: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    meta: list[dict[str, Any]] = []
    for index in range(n_images):
        scan, pixels = _render(index, seed)
        # compress_level fixed and no optimisation pass: identical bytes for identical pixels
        Image.fromarray(pixels, mode="L").save(out / "imgs" / scan.img_name, format="PNG", compress_level=6)
        split = splits[index]
        meta.append({**asdict(scan), "split": split, "kind": scan.kind})
        for k, (question, answer, answer_type, content_type) in enumerate(_questions(scan, seed)):
            per_split[split].append(
                {
                    "img_id": index,
                    "img_name": scan.img_name,
                    "question": question,
                    "answer": answer,
                    "q_lang": "en",
                    "location": "Brain",
                    "modality": "MRI",
                    "answer_type": answer_type,
                    "base_type": "vqa",
                    "content_type": content_type,
                    "qid": index * 100 + k,
                }
            )
    files = {f"{name}.json": rows for name, rows in per_split.items()}
    files["meta.json"] = meta  # type: ignore[assignment]
    for name, rows in files.items():
        (out / name).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    digests = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_images": n_images,
        "questions": {k: len(v) for k, v in per_split.items()},
        "images": {k: sum(1 for s in splits.values() if s == k) for k in per_split},
        "sha256": digests,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


def synthetic_dir(size: int | str | None = None, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The cached set's folder, generating it first if needed (a few seconds for the full set).

    The folder name carries a hash of (generator version, size, seed). Generation happens in a temporary
    sibling that is renamed into place, so an interrupted or concurrent run never leaves a half-written set.
    """
    n_images = parse_size(size)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = base / f"synthetic-{cache_key(n_images, seed)}"
    if (final / "manifest.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=base))
    try:
        generate_synthetic(tmp, size=n_images, seed=seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            # another process finished the same set first; its bytes are identical, keep it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def scan_meta(root: str | Path) -> dict[str, dict[str, Any]]:
    """Ground-truth attributes per ``img_name`` of a generated set (for plots and sanity checks)."""
    rows = json.loads((Path(root) / "meta.json").read_text(encoding="utf-8"))
    return {row["img_name"]: row for row in rows}


def fingerprint(root: str | Path) -> str:
    """One SHA-256 over every file of a generated set: equal fingerprints, equal bytes."""
    manifest = json.loads((Path(root) / "manifest.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(manifest["sha256"], sort_keys=True).encode()).hexdigest()
