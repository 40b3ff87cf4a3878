"""One evaluation path for every method: the reference's beam search. Generation is MISS's (MILE ``models/mile_vqa.py``,
transformers 4.26: 3 beams, ``max_length`` 10 counting [DEC], ``min_length`` 1, [SEP] ends) but for (1) the question
mask: MISS passes all ones (beams attend to question padding), we pass the real mask, as training does
(``reference_quirk``: all ones); (2) a beam cut at ``max_length`` is normalised by 9 tokens here, 10 there (transformers
5 counts generated tokens with [SEP], 4.26 the hypothesis with [DEC]); answers ending in [SEP] score the same."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from .files import atomic_write
from .metrics import compute_metrics
from .profiles import Profile, get_profile
from .train import FrozenFeatures, VQACollator, question_states


def evaluate_model(model: torch.nn.Module, tokenizer: Any, profile: str | Profile, dataset: Any, *,
                   out_dir: str | Path | None = None, batch_size: int = 32, device: torch.device | str | None = None,
                   autocast: Any = None, dtype: torch.dtype = torch.float32, use_cache: bool = True,
                   reference_quirk: bool = False, progress: bool = True) -> dict[str, Any]:
    """Answer every record of ``dataset`` (a ``VQADataset``) by beam search and score: ``{"metrics", "predictions",
    "cache"}``, and ``out_dir/predictions.jsonl``. ``autocast``/``dtype``: the training run's."""
    if len(dataset) == 0:
        raise ValueError("evaluate_model: the evaluation set has no records")
    prof, device, autocast = get_profile(profile), device or next(model.parameters()).device, autocast or nullcontext
    was_training = model.training
    model.eval()
    features = FrozenFeatures(model, tokenizer, prof, device=device, dtype=dtype, enabled=use_cache,
                              batch_size=batch_size)
    features.prepare(dataset, autocast)
    collator = VQACollator(tokenizer, prof, dataset, need_pixels=not features.vit_cached)
    predictions: list[str] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", leave=False, disable=not progress):
        batch = send_to_device(collator(range(start, min(start + batch_size, len(dataset)))), device)
        batch = features.attach(batch, dataset, autocast)
        with autocast(), torch.no_grad():  # beam search from [DEC], as the reference
            states, qmask = question_states(model, batch), batch["attention_mask"]
            bos = torch.full((states.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long, device=states.device)
            out = model.text_decoder.generate(
                input_ids=bos, encoder_hidden_states=states, num_beams=prof.num_beams,
                encoder_attention_mask=torch.ones_like(qmask) if reference_quirk else qmask,
                max_length=prof.max_answer_length, min_length=prof.min_answer_length,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
        predictions.extend(s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True))
    model.train(was_training)
    rows = [{"qid": r.qid, "question": dataset.question_text(i), "answer": r.answer, "prediction": predictions[i],
             "answer_type": r.answer_type, "content_type": r.content_type} for i, r in enumerate(dataset.records)]
    if out_dir is not None:  # the question is the text the model saw (an instruction prompt, if any)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write(Path(out_dir) / "predictions.jsonl", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return {"metrics": compute_metrics(rows, dataset.records), "predictions": rows, "cache": features.summary()}
