#!/usr/bin/env python3
"""The train_v2.py-style loop of test_loop.py with insightface's own PartialFC_V2 in place of the
float64 model: partialfc.torch against the true reference, same backbone, data and initial weights,
20 steps, world size 1 and 2 (gloo processes); beside it the same case against the float64 model, since the
reference's f32 loss loses digits as the loss gets small (-log of a probability near 1). The reference cannot be fetched in CI, so this runs by hand and its
output is committed (docs/benchmarks.md). The reference's files stay outside the repository:

  .venv/bin/python tests/python/compare_reference.py --reference-dir /tmp/ref
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Float64PartialFC, compare_in_loop  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--reference-dir", default=os.environ.get("PFC_REFERENCE_DIR"), required=False)
a = ap.parse_args()
if not a.reference_dir:
    sys.exit("--reference-dir must name a folder with the reference's partial_fc_v2.py and losses.py")
torch.Tensor.cuda = lambda self, *args, **kw: self  # the reference hard-codes .cuda()
sys.path.insert(0, a.reference_dir)
from partial_fc_v2 import PartialFC_V2 as Reference  # noqa: E402
from losses import CombinedMarginLoss as ReferenceMargin  # noqa: E402

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29547")
dist.init_process_group("gloo", rank=0, world_size=1)
C, D, B, STEPS, FEATURES = 300, 64, 32, 20, 48


def reference(margin):
    def make(weight):
        ref = Reference(ReferenceMargin(64, *margin), D, C, 1.0, False)
        with torch.no_grad():
            ref.weight.copy_(weight)
        return ref
    return make


def float64_model(margin):
    return lambda weight: Float64PartialFC(weight, 64, *margin)


cases = [
    ("sgd", 0.1, 5e-4, (1.0, 0.5, 0.0), 1, False, ()),
    ("adamw", 1e-3, 0.1, (1.0, 0.5, 0.0), 1, False, ()),
    ("sgd", 0.1, 5e-4, (1.0, 0.0, 0.4), 1, False, ()),
    ("sgd", 0.1, 5e-4, (1.0, 0.5, 0.0), 2, False, ()),
    ("sgd", 0.1, 5e-4, (1.0, 0.5, 0.0), 1, True, (5,)),
    ("adamw", 1e-3, 0.1, (1.0, 0.5, 0.0), 2, True, (6,)),
]
for optimizer, lr, wd, margin, acc, fp16, skip in cases:  # world size 1
    _, worst, smallest = compare_in_loop(reference(margin), torch.float32, C, D, B, STEPS, FEATURES, optimizer, lr, wd,
                                         margin, acc, fp16, skip)
    _, worst64, _ = compare_in_loop(float64_model(margin), torch.float64, C, D, B, STEPS, FEATURES, optimizer, lr, wd,
                                    margin, acc, fp16, skip)
    print(json.dumps({"optimizer": optimizer, "margin": margin, "gradient_acc": acc, "grad_scaler": fp16,
                      "skipped_steps": list(skip), "steps": STEPS, "reference_smallest_loss": smallest,
                      "worst_relative_error_vs_reference": worst, "worst_relative_error_vs_float64_model": worst64}))
dist.destroy_process_group()

# World size 2: two gloo processes, DDP backbone, each rank its own data (tests/python/dist_workers.py).
import torch.multiprocessing as mp  # noqa: E402
from test_distributed import free_port  # noqa: E402
import dist_workers  # noqa: E402

for optimizer, lr, wd, _, acc, fp16, skip in cases:
    if _ != (1.0, 0.5, 0.0):
        continue
    for other in ("reference", "float64"):
        mp.spawn(dist_workers.loop, nprocs=2, args=(2, free_port(), optimizer, lr, wd, acc, fp16, skip, None, 301, 64, 16,
                                                   STEPS, 48, other, a.reference_dir))
