"""state_dict(): the reference's `weight` plus the head's checkpoint. A round trip through
torch.save/torch.load continues training bit-identically (centers, optimizer state, step, sampling);
a reference state_dict (weight only) loads; bad state dicts fail as torch's own modules fail."""
import io

import pytest
import torch

from model import Float64PartialFC, Trainer, backbone, dataset, resumed_identically
from partialfc.torch import CombinedMarginLoss, PartialFC_V2

C, D, B, FEATURES = 240, 32, 24, 40


def make_trainer(optimizer, sample_rate, seed, steps):
    torch.manual_seed(seed)
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, sample_rate)
    lr = 0.1 if optimizer == "sgd" else 1e-3
    return Trainer(backbone(FEATURES, D, seed=seed), head, steps, optimizer=optimizer, lr=lr)


@pytest.mark.parametrize("optimizer,sample_rate", [("sgd", 1.0), ("adamw", 0.5), ("sgd", 0.3)])
def test_state_dict_round_trip_continues_bit_identically(optimizer, sample_rate):
    data = dataset(12, B, FEATURES, C)
    a = make_trainer(optimizer, sample_rate, 0, len(data))
    for images, labels in data[:6]:
        a.step(images, labels)
    # Other initial weights: the load must replace them.
    resumed_identically(a, lambda: make_trainer(optimizer, sample_rate, 7, len(data)), data[6:])


def test_reference_state_dict_loads():
    torch.manual_seed(3)
    weight = torch.randn(C, D) * 0.01
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    result = module.load_state_dict({"weight": weight})  # what the reference's state_dict() holds
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(module.centers(), weight)
    state = module.state_dict()
    assert list(state) == ["weight", "_extra_state"]
    assert torch.equal(state["weight"], weight)


def test_same_seed_draws_the_references_initial_weight():
    torch.manual_seed(11)
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    torch.manual_seed(11)
    assert torch.equal(module.centers(), torch.normal(0, 0.01, (C, D)))


def test_a_changed_weight_row_is_set_and_the_rest_keep_their_state():
    data = dataset(4, B, FEATURES, C)
    a = make_trainer("sgd", 1.0, 0, len(data))
    for images, labels in data[:2]:
        a.step(images, labels)
    state = a.head.state_dict()
    state["weight"] = state["weight"].clone()
    state["weight"][5] = 0.25
    a.head.load_state_dict(state)
    assert torch.equal(a.head.centers(), state["weight"])


def test_bad_state_dicts_fail_like_torch_modules():
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    before = module.centers()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        module.load_state_dict({"weight": torch.zeros(C + 1, D)})
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        module.load_state_dict({"weight": before, "bias": torch.zeros(C)})
    state = module.state_dict()
    state["_extra_state"]["checkpoint"]["manifest.json"][10] ^= 1
    with pytest.raises(RuntimeError, match="PFC_ERR_CORRUPT"):
        module.load_state_dict(state)
    assert torch.equal(module.centers(), before)


def test_pickling_the_module_is_refused_with_a_reason():
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(module, io.BytesIO())


def test_a_reference_train_v2_checkpoint_resumes():
    # What train_v2.py saves for a reference run: the module's state_dict (weight) and the
    # optimizer's, which holds a momentum buffer for that weight. The float32 copy of the float64
    # model stands in for the reference module: the same parameter name and shape.
    torch.manual_seed(2)
    reference = Float64PartialFC(torch.randn(C, D) * 0.01, 64, 1.0, 0.5, 0.0).float()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb, labels = torch.randn(B, D), torch.randint(0, C, (B,))
    reference(emb, labels).backward()
    ref_opt.step()
    saved = io.BytesIO()
    torch.save({"state_dict_softmax_fc": reference.state_dict(), "state_optimizer": ref_opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)

    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    module.load_state_dict(checkpoint["state_dict_softmax_fc"])
    assert torch.equal(module.centers(), reference.weight.detach())
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.load_state_dict(checkpoint["state_optimizer"])
    with pytest.warns(UserWarning, match="dropped optimizer state held for pfc_token"):
        module(emb.clone().requires_grad_(True), labels).backward()
        opt.step()
    assert not opt.state and not torch.equal(module.centers(), reference.weight.detach())
