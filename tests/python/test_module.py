"""The module's surface: what parameters() and the optimizer see, eval mode and no-grad
evaluation, CPU embeddings in f32, f16 and bf16, bad input as PartialFCError with nothing changed,
unsupported optimizers refused with a reason, insightface's ArcFace/CosFace margin classes."""
import pytest
import torch

from model import Float64PartialFC
from partialfc import PartialFCError
from partialfc import _native as n
from partialfc.torch import CombinedMarginLoss, PartialFC_V2

C, D, B = 150, 32, 16


def module(margin=(1.0, 0.5, 0.0), **kw):
    torch.manual_seed(0)
    return PartialFC_V2(CombinedMarginLoss(64, *margin), D, C, **kw)


def batch(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g).to(dtype), torch.randint(0, C, (B,), generator=g)


def test_parameters_are_one_scalar_token_and_state_dict_keys_are_the_references():
    m = module()
    params = list(m.named_parameters())
    assert [name for name, _ in params] == ["pfc_token"] and params[0][1].shape == ()
    assert "weight" in m.state_dict()
    assert (m.num_local, m.class_start, m.num_sample) == (C, 0, C)


def test_eval_and_no_grad_evaluate_over_all_classes_and_change_nothing():
    m = module()
    emb, labels = batch()
    before = m.centers()
    expected = float(Float64PartialFC(before, 64, 1.0, 0.5, 0.0)(emb, labels).detach())
    m.eval()
    loss = m(emb, labels)
    assert loss.grad_fn is None
    assert abs(float(loss) - expected) / expected < 1e-5
    m.train()
    with torch.no_grad():
        assert abs(float(m(emb, labels)) - expected) / expected < 1e-5
    assert torch.equal(m.centers(), before)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_embeddings(dtype, tolerance):
    emb, labels = batch()
    reference = module()
    e32 = emb.clone().requires_grad_(True)
    loss32 = reference(e32, labels)
    loss32.backward()
    m = module()
    e = emb.to(dtype).requires_grad_(True)
    loss = m(e, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and e.grad.dtype == dtype
    assert abs(loss.item() - loss32.item()) / loss32.item() < tolerance
    assert float((e.grad.float() - e32.grad).norm() / e32.grad.norm()) < 2 * tolerance


def test_bad_input_raises_partialfc_error_and_changes_nothing():
    m = module()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    emb, labels = batch()
    before = m.centers()
    bad = labels.clone()
    bad[3] = C
    with pytest.raises(PartialFCError) as e:
        m(emb, bad)
    assert e.value.status == n.PFC_ERR_INVALID_ARGUMENT and "label" in e.value.message
    nan = emb.clone()
    nan[2, 5] = float("nan")
    with pytest.raises(PartialFCError, match="NaN"):
        m(nan, labels)
    opt.step()
    assert torch.equal(m.centers(), before)
    with pytest.raises(ValueError, match=r"\[batch, 32\]"):
        m(emb[:, :8], labels)
    with pytest.raises(TypeError, match="float32"):
        m(emb.double(), labels)


@pytest.mark.parametrize("make,reason", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
    (lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1), "L2 weight decay"),
    (lambda p: torch.optim.RMSprop(p, lr=0.1), "SGD or torch.optim.AdamW"),
])
def test_optimizers_the_head_cannot_follow_are_refused(make, reason):
    m = module()
    opt = make(m.parameters())
    emb, labels = batch()
    with pytest.raises(TypeError, match=reason):
        m(emb, labels).backward()
        opt.step()


def test_insightface_arcface_and_cosface_classes_are_read_too():
    class ArcFace(torch.nn.Module):
        def __init__(self, s=64.0, margin=0.5):
            super().__init__()
            self.s, self.margin = s, margin

    class CosFace(torch.nn.Module):
        def __init__(self, s=64.0, m=0.40):
            super().__init__()
            self.s, self.m = s, m

    emb, labels = batch()
    for margin, equivalent in [(ArcFace(), (1.0, 0.5, 0.0)), (CosFace(), (1.0, 0.0, 0.4))]:
        torch.manual_seed(0)
        a = PartialFC_V2(margin, D, C).eval()
        b = module(equivalent).eval()
        assert float(a(emb, labels)) == float(b(emb, labels))
    with pytest.raises(TypeError, match="CombinedMarginLoss"):
        PartialFC_V2(torch.nn.Identity(), D, C)


def test_combined_margin_loss_module_matches_the_float64_model():
    torch.manual_seed(5)
    weight = torch.randn(C, D)
    emb, labels = batch()
    for margin in [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.2, 0.2)]:
        cos = torch.nn.functional.normalize(emb.double()) @ torch.nn.functional.normalize(weight.double()).T
        logits = CombinedMarginLoss(64, *margin, interclass_filtering_threshold=0.3)(cos, labels)
        expected = Float64PartialFC(weight, 64, *margin, threshold=0.3)(emb, labels)
        assert torch.allclose(torch.nn.functional.cross_entropy(logits, labels), expected, rtol=1e-12)


@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
def test_margin_gradient_modes_match_the_float64_model(margin_grad):
    m = module(margin_grad=margin_grad)
    model = Float64PartialFC(m.centers(), 64, 1.0, 0.5, 0.0, exact=margin_grad == "exact")
    emb, labels = batch()
    e, e64 = emb.clone().requires_grad_(True), emb.double().requires_grad_(True)
    m(e, labels).backward()
    model(e64, labels).backward()
    assert float((e.grad.double() - e64.grad).norm() / e64.grad.norm()) < 1e-4


def test_fp16_flag_computes_the_gemms_in_half_precision():
    emb, labels = batch()
    losses = []
    for fp16 in (False, True):
        m = module(fp16=fp16)
        assert m.fp16 is fp16
        losses.append(float(m.eval()(emb, labels)))
    assert losses[0] != losses[1] and abs(losses[0] - losses[1]) / losses[0] < 2e-3


def test_nonfinite_nan_lets_grad_scaler_skip_the_step_and_leaves_the_head_unchanged():
    torch.manual_seed(0)
    m = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, nonfinite="nan")
    net = torch.nn.Linear(24, D)
    opt = torch.optim.SGD([{"params": net.parameters()}, {"params": m.parameters()}], lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    amp = torch.amp.GradScaler("cpu", growth_interval=100)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        before = m.centers()
        emb = net(torch.randn(B, 24, generator=g))
        if step == 2:
            emb = emb.clone()
            emb[1, 3] = float("inf")  # an overflow in the backbone's forward
        loss = m(emb, torch.randint(0, C, (B,), generator=g))
        amp.scale(loss).backward()
        amp.step(opt)
        amp.update()
        opt.zero_grad()
        assert torch.isnan(loss).item() == (step == 2)
        assert torch.equal(m.centers(), before) == (step == 2)
    assert amp.get_scale() == 2.0 ** 15  # halved once, by the skipped step


def test_nonfinite_nan_without_a_scaler_is_refused_at_the_step():
    m = module(nonfinite="nan")
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb, labels = batch()
    before = m.centers()
    emb[0, 0] = float("nan")
    m(emb, labels).backward()
    with pytest.raises(PartialFCError, match="non-finite") as e:
        opt.step()
    assert e.value.status == n.PFC_ERR_NON_FINITE
    assert torch.equal(m.centers(), before)


def test_half_and_dtype_moves_keep_the_head_and_its_token_in_f32():
    m = module()
    before = m.centers()
    m.half()
    m.to(torch.bfloat16)
    assert m.pfc_token.dtype == torch.float32 and torch.equal(m.centers(), before)
    assert m.train() is m and m.training and not m.eval().training
