#!/usr/bin/env python3
"""The train_v2.py-style loop of the tests with insightface's own PartialFC_V2 in place of the
float64 model: partialfc.torch against the true reference — same backbone, data and initial weights,
20 steps — at world size 1 and over 2 gloo processes (DDP backbone). Beside each case the same loop
against the float64 model, and against the float64 model reporting the reference's clamped loss
(each sample's target probability clamped at 1e-30, so a sample's loss is capped at 69.08; the
gradient is not clamped). The reference cannot be fetched in CI, so this runs by hand and its output
is committed (docs/benchmarks.md). The reference's files stay outside the repository:

  .venv/bin/python tests/python/compare_reference.py --reference-dir /tmp/ref
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_workers  # noqa: E402
from model import Float64PartialFC, compare_in_loop  # noqa: E402
from partialfc.torch import CombinedMarginLoss, PartialFC_V2  # noqa: E402
from test_distributed import free_port  # noqa: E402

C, D, B, STEPS, FEATURES = 300, 64, 32, 20, 48
CAP = -math.log(1e-30)
CASES = [  # optimizer, lr, weight decay, margin, gradient_acc, GradScaler, GradScaler-skipped steps
    ("sgd", 0.1, 5e-4, (1.0, 0.5, 0.0), 1, False, ()),
    ("adamw", 1e-3, 0.1, (1.0, 0.5, 0.0), 1, False, ()),
    ("sgd", 0.1, 5e-4, (1.0, 0.0, 0.4), 1, False, ()),
    ("sgd", 0.1, 5e-4, (1.0, 0.5, 0.0), 2, False, ()),
    ("sgd", 0.1, 5e-4, (1.0, 0.5, 0.0), 1, True, (5,)),
    ("adamw", 1e-3, 0.1, (1.0, 0.5, 0.0), 2, True, (6,)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-dir", default=os.environ.get("PFC_REFERENCE_DIR"))
    a = ap.parse_args()
    if not a.reference_dir:
        sys.exit("--reference-dir must name a folder with the reference's partial_fc_v2.py and losses.py")
    torch.Tensor.cuda = lambda self, *args, **kw: self  # the reference hard-codes .cuda()
    sys.path.insert(0, a.reference_dir)
    from partial_fc_v2 import PartialFC_V2 as Reference
    from losses import CombinedMarginLoss as ReferenceMargin

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)

    # One forward from the same weights: the reference's reported loss is the clamped one, ours the exact one.
    torch.manual_seed(0)
    ref = Reference(ReferenceMargin(64, 1.0, 0.5, 0.0), D, C, 1.0, False)
    emb, labels = torch.randn(B, D), torch.randint(0, C, (B,))
    ours = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C).eval()
    ours.load_state_dict({"weight": ref.weight.detach()})
    weight = ref.weight.detach()
    with torch.no_grad():
        print(json.dumps({"single_forward_loss": {
            "reference": float(ref(emb, labels.clone())), "partialfc_torch": float(ours(emb, labels)),
            "float64_model": float(Float64PartialFC(weight, 64, 1.0, 0.5, 0.0)(emb, labels)),
            "float64_model_clamped_loss": float(Float64PartialFC(weight, 64, 1.0, 0.5, 0.0, loss_cap=CAP)(emb, labels))}}),
            flush=True)

    def reference(margin):
        def make(weight):
            ref = Reference(ReferenceMargin(64, *margin), D, C, 1.0, False)
            with torch.no_grad():
                ref.weight.copy_(weight)
            return ref
        return make

    for optimizer, lr, wd, margin, acc, fp16, skip in CASES:
        others = {"reference": (reference(margin), torch.float32),
                  "float64_model": (lambda w: Float64PartialFC(w, 64, *margin), torch.float64),
                  "float64_model_clamped_loss": (lambda w: Float64PartialFC(w, 64, *margin, loss_cap=CAP),
                                                 torch.float64)}
        row = {"world_size": 1, "optimizer": optimizer, "margin": margin, "gradient_acc": acc, "grad_scaler": fp16,
               "skipped_steps": list(skip), "steps": STEPS}
        for name, (make, dtype) in others.items():
            _, worst, smallest = compare_in_loop(make, dtype, C, D, B, STEPS, FEATURES, optimizer, lr, wd, margin, acc,
                                                 fp16, skip)
            row["vs_" + name] = worst
            if name == "reference":
                row["reference_smallest_loss"] = smallest
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()

    for optimizer, lr, wd, margin, acc, fp16, skip in CASES:
        if margin != (1.0, 0.5, 0.0):
            continue
        for other in ("reference", "float64"):  # rank 0 prints one JSON line per run
            mp.spawn(dist_workers.loop, nprocs=2, args=(2, free_port(), optimizer, lr, wd, acc, fp16, skip, None, 301, D,
                                                       16, STEPS, FEATURES, other, a.reference_dir))


if __name__ == "__main__":  # the spawned ranks import this file: they must not run it
    main()
