"""The tiny profile's per-method learning-rate sweep (results/lr-sweep-tiny.json): F/x/x for each method and rate,
3 epochs at the profile's batch, seed 0, the `small` set, starting from chapter 2's stand-in. Finished runs are
reused (by identity), so an interrupted sweep resumes.

    python results/lr_sweep.py ia3,ptv2,lora 0.001,0.003,0.01,0.03 /tmp/sweep.json [RUNS_DIR]
"""

import json
import sys
from pathlib import Path

from mile_utils.experiments import RunConfig, pretrained_stand_in, run_experiment

methods, rates, out = sys.argv[1].split(","), [float(x) for x in sys.argv[2].split(",")], Path(sys.argv[3])
runs_dir = Path(sys.argv[4] if len(sys.argv) > 4 else "runs")
stand_in = pretrained_stand_in(runs_dir, progress=False)
rows = []
for method in methods:
    for lr in rates:  # an explicit lr trains every part at that rate (no per-method table)
        cfg = RunConfig(spec=f"F/{method}/{method}", size="small", lr=lr, checkpoint=stand_in,
                        out=str(runs_dir / "tiny-lr-sweep" / f"{method}-{lr:g}"))
        result = run_experiment(cfg, skip_finished=True, progress=False)
        losses = [e["loss"] for e in result["history"]]
        rows.append({"method": method, "spec": f"F/{method}/{method}", "lr": lr, "losses": losses,
                     "drop_pct": 100 * (losses[0] - losses[-1]) / losses[0],
                     "accuracy": result["metrics"]["global"]["accuracy"]})
        print(method, lr, [round(x, 3) for x in losses], f"{rows[-1]['accuracy']:.1f}%", flush=True)
        out.write_text(json.dumps(rows, indent=1))
