"""Datasets for MILE Book: one record type, the built-in ``synthetic`` set, SLAKE / VQA-RAD / instruction
loaders, BLIP image preprocessing and MILE's instruction-format prompts."""

from .instruction import (
    EVAL_TEMPLATE,
    INSTRUCTION_TEMPLATES,
    JUDGMENT_TEMPLATE,
    InstructionFormatter,
    format_options,
    to_instruction_records,
    truncation_report,
    write_instruction_json,
)
from .loaders import (
    DATASETS,
    load_records,
    read_instruction_json,
    read_slake_folder,
    read_vqa_rad_osf,
    read_vqa_rad_parquet,
    summarize_dataset,
)
from .records import ANSWER_TYPES, SPLITS, Problem, Record, RecordList, is_yes_no, normalize_split
from .synthetic import (
    SIZES,
    Scan,
    default_cache_dir,
    fingerprint,
    generate_synthetic,
    scan_meta,
    synthetic_dir,
)
from .transforms import CLIP_MEAN, CLIP_STD, ImageTransform, VQADataset, unique_image_tensors

__all__ = [
    "ANSWER_TYPES",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "EVAL_TEMPLATE",
    "INSTRUCTION_TEMPLATES",
    "JUDGMENT_TEMPLATE",
    "SIZES",
    "SPLITS",
    "ImageTransform",
    "InstructionFormatter",
    "Problem",
    "Record",
    "RecordList",
    "Scan",
    "VQADataset",
    "default_cache_dir",
    "fingerprint",
    "format_options",
    "generate_synthetic",
    "is_yes_no",
    "load_records",
    "normalize_split",
    "read_instruction_json",
    "read_slake_folder",
    "read_vqa_rad_osf",
    "read_vqa_rad_parquet",
    "scan_meta",
    "summarize_dataset",
    "synthetic_dir",
    "to_instruction_records",
    "truncation_report",
    "unique_image_tensors",
    "write_instruction_json",
]
