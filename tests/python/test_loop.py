"""The module inside a train_v2.py-style loop (small backbone, PolynomialLRWarmup, SGD or AdamW,
clipping, GradScaler, gradient accumulation) against the float64 model of the reference in the same
loop from the same weights: the same losses, embedding gradients and centers over 20 steps."""
import copy

import pytest
import torch

from model import Float64PartialFC, Trainer, backbone, dataset
from partialfc.torch import CombinedMarginLoss, PartialFC_V2

C, D, B, STEPS, FEATURES = 300, 64, 32, 20, 48


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_pair(optimizer, lr, weight_decay, margin=(1.0, 0.5, 0.0), gradient_acc=1, fp16=False, skip_at=(), seed=0):
    torch.manual_seed(seed)
    ours = PartialFC_V2(CombinedMarginLoss(64, *margin), D, C)
    model = Float64PartialFC(ours.centers(), 64, *margin)
    data = dataset(STEPS, B, FEATURES, C)
    net = backbone(FEATURES, D)
    net64 = copy.deepcopy(net).double()
    kw = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, gradient_acc=gradient_acc, skip_at=skip_at)
    trainer = Trainer(net, ours, STEPS, fp16=fp16, **kw)
    trainer64 = Trainer(net64, model, STEPS, dtype=torch.float64, **kw)
    got, want = [], []
    for images, labels in data:
        got.append(trainer.step(images, labels) + (ours.centers(),))
        want.append(trainer64.step(images, labels) + (model.weight.detach().clone(),))
    assert len(got) == len(want) == STEPS
    worst = {"loss": 0.0, "grad": 0.0, "centers": 0.0}
    for (loss, grad, stepped, cg), (loss64, grad64, stepped64, cw) in zip(got, want):
        assert stepped == stepped64
        worst["loss"] = max(worst["loss"], abs(loss - loss64) / abs(loss64))
        worst["grad"] = max(worst["grad"], rel(grad, grad64))
        worst["centers"] = max(worst["centers"], rel(cg, cw))
    for what, err in worst.items():
        assert err < 1e-4, f"{what}: relative error {err:.3g} against the float64 model ({worst})"
    return got


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.1, 5e-4), ("adamw", 1e-3, 0.1)])
def test_train_v2_loop_matches_float64_model(optimizer, lr, wd):
    run_pair(optimizer, lr, wd)


def test_cosface_loop_matches_float64_model():
    run_pair("sgd", 0.1, 5e-4, margin=(1.0, 0.0, 0.4))
