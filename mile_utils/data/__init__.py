"""Datasets for MILE Book: one record type, the built-in ``synthetic`` set, SLAKE / VQA-RAD / instruction
loaders, BLIP image preprocessing and MILE's instruction-format prompts."""

from .instruction import INSTRUCTION_TEMPLATES, InstructionFormatter, truncation_report, write_instruction_json
from .loaders import DATASETS, load_records, summarize_dataset
from .records import CLIP_MEAN, CLIP_STD, ImageTransform, Record, VQADataset, is_yes_no, normalize_split
from .synthetic import generate_synthetic, synthetic_dir

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DATASETS", "INSTRUCTION_TEMPLATES", "ImageTransform", "InstructionFormatter",
    "Record", "VQADataset", "generate_synthetic", "is_yes_no", "load_records", "normalize_split",
    "summarize_dataset", "synthetic_dir", "truncation_report", "write_instruction_json",
]
