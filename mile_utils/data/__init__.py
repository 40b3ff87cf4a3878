"""Records, the built-in ``synthetic`` set, SLAKE / VQA-RAD / instruction loaders, MILE's instruction prompts."""

from .instruction import INSTRUCTION_TEMPLATES, InstructionFormatter, truncation_report, write_instruction_json
from .loaders import load_records, summarize_dataset
from .records import ImageTransform, Record, VQADataset
from .synthetic import synthetic_dir

__all__ = ["INSTRUCTION_TEMPLATES", "ImageTransform", "InstructionFormatter", "Record", "VQADataset",
           "load_records", "summarize_dataset", "synthetic_dir", "truncation_report", "write_instruction_json"]
