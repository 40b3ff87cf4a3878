"""bf16 autocast against fp32 for our training loop on this machine's CPU (results/bf16-cpu.json): per profile and
configuration, epochs in fp32 and in bf16 (``torch.autocast("cpu", torch.bfloat16)``) take turns on one model, and
the figure is the median of the paired ratios. Training on a CPU stays fp32 unless bf16 is faster here.

    python results/bf16_cpu.py tiny,paper results/bf16-cpu.json [SPEC,SPEC]

With SPECs only those configurations run; the others already in the JSON are kept (measured at another time).
"""

import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mile_utils.adapters import apply_spec
from mile_utils.bench import _dataset
from mile_utils.experiments import RunConfig, environment
from mile_utils.model import build_model, build_tokenizer
from mile_utils.train import make_accelerator, train_model

# profile: (specs, batch, steps per epoch, repeats); paper: the configurations a CPU can train at all
CASES = {"tiny": (("T/T/T", "F/F/lora"), 32, 12, 5), "paper": (("F/F/lora", "F/lora/lora"), 2, 4, 3)}
profiles, out = sys.argv[1].split(","), Path(sys.argv[2])
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
acc, tokenizer = make_accelerator(cpu=True), build_tokenizer("tiny")  # fp32; bf16 from the autocast around it
measured = {(p, s) for p in profiles for s in CASES[p][0] if only is None or s in only}
earlier = json.loads(out.read_text())["configs"] if only and out.exists() else []  # rows of other configurations stay
kept = [c for c in earlier if (c["profile"], c["spec"]) not in measured]
report = {"environment": environment(acc), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "configs": kept}
for profile in profiles:
    specs, batch, steps, repeats = CASES[profile]
    for spec in (s for s in specs if (profile, s) in measured):
        model = apply_spec(build_model(profile, seed=0), spec, seed=0)
        data = _dataset(profile, steps * batch, "train")
        options = RunConfig(profile=profile, spec=spec, epochs=1, batch_size=batch).resolved()
        seconds = {"fp32": [], "bf16": []}
        for _ in range(repeats + 1):  # the first pair warms up
            for name, context in (("fp32", nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
                with context:
                    run = train_model(model, tokenizer, data, options, accelerator=acc, progress=False)
                acc.free_memory()
                seconds[name].append(run["history"][0]["seconds"])
        ratios = [b / f for f, b in zip(seconds["fp32"][1:], seconds["bf16"][1:], strict=True)]
        row = {"profile": profile, "spec": spec, "batch": batch, "steps": steps, "seconds": seconds,
               "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "bf16_time_over_fp32": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios]}
        report["configs"].append(row)
        print(profile, spec, f"bf16 takes {row['bf16_time_over_fp32']:.2f}x the time of fp32", row["ratios"],
              flush=True)
        out.write_text(json.dumps(report, indent=1))
