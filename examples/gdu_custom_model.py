"""The GDU check (Ernoult 2020) on a network of your own: EP's per-step updates against BPTT's
per-step gradients, for the lateral-connection Φ of ``lateral_phi.py``.

    python examples/gdu_custom_model.py [--quick]

Writes gdu.json (and figures, with matplotlib) into runs/gdu-lateral-example.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lateral_phi import Lateral, LateralConfig  # noqa: E402

from eqprop.data import load_dataset  # noqa: E402
from eqprop.gdu import run_gdu  # noqa: E402
from eqprop.gdu.run import converged_t1  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--out", default="runs/gdu-lateral-example")
args = parser.parse_args()

model = Lateral(LateralConfig(hidden=32 if args.quick else 256), torch.Generator().manual_seed(0)).double()
data = load_dataset("mnist-demo", "train")
x = data.x[:8].flatten(1).double() / 255
target = torch.nn.functional.one_hot(data.y[:8], 10).double()
k = 10
t1 = converged_t1(model, x, k)
report = run_gdu(model, x, target, t1=t1, k=k, beta=0.01, estimators=["symmetric", "one_sided"],
                 out_dir=args.out)
for name, summary in report["estimators"].items():
    print(f"{name:<10} angle to BPTT {summary['angle_deg']:.3f} degrees")
print(f"T1 {t1}, K {k}; report in {args.out}")
