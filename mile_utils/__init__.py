"""MILE Book's helper package: MISS/BLIP VQA, component-wise PEFT, data, metrics and one training loop."""

__version__ = "0.1.0"
