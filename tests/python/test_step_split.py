"""The update applied at the optimizer's step (pfc_train_compute in forward, pfc_train_apply at
optimizer.step(), pfc_train_discard for a step that does not happen): GradScaler skipping a step
leaves the head unchanged and the run goes on as the float64 model's; train_v2's gradient
accumulation, with and without GradScaler; zero_grad without a step, a forward without backward and
two losses in one backward; a scaled loss refused; optimizer settings changed mid-run followed."""
import pytest
import torch

from model import Float64PartialFC
from partialfc import PartialFCError
from partialfc.torch import CombinedMarginLoss, PartialFC_V2
from test_loop import run_pair

C, D, B = 120, 32, 16


def fresh(seed=0):
    torch.manual_seed(seed)
    return PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)


def batches(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(count)]


def sgd(module, **kw):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **kw)


def step(module, opt, emb, labels, backward=True):
    loss = module(emb.clone().requires_grad_(True), labels)
    if backward:
        loss.backward()
    return loss


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.1, 5e-4), ("adamw", 1e-3, 0.1)])
def test_grad_scaler_skipping_a_step_leaves_the_head_unchanged(optimizer, lr, wd):
    got = run_pair(optimizer, lr, wd, fp16=True, skip_at=(5, 11))
    for skipped in (5, 11):
        assert not got[skipped - 1][2]
        assert torch.equal(got[skipped - 1][3], got[skipped - 2][3]), f"the head changed at skipped step {skipped}"


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.1, 5e-4), ("adamw", 1e-3, 0.1)])
def test_gradient_accumulation_matches_float64_model(optimizer, lr, wd):
    got = run_pair(optimizer, lr, wd, gradient_acc=2)
    assert not got[0][2] and got[1][2]


def test_gradient_accumulation_under_grad_scaler_with_a_skip():
    run_pair("sgd", 0.1, 5e-4, gradient_acc=2, fp16=True, skip_at=(6,))


def one_step(emb, labels):
    """The centers of a fresh module after one step on this batch alone."""
    m = fresh()
    opt = sgd(m)
    step(m, opt, emb, labels)
    opt.step()
    return m.centers()


def test_zero_grad_without_a_step_drops_the_gradient():
    (a_emb, a_lab), (b_emb, b_lab) = batches(2)
    m = fresh()
    opt = sgd(m)
    step(m, opt, a_emb, a_lab)
    opt.zero_grad()
    step(m, opt, b_emb, b_lab)
    opt.step()
    assert torch.equal(m.centers(), one_step(b_emb, b_lab))


def test_a_forward_without_backward_does_not_reach_the_centers():
    (a_emb, a_lab), (b_emb, b_lab) = batches(2)
    m = fresh()
    opt = sgd(m)
    before = m.centers()
    step(m, opt, a_emb, a_lab, backward=False)
    opt.step()
    assert torch.equal(m.centers(), before)
    step(m, opt, a_emb, a_lab, backward=False)
    step(m, opt, b_emb, b_lab)
    opt.step()
    assert torch.equal(m.centers(), one_step(b_emb, b_lab))


def test_two_losses_in_one_backward_accumulate():
    (a_emb, a_lab), (b_emb, b_lab) = batches(2)
    m = fresh()
    opt = sgd(m)
    (m(a_emb, a_lab) + m(b_emb, b_lab)).backward()
    opt.step()
    acc = fresh()
    opt_acc = sgd(acc)
    step(acc, opt_acc, a_emb, a_lab)
    step(acc, opt_acc, b_emb, b_lab)
    opt_acc.step()
    assert torch.equal(m.centers(), acc.centers())
    model = Float64PartialFC(fresh().centers(), 64, 1.0, 0.5, 0.0)
    opt64 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    (model(a_emb, a_lab) + model(b_emb, b_lab)).backward()
    opt64.step()
    assert float((m.centers().double() - model.weight.detach()).norm() / model.weight.detach().norm()) < 1e-5


def test_a_loss_scaled_outside_grad_scaler_is_refused():
    (emb, labels), = batches(1)
    m = fresh()
    opt = sgd(m)
    before = m.centers()
    (m(emb, labels) * 0.5).backward()
    with pytest.raises(PartialFCError, match="scaled by 0.5"):
        opt.step()
    assert torch.equal(m.centers(), before)
    opt.zero_grad()
    step(m, opt, emb, labels)
    opt.step()  # the next step works
    assert not torch.equal(m.centers(), before)


def test_optimizer_settings_changed_mid_run_are_followed():
    data = batches(6)
    m = fresh()
    model = Float64PartialFC(m.centers(), 64, 1.0, 0.5, 0.0)
    opt = sgd(m)
    opt64 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for i, (emb, labels) in enumerate(data):
        if i == 3:
            for o in (opt, opt64):
                o.param_groups[0]["weight_decay"] = 1e-2
                o.param_groups[0]["momentum"] = 0.5
                o.param_groups[0]["lr"] = 0.05
        step(m, opt, emb, labels)
        model(emb, labels).backward()
        opt.step()
        opt64.step()
        opt.zero_grad()
        opt64.zero_grad()
    err = float((m.centers().double() - model.weight.detach()).norm() / model.weight.detach().norm())
    assert err < 1e-5
