"""Data: the built-in set (determinism, splits, balance), loaders in the official layouts, bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mile_utils.data import ImageTransform, Record, VQADataset, load_records, summarize_dataset, synthetic_dir
from mile_utils.data.records import CLIP_MEAN, CLIP_STD
from mile_utils.data.synthetic import UNASKED
from mile_utils.metrics import majority_baseline, question_only_baseline


def png_bytes(value: int = 128, size: int = 16, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_dir(size="small", seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def test_synthetic_same_seed_same_bytes(tmp_path: Path) -> None:
    a = synthetic_dir(size=8, seed=3, cache_dir=tmp_path / "a")
    b = synthetic_dir(size=8, seed=3, cache_dir=tmp_path / "b")
    c = synthetic_dir(size=8, seed=4, cache_dir=tmp_path / "c")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
    assert (a / "imgs" / "syn00000.png").read_bytes() != (c / "imgs" / "syn00000.png").read_bytes()


def scan_meta(root: Path) -> dict[str, dict]:
    return {row["img_name"]: row for row in json.loads((root / "meta.json").read_text(encoding="utf-8"))}


def test_synthetic_cache_is_reused_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILE_DATA_DIR", str(tmp_path))
    first = synthetic_dir(size=6, seed=1)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert first.parent == tmp_path and first.name.startswith("synthetic-")
    assert synthetic_dir(size=6, seed=1) == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
    recs = load_records("synthetic", "test", size=6, seed=1)
    assert recs and recs[0].image_path is not None and recs[0].image_path.is_file()


def test_synthetic_splits_fields_and_sizes(small_root: Path) -> None:
    splits = {s: load_records("synthetic", s, root=small_root.parent, size="small") for s in
              ("train", "validation", "test")}
    images = {s: {r.img_name for r in recs} for s, recs in splits.items()}
    assert not images["train"] & images["test"] and not images["train"] & images["validation"]
    assert sum(len(v) for v in images.values()) == 160
    manifest = json.loads((small_root / "manifest.json").read_text())
    assert manifest["images"] == {s: len(v) for s, v in images.items()}
    everything = [r for recs in splits.values() for r in recs]
    assert len({r.qid for r in everything}) == len(everything)
    assert {r.answer_type for r in everything} == {"OPEN", "CLOSED"}
    assert {r.content_type for r in everything} == {
        "Plane", "Modality", "Abnormality", "Quantity", "Position", "Size", "Color"}
    assert any(r.is_yes_no for r in everything)
    assert any(r.answer_type == "CLOSED" and not r.is_yes_no for r in everything)
    img = everything[0].load_image()
    assert img.mode == "RGB" and img.size == (128, 128)
    # answers agree with the ground truth the images were drawn from
    meta = scan_meta(small_root)
    for r in everything:
        m = meta[r.img_name]
        if r.content_type == "Plane" and r.answer_type == "OPEN":
            assert r.answer == m["plane"]
        if r.content_type == "Quantity" and r.answer_type == "OPEN":
            assert r.answer == str(m["count"]) == str(len(m["lesions"]))
        if r.content_type == "Position" and r.answer_type == "OPEN":
            assert r.answer == f"{m['side']} hemisphere" and m["plane"] != "sagittal"


def test_synthetic_not_solvable_from_the_question(small_root: Path) -> None:
    train = load_records("synthetic", "train", root=small_root.parent, size="small")
    test = load_records("synthetic", "test", root=small_root.parent, size="small")
    maj, qo = majority_baseline(train, test), question_only_baseline(train, test)
    assert maj["global"]["accuracy"] < 30
    # balanced answers per question text: text alone stays near chance (2-3 answers per question)
    assert qo["global"]["accuracy"] < 58 and qo["yes_no"]["closed"]["accuracy"] < 62


def test_synthetic_pretraining_variant_drops_only_the_unasked_forms(tmp_path: Path) -> None:
    """The stand-in's set: the same scans and draws, minus the open questions the chapters' set adds."""
    std, pre = (synthetic_dir(size=size, seed=2, cache_dir=tmp_path) for size in (12, "pretraining:12"))
    assert [p.read_bytes() for p in sorted((std / "imgs").iterdir())] == \
        [p.read_bytes() for p in sorted((pre / "imgs").iterdir())]
    for split in ("train", "validation", "test"):
        rows = {name: [(r["img_name"], r["question"], r["answer"], r["content_type"], r["answer_type"])
                       for r in json.loads((root / f"{split}.json").read_text())] for name, root in
                (("std", std), ("pre", pre))}
        unasked = [r for r in rows["std"] if r[4] == "OPEN" and (r[3], "open") in UNASKED]
        assert rows["pre"] == [r for r in rows["std"] if r not in unasked]
        assert split != "train" or unasked  # the forms exist in the chapters' set
    assert json.loads((pre / "manifest.json").read_text())["variant"] == "pretraining"
    assert "variant" not in json.loads((std / "manifest.json").read_text())


def test_synthetic_lesions_visible_at_64px(small_root: Path) -> None:
    # lesion pixels, after the tiny profile's resize, differ clearly from the image's tissue around them
    meta = scan_meta(small_root)
    with_lesions = [m for m in meta.values() if m["count"]][:20]
    assert with_lesions
    for m in with_lesions:
        img = np.asarray(Image.open(small_root / "imgs" / m["img_name"]).resize((64, 64), Image.BICUBIC),
                         dtype=float)
        row, col, radius = (v / 2 for v in m["lesions"][0])
        centre = img[int(round(row)), int(round(col))]
        assert radius >= 1.8
        if m["intensity"] == "bright":
            assert centre > 225
        else:
            assert centre < 40


def test_synthetic_bad_size() -> None:
    with pytest.raises(ValueError, match="at least 6"):
        load_records("synthetic", "train", size=3)
    with pytest.raises(ValueError, match="'full', 'small'"):
        load_records("synthetic", "train", size="huge")
    with pytest.raises(ValueError, match="pretraining:<size>"):
        load_records("synthetic", "train", size="finetuning:24")


# ---------------------------------------------------------------- SLAKE folder
def make_slake(root: Path) -> Path:
    """The official ``Slake1.0`` layout: train.json, validate.json, test.json and imgs/xmlab<N>/source.jpg."""
    base = root / "Slake1.0"
    for name in ("xmlab0", "xmlab1"):
        (base / "imgs" / name).mkdir(parents=True)
        Image.new("L", (20, 20), 90).save(base / "imgs" / name / "source.jpg")
    row = {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "Is this a CT?", "answer": "Yes",
           "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
           "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 1}
    train = [row,
             {**row, "qid": 2, "question": "这是CT吗?", "answer": "是", "q_lang": "zh"},
             {**row, "qid": 3, "img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Lung",
              "answer_type": "OPEN", "content_type": "Organ"}]
    (base / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (base / "validate.json").write_text(json.dumps([{**row, "qid": 10}]), encoding="utf-8")
    (base / "test.json").write_text(json.dumps([{**row, "qid": 20, "q_lang": "zh"}]), encoding="utf-8")
    return base


def test_slake_folder(tmp_path: Path) -> None:
    base = make_slake(tmp_path)
    recs = load_records("slake", "train", root=base)
    assert [r.qid for r in recs] == [1, 3]  # English only by default
    r = recs[0]
    assert (r.img_name, r.answer, r.answer_type, r.content_type, r.q_lang) == (
        "xmlab0/source.jpg", "Yes", "CLOSED", "Modality", "en")
    assert r.load_image().mode == "RGB"
    assert len(load_records("slake", "train", root=tmp_path, lang=None)) == 3  # parent folder works too
    # the official validate.json is the validation split, under every alias
    for alias in ("validation", "validate", "val", "valid", "dev", "Validate"):
        recs = load_records("slake", alias, root=base)
        assert [(r.qid, r.split) for r in recs] == [(10, "validation")]
    assert summarize_dataset("slake", "validate", root=base)["split"] == "validation"
    with pytest.raises(ValueError, match="test.*no usable records.*q_lang"):
        load_records("slake", "test", root=base)
    with pytest.raises(ValueError, match="unknown split 'dev2'.*--split"):
        load_records("slake", "dev2", root=base)
    with pytest.raises(FileNotFoundError, match="--root.*root=.*--hub.*hub=True"):
        load_records("slake")
    (base / "validate.json").unlink()
    with pytest.raises(FileNotFoundError, match="no validation.json or validate.json or val.json in"):
        load_records("slake", "val", root=base)


def test_slake_bad_records_name_file_position_qid_field(tmp_path: Path) -> None:
    base = make_slake(tmp_path)
    rows = json.loads((base / "train.json").read_text())
    rows[0]["img_name"] = "xmlab9/source.jpg"  # missing image
    del rows[2]["answer"]  # missing field, third record of the file (second after the language filter)
    (base / "train.json").write_text(json.dumps(rows))
    with pytest.raises(FileNotFoundError) as err:
        load_records("slake", "train", root=base)
    msg = str(err.value)
    assert "train.json: record 0 (qid=1), field 'img_name'" in msg and "xmlab9" in msg
    assert "1 more bad records" in msg and "--skip-bad" in msg and "skip_bad=True" in msg
    with pytest.warns(UserWarning, match="skipped 2 bad records.*record 2 \\(qid=3\\), field 'answer'"):
        recs = load_records("slake", "train", root=base, skip_bad=True, lang=None)
    assert [r.qid for r in recs] == [2]
    with pytest.warns(UserWarning):
        summary = summarize_dataset("slake", "train", root=base, skip_bad=True, lang=None)
    assert summary["records"] == 1 and summary["skipped"] == 2
    assert summary["problems"][1] == {"file": str(base / "train.json"), "index": 2, "qid": 3, "field": "answer",
                                      "message": "missing, empty or null (expected a non-empty value)"}


def test_unreadable_image_position_counts_the_file(tmp_path: Path) -> None:
    base = make_slake(tmp_path)
    summary = summarize_dataset("slake", "train", root=base)
    assert {k: summary[k] for k in ("records", "images", "open", "closed", "yes_no")} == {
        "records": 2, "images": 2, "open": 1, "closed": 1, "yes_no": 1}
    assert summary["content_types"] == {"Modality": 1, "Organ": 1} and summary["problems"] == []
    (base / "imgs" / "xmlab1" / "source.jpg").write_bytes(b"not a jpeg")
    # qid 3 is the file's record 2 (the Chinese record 1 is filtered out, yet still counted)
    with pytest.raises(ValueError, match=r"train.json: record 2 \(qid=3\), field 'img_name': .*unreadable"
                                         r".*--skip-bad.*skip_bad=True"):
        summarize_dataset("slake", "train", root=base)
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        summary = summarize_dataset("slake", "train", root=base, skip_bad=True)
    assert summary["records"] == 1 and summary["skipped"] == 1
    assert (summary["problems"][0]["qid"], summary["problems"][0]["index"]) == (3, 2)
    with pytest.raises(ValueError, match="unreadable"):
        load_records("slake", "train", root=base)[1].load_image()


# ---------------------------------------------------------------- VQA-RAD
def make_osf(folder: Path) -> Path:
    """The OSF release: 'VQA_RAD Dataset Public.json' beside 'VQA_RAD Image Folder/'."""
    images = folder / "VQA_RAD Image Folder"
    images.mkdir()
    Image.new("L", (20, 20), 50).save(images / "synpic1.jpg")
    base = {"image_name": "synpic1.jpg", "answer_type": "CLOSED", "question_type": "PRES",
            "image_organ": "CHEST", "qid_linked_id": "x"}
    rows = [{**base, "qid": 11, "phrase_type": "freeform", "question": "Is there a mass?", "answer": "yes"},
            {**base, "qid": 12, "phrase_type": "para", "question": "How many masses?", "answer": 2,
             "answer_type": "OPEN ", "question_type": "COUNT"},
            {**base, "qid": 13, "phrase_type": "test_freeform", "question": "Mass?", "answer": "No"},
            {**base, "qid": 14, "phrase_type": "test_para", "question": "Is it normal?", "answer": "no"}]
    path = folder / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows))
    return path


def test_vqa_rad_osf_json(tmp_path: Path) -> None:
    path = make_osf(tmp_path)
    rows = json.loads(path.read_text())
    train = load_records("vqa-rad", "train", path=path)
    assert [(r.qid, r.answer, r.answer_type, r.content_type) for r in train] == [
        (11, "yes", "CLOSED", "PRES"), (12, "2", "OPEN", "COUNT")]
    assert train[0].load_image().mode == "RGB"
    assert [r.qid for r in load_records("vqa-rad", "test", root=tmp_path)] == [13, 14]
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_records("vqa-rad", "validation", path=path)
    rows[1]["qid"] = 11  # duplicate qids in the file: fall back to record positions
    rows[3]["phrase_type"] = "weird"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="record 3 \\(qid=3\\), field 'phrase_type'"):
        load_records("vqa-rad", "test", path=path)
    with pytest.warns(UserWarning, match="phrase_type"):
        assert [r.qid for r in load_records("vqa-rad", "test", path=path, skip_bad=True)] == [2]
    # a NaN answer (json allows it) is a bad record, never the answer "nan"
    rows[3]["phrase_type"], rows[2]["answer"] = "test_para", float("nan")
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="record 2 \\(qid=2\\), field 'answer': missing, empty or null"):
        load_records("vqa-rad", "test", path=path)


def hub_table(images: list[bytes | None], questions: list[str | None], answers: list[str | None]) -> pa.Table:
    """The hub's schema (flaviagiammarino/vqa-rad): image struct<bytes, path>, question, answer strings."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images], image_type),
                     "question": pa.array(questions, pa.string()), "answer": pa.array(answers, pa.string())})


def test_vqa_rad_hub_parquet(tmp_path: Path) -> None:
    a, b = png_bytes(10), png_bytes(200, mode="RGB")
    data = tmp_path / "data"
    data.mkdir()
    table = hub_table([a, a, b], ["is there a fracture?", "what organ?", "is it normal"], ["no", "brain", "Yes"])
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), data / "test-00000-of-00001.parquet")
    recs = load_records("vqa-rad", "train", path=tmp_path)
    assert [(r.qid, r.answer_type) for r in recs] == [("train_00000", "CLOSED"), ("train_00001", "OPEN"),
                                                     ("train_00002", "CLOSED")]
    assert recs[0].img_name == recs[1].img_name != recs[2].img_name  # same bytes, same image
    assert recs[0].load_image().mode == "RGB" and recs[0].image_path is None
    assert len(load_records("vqa-rad", "test", path=data / "test-00000-of-00001.parquet")) == 1
    summary = summarize_dataset("vqa-rad", "train", path=tmp_path)
    assert (summary["images"], summary["yes_no"], summary["closed"]) == (2, 2, 2)
    # a single file given a split it does not hold is an error, not its rows relabelled
    with pytest.raises(ValueError, match="train-00000-of-00001.parquet holds split 'train', not 'test'"):
        load_records("vqa-rad", "test", path=data / "train-00000-of-00001.parquet")
    pq.write_table(table, tmp_path / "vqa.parquet")
    with pytest.raises(ValueError, match="cannot tell which split .*vqa.parquet holds"):
        load_records("vqa-rad", "train", path=tmp_path / "vqa.parquet")
    pq.write_table(hub_table([a, b"junk", None], ["q1?", "q2?", "q3?"], ["yes", "no", "no"]),
                   data / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="record 2 \\(qid='train_00002'\\), field 'image'"):
        load_records("vqa-rad", "train", path=tmp_path)
    with pytest.warns(UserWarning):
        summary = summarize_dataset("vqa-rad", "train", path=tmp_path, skip_bad=True)
    assert summary["records"] == 1
    assert [(p["qid"], p["index"]) for p in summary["problems"]] == [("train_00001", 1), ("train_00002", 2)]


def test_vqa_rad_parquet_nulls_are_bad_records(tmp_path: Path) -> None:
    file = tmp_path / "train-00000-of-00001.parquet"
    img = png_bytes(10)
    pq.write_table(hub_table([img] * 4, ["q1?", "q2?", None, "q4?"], ["yes", None, "no", "nan"]), file)
    with pytest.raises(ValueError) as err:
        load_records("vqa-rad", "train", path=file)
    assert str(err.value).startswith(f"{file}: record 1 (qid='train_00001'), field 'answer': missing, empty or null")
    assert "1 more bad records; pass --skip-bad (python: skip_bad=True)" in str(err.value)
    with pytest.warns(UserWarning, match="record 2 \\(qid='train_00002'\\), field 'question'"):
        recs = load_records("vqa-rad", "train", path=file, skip_bad=True)
    assert [(r.qid, r.answer) for r in recs] == [("train_00000", "yes"), ("train_00003", "nan")]  # text "nan" stays
    # pandas writes a missing value as null too (NaN in an object column)
    pd.DataFrame({"image": [{"bytes": img, "path": None}] * 2, "question": ["q?", "q?"],
                  "answer": ["yes", np.nan]}).to_parquet(file)
    with pytest.raises(ValueError, match="record 1 .*field 'answer'"):
        load_records("vqa-rad", "train", path=file)


def test_cli_names_its_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mile_utils.__main__ import main

    file = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(hub_table([png_bytes(1)] * 2, ["q1?", "q2?"], ["yes", None]), file)
    assert main(["data", "--dataset", "vqa-rad", "--path", str(file)]) == 2
    err = capsys.readouterr().err
    assert "record 1 (qid='train_00001'), field 'answer'" in err and "--skip-bad" in err
    with pytest.warns(UserWarning):
        assert main(["data", "--dataset", "vqa-rad", "--path", str(file), "--skip-bad", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 1 and out["problems"][0]["field"] == "answer"
    assert main(["data", "--dataset", "vqa-rad", "--path", str(file), "--split", "test"]) == 2
    assert "holds split 'train', not 'test' (--split" in capsys.readouterr().err


def test_hub_downloads_read_like_local_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--hub reads what huggingface_hub downloads: SLAKE with its images as imgs.zip (unpacked once into the cache),
    VQA-RAD's parquet files."""
    import mile_utils.data.loaders as loaders

    slake = make_slake(tmp_path / "slake")
    shutil.make_archive(str(slake / "imgs"), "zip", slake, "imgs")
    shutil.rmtree(slake / "imgs")
    (tmp_path / "rad" / "data").mkdir(parents=True)
    pq.write_table(hub_table([png_bytes(3)], ["q?"], ["yes"]), tmp_path / "rad" / "data" / "test-0-of-1.parquet")
    snapshots = {"BoKelvin/SLAKE": slake, "flaviagiammarino/vqa-rad": tmp_path / "rad"}
    monkeypatch.setattr(loaders, "snapshot_download", lambda repo_id, **kw: str(snapshots[repo_id]))
    monkeypatch.setenv("MILE_DATA_DIR", str(tmp_path / "cache"))
    recs = load_records("slake", "train", hub=True)
    assert [r.qid for r in recs] == [1, 3] and recs[1].load_image().mode == "RGB"
    assert Path(recs[0].image_root).is_relative_to(tmp_path / "cache")
    assert [(r.qid, r.answer_type) for r in load_records("vqa-rad", "test", hub=True)] == [("test_00000", "CLOSED")]

    def offline(repo_id: str, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(loaders, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not fetch the hub dataset 'BoKelvin/SLAKE'.*--root"):
        load_records("slake", "train", hub=True)


# ---------------------------------------------------------------- instruction JSON
def test_instruction_json(tmp_path: Path) -> None:
    Image.new("L", (20, 20), 50).save(tmp_path / "img1.png")
    rows = [{"img_name": "img1.png", "qid": 5, "answer": "yes", "question_pool": ["<image>p1", "<image>p2"]},
            {"img_name": "img1.png", "qid": 6, "answer": "axial", "question_pool": ["<image>only"],
             "content_type": "Plane"}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    recs = load_records("instruction", "train", root=tmp_path)
    assert [(r.qid, r.answer_type, r.question, r.prompts) for r in recs] == [
        (5, "CLOSED", "<image>p1", ("<image>p1", "<image>p2")), (6, "OPEN", "<image>only", ("<image>only",))]
    assert recs[1].content_type == "Plane" and recs[0].content_type == "unknown"
    rows[1]["question_pool"] = []
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="bad.json: record 1 \\(qid=6\\), field 'question_pool'"):
        load_records("instruction", "train", path=tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="instruction needs a local copy: --root .*--path"):
        load_records("instruction", "train")


# ---------------------------------------------------------------- transforms and the torch Dataset
def test_image_transform_blip_and_reference_quirk() -> None:
    img = Image.new("L", (10, 7), 255)
    x = ImageTransform(64)(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-5)
    quirk = ImageTransform(32, reference_quirk=True)(img)
    assert torch.allclose(quirk, torch.full((3, 32, 32), 1 / 255))  # /255 twice, no normalisation


def test_vqa_dataset_items_and_image_cache() -> None:
    a, b = png_bytes(0), png_bytes(255)
    recs = [Record("a", "q1?", "yes", "CLOSED", "X", 1, image_bytes=a),
            Record("a", "q2?", "no", "CLOSED", "X", 2, image_bytes=a),
            Record("b", "q3?", "left", "OPEN", "Y", 3, image_bytes=b, prompts=("p1", "p2", "p3", "p4"))]
    ds = VQADataset(recs, ImageTransform(16), train=False)
    assert len(ds) == 3 and ds.pixels(0).shape == (3, 16, 16) and ds.question_text(0) == "q1?"
    assert ds.question_text(2) == "p1"  # evaluation: the first prompt
    assert ds.pixels(1) is ds.pixels(0)  # small images: decoded once, kept
    assert not torch.equal(ds.pixels(2), ds.pixels(0))
    train = VQADataset(recs, ImageTransform(16), train=True, seed=0)
    drawn = []
    for epoch in range(8):
        train.set_epoch(epoch)
        drawn.append(train.question_text(2))
    assert len(set(drawn)) > 1 and set(drawn) <= set(recs[2].prompts)
    train.set_epoch(3)
    assert train.question_text(2) == drawn[3]  # same epoch, same prompt


def test_cli_data_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mile_utils.__main__ import main

    assert main(["data", "--root", str(tmp_path), "--size", "6", "--split", "test", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] > 0 and out["images"] == 1 and set(out) >= {"open", "closed", "yes_no",
                                                                      "content_types", "problems"}
    assert main(["data", "--root", str(tmp_path), "--size", "6", "--split", "nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err
