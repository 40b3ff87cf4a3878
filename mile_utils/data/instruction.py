"""MILE's instruction format, seeded: templates, order and options as in its released ``RAD_instruction_data.json``.
Options: the answer and the opposite Yes/No, else up to three answers of the split, same content type first (MILE drew
its own at random: only their kind can match its file); shuffled once per record."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template
from typing import Any

from ..files import write_json
from .records import Record

# Verbatim, with MILE's literal braces and its "ansewer"; $options renders as "(a)Yes; (b)No".
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "<image>Question:{$question}Option:{$options} The answer to the question is:",
    "<image>Question:{$question}Option:{$options} Answer:",
    "<image>Question:{$question} Based on the image, give a judgmental answer to the question",
    "<image>Question:{$question}Option:{$options} Short answer:",
    "<image>Used the provided image to answer the question:{$question}Option:{$options} "
    "Provide your ansewer based on the option",
    '<image>What is the answer to the following question?"{$question}"',
)
JUDGMENT = 2  # the "judgmental" template: CLOSED questions only


class InstructionFormatter:
    """Builds instruction prompts for records of one split (its answers are the distractor vocabulary)."""

    def __init__(self, records: Iterable[Record], *, seed: int = 0, n_options: int = 4) -> None:
        self.seed, self.n_options = seed, n_options
        by_type: dict[str, dict[str, str]] = {}
        for rec in records:
            if not rec.is_yes_no:
                by_type.setdefault(rec.content_type, {}).setdefault(rec.answer.strip().lower(), rec.answer)
        # sorted: the vocabulary (and so the options) must not depend on record order
        self.by_type = {t: sorted(v.values()) for t, v in by_type.items()}
        self.vocabulary = sorted({a.strip().lower(): a for v in by_type.values() for a in v.values()}.values())

    def options(self, record: Record) -> list[str]:
        rng = random.Random(f"{self.seed}:options:{record.qid}")
        answer = record.answer.strip().lower()
        if record.is_yes_no:
            opts = [record.answer, "No" if answer.startswith("yes") else "Yes"]
        else:
            same = [a for a in self.by_type.get(record.content_type, []) if a.strip().lower() != answer]
            rest = [a for a in self.vocabulary if a.strip().lower() != answer and a not in same]
            need = self.n_options - 1
            picked = rng.sample(same, min(need, len(same)))
            opts = [record.answer, *picked, *rng.sample(rest, min(need - len(picked), len(rest)))]
        rng.shuffle(opts)
        return opts

    def filled(self, record: Record) -> list[tuple[int, str]]:
        """(template index, prompt) for every template that applies to the record, in MILE's order."""
        options = "; ".join(f"({'abcdefghij'[i]}){opt}" for i, opt in enumerate(self.options(record)))
        return [(i, Template(t).substitute(question=record.question, options=options))
                for i, t in enumerate(INSTRUCTION_TEMPLATES) if i != JUDGMENT or record.answer_type == "CLOSED"]


def write_instruction_json(records: Iterable[Record], path: str | Path, *, seed: int = 0) -> Path:
    """MILE's instruction JSON (``img_name, qid, answer, question_pool``, types); the first prompt is for evaluation."""
    fmt = InstructionFormatter(records := list(records), seed=seed)
    return write_json(path, [{"img_name": r.img_name, "qid": r.qid, "answer": r.answer,
                              "question_pool": [text for _, text in fmt.filled(r)], "answer_type": r.answer_type,
                              "content_type": r.content_type} for r in records])


def truncation_report(records: Sequence[Record], tokenizer: Any, *, formatter: InstructionFormatter,
                      max_tokens: int = 35) -> dict[str, Any]:
    """How many of ``formatter``'s prompts ``max_tokens`` (with [CLS]/[SEP], as BLIP) cuts, overall and per template."""
    per_template: dict[int, list[int]] = defaultdict(list)
    for rec in records:
        for i, text in formatter.filled(rec):
            per_template[i].append(len(tokenizer(text, add_special_tokens=True)["input_ids"]))

    def block(ns: list[int]) -> dict[str, Any]:
        cut = sum(n > max_tokens for n in ns)
        return {"prompts": len(ns), "truncated": cut, "fraction": cut / len(ns) if ns else 0.0,
                "mean_tokens": sum(ns) / len(ns) if ns else 0.0, "max_tokens_seen": max(ns, default=0)}
    return {"max_tokens": max_tokens, **block([n for ns in per_template.values() for n in ns]),
            "templates": {INSTRUCTION_TEMPLATES[i]: block(v) for i, v in sorted(per_template.items())}}
