"""MILE Book's helper package: MISS/BLIP VQA, component-wise PEFT, data, metrics and one training loop."""

import os
import sys

# OpenMP threads that spin while waiting stall every small op when the cores are shared (5x-15x slower tiny
# training measured on a loaded 2-core machine); sleeping instead changes no result. Read when torch loads.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
