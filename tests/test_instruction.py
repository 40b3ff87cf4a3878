"""MILE's instruction format: templates verbatim, options, seeded draws, truncation, JSON round trip."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from mile_utils.data import (
    INSTRUCTION_TEMPLATES,
    InstructionFormatter,
    Record,
    format_options,
    load_records,
    to_instruction_records,
    truncation_report,
    write_instruction_json,
)
from mile_utils.model import build_tokenizer


def rec(qid: int, answer: str, content_type: str, question: str = "Is this a lesion?") -> Record:
    answer_type = "CLOSED" if answer in ("yes", "no") else "OPEN"
    return Record("img.png", question, answer, answer_type, content_type, qid, image_root=None)


RECORDS = [rec(1, "yes", "Abnormality"), rec(2, "axial", "Plane", "Which plane?"),
           rec(3, "coronal", "Plane", "Which plane?"), rec(4, "sagittal", "Plane", "Which plane?"),
           rec(5, "left", "Position", "Where?"), rec(6, "2", "Quantity", "How many?"), rec(7, "no", "Size")]


def test_templates_verbatim() -> None:
    assert INSTRUCTION_TEMPLATES[0] == (
        "<image>Question:{question}Option:{options} The answer to the question is:")
    assert INSTRUCTION_TEMPLATES[3] == (
        "<image>Question:{question} Based on the image, give a judgmental answer to the question")
    assert "Provide your ansewer based on the option" in INSTRUCTION_TEMPLATES[4]  # the reference's spelling
    assert INSTRUCTION_TEMPLATES[5] == '<image>What is the answer to the following question?"{question}"'
    assert format_options(["yes", "no"]) == "(a)yes; (b)no"


def test_yes_no_record_gets_two_options_and_the_judgment_prompt() -> None:
    fmt = InstructionFormatter(RECORDS, seed=0)
    assert sorted(fmt.options(RECORDS[0])) == ["no", "yes"]
    prompts = fmt.prompts(RECORDS[0])
    assert len(prompts) == 6
    assert prompts[3] == ("<image>Question:Is this a lesion? Based on the image, give a judgmental answer to "
                          "the question")
    opts = format_options(fmt.options(RECORDS[0]))
    assert prompts[1] == f"<image>Question:Is this a lesion?Option:{opts} Answer:"
    assert fmt.prompt(RECORDS[0]) == prompts[0]  # evaluation: a fixed template


def test_open_record_gets_four_options_same_type_first() -> None:
    fmt = InstructionFormatter(RECORDS, seed=0)
    opts = fmt.options(RECORDS[1])
    assert len(opts) == 4 and "axial" in opts
    # the two other planes are always among the distractors, the last comes from the rest of the vocabulary
    assert {"coronal", "sagittal"} <= set(opts) and not {"yes", "no"} & set(opts)
    assert len(fmt.prompts(RECORDS[1])) == 5  # no judgment template for a non yes/no answer


def test_seeded_options_and_epoch_draws() -> None:
    a, b = InstructionFormatter(RECORDS, seed=1), InstructionFormatter(list(reversed(RECORDS)), seed=1)
    assert [a.options(r) for r in RECORDS] == [b.options(r) for r in RECORDS]  # order-independent
    assert [a.prompt(r, epoch=2) for r in RECORDS] == [b.prompt(r, epoch=2) for r in RECORDS]
    drawn = {a.prompt(RECORDS[0], epoch=e) for e in range(12)}
    assert len(drawn) > 2 and drawn <= set(a.prompts(RECORDS[0]))
    converted = to_instruction_records(RECORDS, seed=1)
    assert converted[0].prompts == tuple(a.prompts(RECORDS[0]))
    assert converted[0].question == a.prompt(RECORDS[0])
    assert converted[0].meta["plain_question"] == "Is this a lesion?"


def test_truncation_report() -> None:
    tok = build_tokenizer("tiny")
    fmt = InstructionFormatter(RECORDS, seed=0)
    report = truncation_report(RECORDS, tok, max_tokens=35, formatter=fmt)
    assert report["prompts"] == 2 * 6 + 5 * 5
    # the long "Used the provided image..." template is the one most often cut
    per = report["templates"]
    assert per[INSTRUCTION_TEMPLATES[4]]["fraction"] >= per[INSTRUCTION_TEMPLATES[5]]["fraction"]
    short = truncation_report([rec(1, "yes", "X", "Is it?")], tok, max_tokens=5)
    n = len(tok("Is it?")["input_ids"])  # [CLS] is it ? [SEP]
    assert n == 5 and short["truncated"] == 0 and short["mean_tokens"] == 5
    assert truncation_report([rec(1, "yes", "X", "Is it?")], tok, max_tokens=4)["fraction"] == 1.0


def test_write_and_read_instruction_json(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 10).save(tmp_path / "img.png")
    path = write_instruction_json(RECORDS, tmp_path / "train.json", seed=0)
    back = load_records("instruction", "train", path=path)
    fmt = InstructionFormatter(RECORDS, seed=0)
    assert [r.prompts for r in back] == [tuple(fmt.prompts(r)) for r in RECORDS]
    assert [(r.qid, r.answer, r.answer_type, r.content_type) for r in back] == [
        (r.qid, r.answer, r.answer_type, r.content_type) for r in RECORDS]
