"""The module inside a train_v2.py-style loop (small backbone, PolynomialLRWarmup, SGD or AdamW,
clipping, GradScaler, gradient accumulation) against the float64 model of the reference in the same
loop from the same weights: the same losses, embedding gradients and centers over 20 steps."""
import pytest
import torch

from model import Float64PartialFC, compare_in_loop

C, D, B, STEPS, FEATURES = 300, 64, 32, 20, 48


def run_pair(optimizer, lr, weight_decay, margin=(1.0, 0.5, 0.0), gradient_acc=1, fp16=False, skip_at=()):
    got, worst, _ = compare_in_loop(lambda weight: Float64PartialFC(weight, 64, *margin), torch.float64, C, D, B, STEPS,
                                 FEATURES, optimizer, lr, weight_decay, margin, gradient_acc, fp16, skip_at)
    for what, err in worst.items():
        assert err < 1e-4, f"{what}: relative error {err:.3g} against the float64 model ({worst})"
    return got


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.1, 5e-4), ("adamw", 1e-3, 0.1)])
def test_train_v2_loop_matches_float64_model(optimizer, lr, wd):
    run_pair(optimizer, lr, wd)


def test_cosface_loop_matches_float64_model():
    run_pair("sgd", 0.1, 5e-4, margin=(1.0, 0.0, 0.4))
