"""MILE's instruction format: any VQA record turned into the reference's prompt templates, seeded.

Options are the answer plus distractors from the split's answer vocabulary (2 options for yes/no, 4
otherwise), shuffled once per record. Training draws one prompt per record and epoch; evaluation uses
the first template. The reference truncated questions at 35 tokens, which cuts many of these prompts short:
:func:`truncation_report` measures how many with a given tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .records import Record

# The reference's templates, verbatim (including its "ansewer"); {options} renders as "(a)yes; (b)no".
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "<image>Question:{question}Option:{options} The answer to the question is:",
    "<image>Question:{question}Option:{options} Answer:",
    "<image>Question:{question}Option:{options} Short answer:",
    "<image>Question:{question} Based on the image, give a judgmental answer to the question",
    "<image>Used the provided image to answer the question:{question}Option:{options} "
    "Provide your ansewer based on the option",
    '<image>What is the answer to the following question?"{question}"',
)
JUDGMENT_TEMPLATE = 3  # only for yes/no questions
EVAL_TEMPLATE = 0
LETTERS = "abcdefghij"


def format_options(options: Sequence[str]) -> str:
    """``["yes", "no"]`` -> ``"(a)yes; (b)no"``."""
    return "; ".join(f"({LETTERS[i]}){opt}" for i, opt in enumerate(options))


class InstructionFormatter:
    """Builds instruction prompts for records of one split (its answers are the distractor vocabulary).

    Distractors come first from answers of the same ``content_type`` (a plane question gets other planes),
    then from the rest of the split's non-yes/no answers, so options stay plausible.
    """

    def __init__(self, records: Iterable[Record], *, seed: int = 0, n_options: int = 4) -> None:
        self.seed = seed
        self.n_options = n_options
        by_type: dict[str, dict[str, str]] = {}
        everything: dict[str, str] = {}
        for rec in records:
            if rec.is_yes_no:
                continue
            key = rec.answer.strip().lower()
            by_type.setdefault(rec.content_type, {}).setdefault(key, rec.answer)
            everything.setdefault(key, rec.answer)
        # sorted: the vocabulary (and so the options) must not depend on record order
        self.by_type = {t: sorted(v.values()) for t, v in by_type.items()}
        self.vocabulary = sorted(everything.values())

    def options(self, record: Record) -> list[str]:
        rng = random.Random(f"{self.seed}:options:{record.qid}")
        if record.is_yes_no:
            opts = ["yes", "no"]
        else:
            answer = record.answer.strip().lower()
            same = [a for a in self.by_type.get(record.content_type, []) if a.strip().lower() != answer]
            rest = [a for a in self.vocabulary if a.strip().lower() != answer and a not in same]
            need = self.n_options - 1
            picked = rng.sample(same, min(need, len(same)))
            picked += rng.sample(rest, min(need - len(picked), len(rest)))
            opts = [record.answer, *picked]
        rng.shuffle(opts)
        return opts

    def filled(self, record: Record) -> list[tuple[int, str]]:
        """(template index, prompt) for every template that applies to the record."""
        options = format_options(self.options(record))
        return [
            (i, t.format(question=record.question, options=options))
            for i, t in enumerate(INSTRUCTION_TEMPLATES)
            if i != JUDGMENT_TEMPLATE or record.is_yes_no
        ]

    def prompts(self, record: Record) -> list[str]:
        return [text for _, text in self.filled(record)]

    def prompt(self, record: Record, epoch: int | None = None) -> str:
        """The evaluation prompt (``epoch=None``), or the prompt drawn for this record in ``epoch``."""
        prompts = self.prompts(record)
        if epoch is None:
            return prompts[EVAL_TEMPLATE]
        return random.Random(f"{self.seed}:{epoch}:{record.qid}").choice(prompts)

    def to_records(self, records: Iterable[Record]) -> list[Record]:
        """Copies whose ``prompts`` hold every template and whose ``question`` is the evaluation prompt;
        :class:`~mile_utils.data.transforms.VQADataset` then draws per epoch when training."""
        out = []
        for rec in records:
            prompts = self.prompts(rec)
            out.append(
                replace(
                    rec,
                    question=prompts[EVAL_TEMPLATE],
                    prompts=tuple(prompts),
                    meta={**rec.meta, "plain_question": rec.question},
                )
            )
        return out


def to_instruction_records(records: Sequence[Record], *, seed: int = 0, n_options: int = 4) -> list[Record]:
    """Instruction-format copies of one split's records (its own answers give the distractors)."""
    return InstructionFormatter(records, seed=seed, n_options=n_options).to_records(records)


def write_instruction_json(records: Iterable[Record], path: str | Path, *, seed: int = 0) -> Path:
    """Write MILE's instruction JSON (``img_name, qid, answer, question_pool`` + answer/content type)."""
    records = list(records)
    fmt = InstructionFormatter(records, seed=seed)
    rows: list[dict[str, Any]] = [
        {
            "img_name": r.img_name,
            "qid": r.qid,
            "answer": r.answer,
            "question_pool": fmt.prompts(r),
            "answer_type": r.answer_type,
            "content_type": r.content_type,
        }
        for r in records
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return out


def truncation_report(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_tokens: int = 35,
    formatter: InstructionFormatter | None = None,
) -> dict[str, Any]:
    """How many prompts a ``max_tokens`` limit (counting [CLS]/[SEP], as BLIP's tokenizer call does) cuts.

    Prompts are every template of every record (with ``formatter``), else each record's ``prompts`` or its
    question. Returns overall and per-template counts and fractions.
    """
    per_template: dict[str, list[int]] = {}
    lengths: list[int] = []
    for rec in records:
        if formatter is not None:
            pairs = [(str(i), text) for i, text in formatter.filled(rec)]
        else:
            pairs = [("prompt", text) for text in (rec.prompts or (rec.question,))]
        for key, text in pairs:
            n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
            lengths.append(n)
            per_template.setdefault(key, []).append(n)

    def block(ns: list[int]) -> dict[str, Any]:
        cut = sum(n > max_tokens for n in ns)
        return {
            "prompts": len(ns),
            "truncated": cut,
            "fraction": cut / len(ns) if ns else 0.0,
            "mean_tokens": sum(ns) / len(ns) if ns else 0.0,
            "max_tokens_seen": max(ns, default=0),
        }

    report = {"max_tokens": max_tokens, **block(lengths)}
    if formatter is not None:
        report["templates"] = {
            INSTRUCTION_TEMPLATES[int(k)]: block(v) for k, v in sorted(per_template.items())
        }
    return report


__all__ = [
    "INSTRUCTION_TEMPLATES",
    "JUDGMENT_TEMPLATE",
    "EVAL_TEMPLATE",
    "InstructionFormatter",
    "format_options",
    "to_instruction_records",
    "write_instruction_json",
    "truncation_report",
]
