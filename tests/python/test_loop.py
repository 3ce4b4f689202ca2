"""The module inside a train_v2.py-style loop (small backbone, PolynomialLRWarmup, SGD or AdamW,
clipping, GradScaler, gradient accumulation) against the float64 model of the reference in the same
loop from the same weights: the same losses, embedding gradients and centers over 20 steps."""
import copy

import pytest
import torch

from model import Float64PartialFC, backbone, dataset, train_v2_loop
from partialfc.torch import CombinedMarginLoss, PartialFC_V2

C, D, B, STEPS, FEATURES = 300, 64, 32, 20, 48


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def record(into):
    def on_step(step, loss, grad, stepped):
        into.append((step, loss, grad))
    return on_step


def run_pair(optimizer, lr, weight_decay, margin=(1.0, 0.5, 0.0), gradient_acc=1, fp16=False, skip_at=(), seed=0):
    torch.manual_seed(seed)
    ours = PartialFC_V2(CombinedMarginLoss(64, *margin), D, C)
    model = Float64PartialFC(ours.centers(), 64, *margin)
    data = dataset(STEPS, B, FEATURES, C)
    net = backbone(FEATURES, D)
    net64 = copy.deepcopy(net).double()
    got, want, centers_got, centers_want = [], [], [], []

    def ours_step(step, loss, grad, stepped):
        got.append((step, loss, grad))
        centers_got.append(ours.centers())

    def model_step(step, loss, grad, stepped):
        want.append((step, loss, grad))
        centers_want.append(model.weight.detach().clone())

    kw = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, gradient_acc=gradient_acc, skip_at=skip_at)
    train_v2_loop(net, ours, data, fp16=fp16, on_step=ours_step, **kw)
    train_v2_loop(net64, model, data, dtype=torch.float64, on_step=model_step, **kw)
    assert len(got) == len(want) == STEPS
    worst = {"loss": 0.0, "grad": 0.0, "centers": 0.0}
    for (step, loss, grad), (_, loss64, grad64), cg, cw in zip(got, want, centers_got, centers_want):
        worst["loss"] = max(worst["loss"], abs(loss - loss64) / abs(loss64))
        worst["grad"] = max(worst["grad"], rel(grad, grad64))
        worst["centers"] = max(worst["centers"], rel(cg, cw))
    for what, err in worst.items():
        assert err < 1e-4, f"{what}: relative error {err:.3g} against the float64 model ({worst})"
    return ours, centers_got


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.1, 5e-4), ("adamw", 1e-3, 0.1)])
def test_train_v2_loop_matches_float64_model(optimizer, lr, wd):
    run_pair(optimizer, lr, wd)


def test_cosface_loop_matches_float64_model():
    run_pair("sgd", 0.1, 5e-4, margin=(1.0, 0.0, 0.4))
