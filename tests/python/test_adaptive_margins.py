"""partialfc.torch.AdaFace and CurricularFace as PartialFC_V2's margin_loss (SPEC §1.6a, issue #25):
the authors' heads' vectors (../shared/golden/adaface_*, curricular_*) through the drop-in, in one
process and over two; the float64 models (model.py) on the sampled columns at sample_rate < 1 (through
the drop-in, and the library's head over three shards), with AdamW and gradient accumulation; the running statistics in margin_state, through state_dict and
untouched by evaluation; settings without a meaning refused by name."""
import io
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import dist_workers
from golden import TOLERANCE, adaptive_golden_files
from model import (adaptive_margin_head, adaptive_margin_state, golden_margin, golden_optimizer, golden_step_errors, rel,
                   set_adaptive_margin_state)
from partialfc import PartialFCError
from partialfc import _native as n
from partialfc._head import Batch, Head, config
from partialfc.torch import AdaFace, CombinedMarginLoss, CurricularFace, PartialFC_V2
from test_distributed import free_port

HEADS = ["adaface", "curricular"]
# Settings other than the golden files' (which are the defaults), so that every one is seen to reach
# the head.
OTHER_SETTINGS = {"adaface": dict(m=0.35, h=0.5, s=48.0, t_alpha=0.05), "curricular": dict(m=0.45, s=48.0)}


def golden_case(golden_dir, head):
    ((path, cfg),) = [(p, c) for p, c in adaptive_golden_files(golden_dir) if c["head"] == head]
    return path, cfg, load_file(path)


def other_settings(cfg):
    return dict(cfg, **OTHER_SETTINGS[cfg["head"]])


def golden_module(cfg, t, sample_rate=1.0):
    module = PartialFC_V2(golden_margin(cfg), cfg["embedding_dim"], cfg["num_classes"], sample_rate)
    module.load_state_dict({"weight": t["weight_init"]})
    return module


def statistics(module):
    return torch.tensor(list(module.margin_state.values()))


def train_step(module, opt, emb, labels):
    """One forward, backward and optimizer step; (loss, embedding gradient, centers, statistics)."""
    emb = emb.clone().requires_grad_(True)
    loss = module(emb, labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach()), emb.grad, module.centers(), module.margin_state


@pytest.mark.parametrize("head", HEADS)
def test_the_module_reproduces_the_authors_head(golden_dir, head):
    path, cfg, t = golden_case(golden_dir, head)
    module = golden_module(cfg, t)
    assert list(module.margin_state.values()) == cfg["initial_state"]
    opt = golden_optimizer(cfg, module.parameters())
    for step in range(cfg["steps"]):
        errors = golden_step_errors(module, opt, t, step, module.centers)
        errors["state"] = rel(statistics(module), t[f"state.{step}"])
        for what, err in errors.items():
            assert err < TOLERANCE, f"{head} step {step} {what}: relative error {err:.3g}"


@pytest.mark.parametrize("head", HEADS)
def test_two_processes_reproduce_the_authors_head(golden_dir, head):
    path, _, _ = golden_case(golden_dir, head)
    mp.spawn(dist_workers.golden, args=(2, free_port(), path, TOLERANCE), nprocs=2)


def model_sparse_sgd_step(model, momentum, cfg, emb, labels, sampled):
    """The float64 model's step over the `sampled` columns, updating them alone (momentum buffers
    included, as the library's sparse SGD): its loss and embedding gradient."""
    e64 = emb.double().requires_grad_(True)
    loss64 = model(e64, labels, sampled)
    loss64.backward()
    with torch.no_grad():
        w = model.weight
        momentum[sampled] = cfg["momentum"] * momentum[sampled] + w.grad[sampled] + cfg["weight_decay"] * w[sampled]
        w[sampled] -= cfg["lr"] * momentum[sampled]
        w.grad = None
    return float(loss64.detach()), e64.grad


@pytest.mark.parametrize("head", HEADS)
def test_sampled_columns_match_the_float64_model(golden_dir, head):
    # The sampled classes are the rows a step changes (sparse update, SGD with weight decay); the
    # model takes its softmax over them and updates them alone, momentum buffers included.
    _, cfg, t = golden_case(golden_dir, head)
    cfg = other_settings(cfg)
    module = golden_module(cfg, t, sample_rate=0.25)
    opt = golden_optimizer(cfg, module.parameters())
    model = adaptive_margin_head(cfg, t["weight_init"])
    momentum = torch.zeros_like(model.weight)
    for step in range(cfg["steps"]):
        emb, labels = t[f"emb.{step}"], t[f"labels.{step}"]
        before = module.centers()
        loss, grad, centers, _ = train_step(module, opt, emb, labels)
        sampled = torch.where((centers != before).any(dim=1))[0]
        assert len(sampled) == module.last_stats["sampled_classes"] == int(0.25 * cfg["num_classes"])
        assert set(labels.tolist()) <= set(sampled.tolist())
        expected, grad64 = model_sparse_sgd_step(model, momentum, cfg, emb, labels, sampled)
        errors = {"loss": abs(loss - expected) / expected, "grad_emb": rel(grad, grad64),
                  "weight": rel(centers, model.weight.detach()), "state": rel(statistics(module), torch.tensor(adaptive_margin_state(model)))}
        for what, err in errors.items():
            assert err < TOLERANCE, f"{head} r=0.25 step {step} {what}: relative error {err:.3g}"


@pytest.mark.parametrize("head", HEADS)
def test_three_shards_on_their_sampled_columns_match_the_float64_model(golden_dir, head):
    # The library's head itself (three local shards, each sampling a quarter of its classes, the
    # batch split over them): CurricularFace's target cosines and AdaFace's statistics must cross
    # the shards for the softmax over the union of their sampled columns to be the model's.
    _, cfg, t = golden_case(golden_dir, head)
    cfg = other_settings(cfg)
    margin = golden_margin(cfg).config_fields()
    c, d = cfg["num_classes"], cfg["embedding_dim"]
    lib = Head(config(num_classes=c, embedding_dim=d, sample_rate=0.25, local_shards=3, lr=cfg["lr"],
                      momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], **margin))
    init = t["weight_init"].contiguous()
    lib.set_centers(0, c, init.data_ptr())
    model = adaptive_margin_head(cfg, init)
    momentum = torch.zeros_like(model.weight)
    for step in range(cfg["steps"]):
        emb, labels = t[f"emb.{step}"].contiguous(), t[f"labels.{step}"].contiguous()
        grad = torch.empty_like(emb)
        rows = [len(r) for r in torch.arange(len(labels)).chunk(3)]
        starts = [sum(rows[:i]) for i in range(3)]
        batches = [Batch(emb[a:].data_ptr(), labels[a:].data_ptr(), grad[a:].data_ptr(), r, n.PFC_DTYPE_F32)
                   for a, r in zip(starts, rows)]
        before = torch.empty(c, d)
        lib.get_centers(0, c, before.data_ptr())
        stats = lib.train_step(batches)
        centers = torch.empty(c, d)
        lib.get_centers(0, c, centers.data_ptr())
        sampled = torch.where((centers != before).any(dim=1))[0]
        assert len(sampled) == stats.sampled_classes and set(labels.tolist()) <= set(sampled.tolist())
        expected, grad64 = model_sparse_sgd_step(model, momentum, cfg, emb, labels, sampled)
        # Each shard returns local_shards × its rows' gradient of the mean loss (the reference's convention).
        errors = {"loss": abs(stats.loss - expected) / expected, "grad_emb": rel(grad / 3, grad64),
                  "weight": rel(centers, model.weight.detach()),
                  "state": rel(torch.tensor(lib.margin_state()), torch.tensor(adaptive_margin_state(model)))}
        for what, err in errors.items():
            assert err < TOLERANCE, f"{head} 3 shards r=0.25 step {step} {what}: relative error {err:.3g}"
    lib.close()


@pytest.mark.parametrize("head", HEADS)
def test_adamw_and_gradient_accumulation_fold_every_forward_once(golden_dir, head):
    # The first AdamW step replaces the head (created with SGD) and recomputes the step's forwards:
    # the statistics must come out as the forwards made them, each folded once.
    _, cfg, t = golden_case(golden_dir, head)
    cfg = other_settings(cfg)
    module = golden_module(cfg, t)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1)
    model = adaptive_margin_head(cfg, t["weight_init"])
    opt64 = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(cfg["steps"]):
            emb, labels = t[f"emb.{step}"], t[f"labels.{step}"]
            halves = [(emb[:32], labels[:32]), (emb[32:], labels[32:])]
            for e, y in halves:
                module(e, y).backward()
                model(e.double(), y).backward()
            opt.step()
            opt.zero_grad()
            opt64.step()
            opt64.zero_grad()
            for what, err in {"weight": rel(module.centers(), model.weight.detach()),
                              "state": rel(statistics(module), torch.tensor(adaptive_margin_state(model)))}.items():
                assert err < TOLERANCE, f"{head} AdamW step {step} {what}: relative error {err:.3g}"


@pytest.mark.parametrize("head", HEADS)
def test_a_recomputed_step_keeps_its_margins_and_the_statistics_exact(golden_dir, head):
    # A forward that is not backpropagated is dropped at the step by recomputing the others, each from
    # the statistics its first computation saw (pfc_set_margin_state); the statistics after the step are
    # those every forward folded, once. The same as dropping that forward's gradient before the next one.
    _, cfg, t = golden_case(golden_dir, head)
    a = golden_module(cfg, t, sample_rate=0.5)
    opt_a = golden_optimizer(cfg, a.parameters())
    b = golden_module(cfg, t, sample_rate=0.5)
    opt_b = golden_optimizer(cfg, b.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a(t["emb.0"], t["labels.0"])
        a(t["emb.1"], t["labels.1"]).backward()
        opt_a.step()
        b(t["emb.0"], t["labels.0"]).backward()
        opt_b.zero_grad()  # a step GradScaler skipped: the forward's gradient is dropped, its fold stays
        b(t["emb.1"], t["labels.1"]).backward()
        opt_b.step()
    assert a.margin_state == b.margin_state and list(a.margin_state.values()) != cfg["initial_state"]
    assert torch.equal(a.centers(), b.centers())


@pytest.mark.parametrize("head", HEADS)
def test_the_statistics_survive_a_state_dict_round_trip(golden_dir, head):
    _, cfg, t = golden_case(golden_dir, head)
    a = golden_module(cfg, t, sample_rate=0.5)
    opt_a = golden_optimizer(cfg, a.parameters())
    train_step(a, opt_a, t["emb.0"], t["labels.0"])
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    at_save = a.margin_state
    assert list(at_save.values()) != cfg["initial_state"]
    expected = [train_step(a, opt_a, t[f"emb.{s}"], t[f"labels.{s}"]) for s in (1, 2)]

    torch.manual_seed(9)
    b = PartialFC_V2(golden_margin(cfg), cfg["embedding_dim"], cfg["num_classes"], 0.5)
    saved.seek(0)
    b.load_state_dict(torch.load(saved, weights_only=True))
    assert b.margin_state == at_save
    opt_b = golden_optimizer(cfg, b.parameters())
    got = [train_step(b, opt_b, t[f"emb.{s}"], t[f"labels.{s}"]) for s in (1, 2)]
    for step, ((la, ga, ca, sa), (lb, gb, cb, sb)) in enumerate(zip(expected, got)):
        assert la == lb and torch.equal(ga, gb) and torch.equal(ca, cb) and sa == sb, f"step {step} after the load"

    # A state of another margin kind is refused, and the module keeps its own.
    torch.manual_seed(9)
    combined = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), cfg["embedding_dim"], cfg["num_classes"], 0.5)
    with pytest.raises(RuntimeError, match="PFC_ERR_INCOMPATIBLE.*running statistics"):
        combined.load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="PFC_ERR_INCOMPATIBLE.*running statistics"):
        b.load_state_dict(combined.state_dict())
    assert b.margin_state == got[-1][3] and combined.margin_state == {}


@pytest.mark.parametrize("head", HEADS)
def test_evaluation_neither_folds_nor_uses_a_new_batchs_statistics(golden_dir, head):
    _, cfg, t = golden_case(golden_dir, head)
    module = golden_module(cfg, t)
    opt = golden_optimizer(cfg, module.parameters())
    train_step(module, opt, t["emb.0"], t["labels.0"])
    held = module.margin_state
    model = adaptive_margin_head(cfg, module.centers()).eval()
    set_adaptive_margin_state(model, held.values())
    with torch.no_grad():
        expected = float(model(t["emb.1"], t["labels.1"]))
    module.eval()
    assert abs(float(module(t["emb.1"], t["labels.1"])) - expected) / expected < TOLERANCE
    module.train()
    with torch.no_grad():
        assert abs(float(module(t["emb.1"], t["labels.1"])) - expected) / expected < TOLERANCE
    assert module.margin_state == held


def test_margin_settings_without_a_meaning_are_refused_by_name():
    d, c = 16, 40
    for margin in (AdaFace(), CurricularFace()):
        for margin_grad in ("exact", "straight_through"):
            with pytest.raises(ValueError, match="margin_grad applies to the combined margin only"):
                PartialFC_V2(margin, d, c, margin_grad=margin_grad)
    for margin in (AdaFace(), CurricularFace()):
        with pytest.raises(PartialFCError, match="arcface_fallback") as e:
            PartialFC_V2(margin, d, c, arcface_fallback=True)
        assert e.value.status == n.PFC_ERR_INVALID_ARGUMENT
    for margin, field in [(AdaFace(h=20), "adaface_h"), (AdaFace(t_alpha=0), "adaface_t_alpha"), (AdaFace(m=2), "margin_m"),
                          (CurricularFace(m=2), "margin_m")]:
        with pytest.raises(PartialFCError, match=field):
            PartialFC_V2(margin, d, c)
    for make in (lambda: AdaFace(m=0), lambda: CurricularFace(m=0)):
        with pytest.raises(ValueError, match="m = 0"):
            make()

    # The authors' heads hold their own centers and statistics beside an `s` and an `m` that would
    # otherwise read as CosFace: refused, naming what cannot be taken over.
    class AuthorsAdaFace(torch.nn.Module):  # mk-minchul/AdaFace head.py's attributes
        def __init__(self):
            super().__init__()
            self.kernel = torch.nn.Parameter(torch.zeros(d, c))
            self.m, self.eps, self.h, self.s, self.t_alpha = 0.4, 1e-3, 0.333, 64.0, 0.01
            self.register_buffer("batch_mean", torch.ones(1) * 20)
            self.register_buffer("batch_std", torch.ones(1) * 100)

    class AuthorsCurricularFace(torch.nn.Module):  # HuangYG123/CurricularFace head/metrics.py's
        def __init__(self):
            super().__init__()
            self.m, self.s = 0.5, 64.0
            self.kernel = torch.nn.Parameter(torch.zeros(d, c))
            self.register_buffer("t", torch.zeros(1))

    for foreign in (AuthorsAdaFace(), AuthorsCurricularFace()):
        with pytest.raises(TypeError, match=r"has `kernel`.*partialfc\.torch\.AdaFace"):
            PartialFC_V2(foreign, d, c)
    assert PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), d, c).margin_state == {}
