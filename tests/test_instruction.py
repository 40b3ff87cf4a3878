"""MILE's instruction format against MILE's released file, seeded options and draws, truncation, JSON round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from mile_utils.data import (
    INSTRUCTION_TEMPLATES,
    InstructionFormatter,
    Record,
    load_records,
    truncation_report,
    write_instruction_json,
)
from mile_utils.model import build_tokenizer

# 50 records of MILE's Instruction_dataset/RAD_instruction_data.json (TIMMY-CHAN/MILE 5d2ad16), unchanged
EXCERPT = Path(__file__).parent / "data" / "mile_rad_instruction_excerpt.json"
QUESTION = re.compile(r"^<image>Question:\{(.*)\}Option:\{(.*)\} The answer to the question is:$", re.S)


def rec(qid: int, answer: str, content_type: str, question: str = "Is this a lesion?",
        answer_type: str | None = None) -> Record:
    kind = answer_type or ("CLOSED" if answer in ("yes", "no") else "OPEN")
    return Record("img.png", question, answer, kind, content_type, qid, image_root=None)


def pool(fmt: InstructionFormatter, record: Record) -> list[str]:
    """The record's prompts, MILE's ``question_pool``."""
    return [text for _, text in fmt.filled(record)]


RECORDS = [rec(1, "yes", "Abnormality"), rec(2, "axial", "Plane", "Which plane?"),
           rec(3, "coronal", "Plane", "Which plane?"), rec(4, "sagittal", "Plane", "Which plane?"),
           rec(5, "left", "Position", "Where?"), rec(6, "2", "Quantity", "How many?"), rec(7, "no", "Size"),
           rec(8, "left", "Position", "Left or right?", "CLOSED")]


def test_prompts_equal_mile_released_file() -> None:
    """Our prompts for the VQA-RAD records of MILE's file, template by template, equal MILE's.

    MILE's file holds the question (inside its first prompt), the answer and the pool, not VQA-RAD's answer
    type: the records here are CLOSED exactly when MILE gave them the 6-prompt "judgmental" pool, which is
    VQA-RAD's CLOSED label (1,295 records in the whole file, 103 of them not yes/no). MILE drew the order of
    the options and the distractors of non-yes/no questions at random: for those we check the option set's
    kind (the answer, plus the opposite Yes/No for a yes/no answer) and compare the prompts with MILE's own
    option text put in place of ours, so every other character is compared verbatim.
    """
    released = json.loads(EXCERPT.read_text(encoding="utf-8"))["records"]
    assert len(released) == 50 and sum(len(r["question_pool"]) == 6 for r in released) == 30
    records = []
    for r in released:
        question, _ = QUESTION.match(r["question_pool"][0]).groups()
        kind = "CLOSED" if len(r["question_pool"]) == 6 else "OPEN"
        records.append(Record(r["img_name"], question, str(r["answer"]), kind, "unknown", r["qid"]))
    fmt = InstructionFormatter(records, seed=0)
    non_yes_no_closed = 0
    for r, record in zip(released, records, strict=True):
        ours = pool(fmt, record)
        assert len(ours) == len(r["question_pool"])
        our_options = QUESTION.match(ours[0]).group(2)
        mile_options = QUESTION.match(r["question_pool"][0]).group(2)
        if record.is_yes_no:  # MILE: the answer as written, the opposite capitalised: (a)yes; (b)No
            other = "No" if record.answer.lower() == "yes" else "Yes"
            assert sorted(o[3:] for o in our_options.split("; ")) == sorted(o[3:] for o in mile_options.split("; "))
            assert {o[3:] for o in our_options.split("; ")} == {record.answer, other}
        else:
            non_yes_no_closed += record.answer_type == "CLOSED"
            assert f"){record.answer}" in our_options and len(our_options.split("; ")) == 4
        assert [p.replace(our_options, mile_options) for p in ours] == r["question_pool"]
    assert non_yes_no_closed == 10  # the judgmental pool for CLOSED questions that are not yes/no too


def test_templates_verbatim_in_mile_order() -> None:
    assert INSTRUCTION_TEMPLATES[0] == "<image>Question:{$question}Option:{$options} The answer to the question is:"
    assert INSTRUCTION_TEMPLATES[2] == (
        "<image>Question:{$question} Based on the image, give a judgmental answer to the question")
    assert INSTRUCTION_TEMPLATES[3].endswith("} Short answer:")
    assert "Provide your ansewer based on the option" in INSTRUCTION_TEMPLATES[4]  # the reference's spelling
    assert INSTRUCTION_TEMPLATES[5] == '<image>What is the answer to the following question?"{$question}"'
    fmt = InstructionFormatter(RECORDS, seed=0)
    prompts = pool(fmt, RECORDS[0])
    assert len(prompts) == 6 and prompts[2] == (
        "<image>Question:{Is this a lesion?} Based on the image, give a judgmental answer to the question")
    assert prompts[1] in ("<image>Question:{Is this a lesion?}Option:{(a)yes; (b)No} Answer:",
                          "<image>Question:{Is this a lesion?}Option:{(a)No; (b)yes} Answer:")
    assert len(pool(fmt, RECORDS[7])) == 6  # closed, not yes/no: the judgmental pool too


def test_open_record_gets_four_options_same_type_first() -> None:
    fmt = InstructionFormatter(RECORDS, seed=0)
    opts = fmt.options(RECORDS[1])
    assert len(opts) == 4 and "axial" in opts
    # the two other planes are always among the distractors, the last comes from the rest of the vocabulary
    assert {"coronal", "sagittal"} <= set(opts) and not {"yes", "no"} & set(opts)
    assert len(pool(fmt, RECORDS[1])) == 5  # no judgmental template for an OPEN question
    cased = InstructionFormatter([rec(1, "MRI - T1", "Modality"), rec(2, "CT", "Modality")], seed=0)
    assert sorted(cased.options(rec(3, "X-ray", "Other"))) == ["CT", "MRI - T1", "X-ray"]  # answers as written


def test_seeded_options() -> None:
    a, b = InstructionFormatter(RECORDS, seed=1), InstructionFormatter(list(reversed(RECORDS)), seed=1)
    assert [a.options(r) for r in RECORDS] == [b.options(r) for r in RECORDS]  # order-independent
    assert {tuple(InstructionFormatter(RECORDS, seed=s).options(RECORDS[1])) for s in range(8)} != {
        tuple(a.options(RECORDS[1]))}  # the seed matters


def test_truncation_report() -> None:
    tok = build_tokenizer("tiny")
    fmt = InstructionFormatter(RECORDS, seed=0)
    report = truncation_report(RECORDS, tok, max_tokens=35, formatter=fmt)
    assert report["prompts"] == 3 * 6 + 5 * 5
    # the long "Used the provided image..." template is the one most often cut
    per = report["templates"]
    assert per[INSTRUCTION_TEMPLATES[4]]["fraction"] >= per[INSTRUCTION_TEMPLATES[5]]["fraction"]
    one = [rec(1, "yes", "X", "Is it?")]
    lengths = [len(tok(text, add_special_tokens=False)["input_ids"]) + 2 for text in pool(fmt, one[0])]  # [CLS] [SEP]
    longest = truncation_report(one, tok, max_tokens=max(lengths), formatter=fmt)
    assert longest["truncated"] == 0 and longest["mean_tokens"] == sum(lengths) / 6
    assert truncation_report(one, tok, max_tokens=min(lengths) - 1, formatter=fmt)["fraction"] == 1.0


def test_write_and_read_instruction_json(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 10).save(tmp_path / "img.png")
    path = write_instruction_json(RECORDS, tmp_path / "train.json", seed=0)
    back = load_records("instruction", "train", path=path)
    fmt = InstructionFormatter(RECORDS, seed=0)
    assert [r.prompts for r in back] == [tuple(pool(fmt, r)) for r in RECORDS]
    assert [r.question for r in back] == [pool(fmt, r)[0] for r in RECORDS]
    assert [(r.qid, r.answer, r.answer_type, r.content_type) for r in back] == [
        (r.qid, r.answer, r.answer_type, r.content_type) for r in RECORDS]
