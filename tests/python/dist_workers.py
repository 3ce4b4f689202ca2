"""Processes of the multi-process tests (test_distributed.py starts them with
torch.multiprocessing.spawn, one per rank, over a gloo process group on this machine), as torchrun
would: each builds its PartialFC_V2 under an initialized torch.distributed and drives it."""
import copy
import io
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from model import Float64PartialFC, Trainer, backbone, dataset, golden_margin, golden_optimizer, rel
from partialfc.torch import CombinedMarginLoss, PartialFC_V2


def init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def finish():
    """Every rank past its last collective before any tears gloo down: a rank that leaves first can
    abort a peer still finishing ("terminate called without an active exception"). Even then a
    worker of a destroyed group has been seen to abort the same way in the interpreter's own exit
    (C++ destructors of torch's threads), after every check had passed; the worker therefore leaves
    with os._exit once its checks are done. A failed check raises before this, and spawn reports it."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def golden(rank, world, port, path, tolerance):
    """One golden file over `world` ranks — its own world size, or any for the authors' adaptive-margin
    heads (one process, every class: the same at every shard count): rank r feeds rows [r·B, (r+1)·B)
    of each step and checks its loss, its rows of the embedding gradient (world size times the
    gradient of the global mean loss), its classes' centers and the margin's running statistics."""
    init(rank, world, port)
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    t = load_file(path)
    module = PartialFC_V2(golden_margin(cfg), cfg["embedding_dim"], cfg["num_classes"], cfg["sample_rate"])
    rows = slice(module.class_start, module.class_start + module.num_local)
    module.load_state_dict({"weight": t["weight_init"][rows]})
    opt = golden_optimizer(cfg, module.parameters())
    b = cfg["batch_per_rank"] * cfg["world_size"] // world
    mine = slice(rank * b, (rank + 1) * b)
    grad_scale = world / cfg["world_size"]
    for step in range(cfg["steps"]):
        emb = t[f"emb.{step}"][mine].clone().requires_grad_(True)
        loss = module(emb, t[f"labels.{step}"][mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        errors = {"loss": rel(loss.detach().reshape(1), t[f"loss.{step}"]),
                  "grad_emb": rel(emb.grad, t[f"grad_emb.{step}"][mine] * grad_scale),
                  "weight": rel(module.centers(), t[f"weight.{step}"][rows])}
        if "head" in cfg:
            errors["state"] = rel(torch.tensor(list(module.margin_state.values())), t[f"state.{step}"])
        for what, err in errors.items():
            assert err < tolerance, f"{os.path.basename(path)} rank {rank} step {step} {what}: relative error {err:.3g}"
    finish()


class DistFloat64PartialFC(Float64PartialFC):
    """The float64 model over a process group: the global batch gathered, the global mean loss, the
    local embeddings' gradient times world size (the reference's convention). Every rank holds all
    centers and updates them alike."""

    def forward(self, embeddings, labels):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(embeddings) for _ in range(world)]
        dist.all_gather(parts, embeddings.detach().contiguous())
        label_parts = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(label_parts, labels.contiguous())
        if embeddings.requires_grad:
            embeddings.register_hook(lambda g: g * world)
        parts[rank] = embeddings
        return super().forward(torch.cat(parts), torch.cat(label_parts))


def other_head(kind, weight, rows, reference_dir):
    """The head ours is compared with: the float64 model (all centers on every rank), or
    insightface's own PartialFC_V2 from `reference_dir` (this rank's centers). Returns the module,
    the dtype its loop runs in, and a function giving this rank's centers."""
    if kind == "float64":
        model = DistFloat64PartialFC(weight, 64, 1.0, 0.5, 0.0)
        return model, torch.float64, lambda: model.weight.detach()[rows]
    torch.Tensor.cuda = lambda self, *args, **kw: self  # the reference hard-codes .cuda()
    sys.path.insert(0, reference_dir)
    from partial_fc_v2 import PartialFC_V2 as Reference
    from losses import CombinedMarginLoss as ReferenceMargin
    reference = Reference(ReferenceMargin(64, 1.0, 0.5, 0.0), weight.shape[1], weight.shape[0], 1.0, False)
    with torch.no_grad():
        reference.weight.copy_(weight[rows])
    return reference, torch.float32, lambda: reference.weight.detach()


def loop(rank, world, port, optimizer, lr, weight_decay, gradient_acc, fp16, skip_at, tolerance, classes, dim, batch,
         steps, features, other="float64", reference_dir=None):
    """train_v2.py's loop on every rank (DDP backbone, each rank its own data) with our module and with
    another head (`other_head`), from the same weights; every rank checks the global loss, its
    embedding gradient and its classes' centers at every step against `tolerance`, or with
    tolerance None rank 0 prints the worst relative errors as JSON."""
    init(rank, world, port)
    torch.manual_seed(0)
    weight = torch.normal(0, 0.01, (classes, dim))
    ours = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, classes)
    rows = slice(ours.class_start, ours.class_start + ours.num_local)
    ours.load_state_dict({"weight": weight[rows]})
    model, dtype, model_centers = other_head(other, weight, rows, reference_dir)
    net = backbone(features, dim)
    net_other = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(net).to(dtype))
    net = torch.nn.parallel.DistributedDataParallel(net)
    kw = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, gradient_acc=gradient_acc, skip_at=skip_at)
    trainer = Trainer(net, ours, steps, fp16=fp16, **kw)
    trainer_other = Trainer(net_other, model, steps, dtype=dtype, **kw)
    worst = {"loss": 0.0, "grad": 0.0, "centers": 0.0}
    for images, labels in dataset(steps, batch, features, classes, seed=2 + rank):
        loss, grad, stepped = trainer.step(images, labels)
        loss_other, grad_other, stepped_other = trainer_other.step(images, labels)
        assert stepped == stepped_other
        worst["loss"] = max(worst["loss"], abs(loss - loss_other) / abs(loss_other))
        worst["grad"] = max(worst["grad"], rel(grad, grad_other))
        worst["centers"] = max(worst["centers"], rel(ours.centers(), model_centers()))
    if tolerance is None:
        everyone = [None] * world
        dist.all_gather_object(everyone, worst)
        if rank == 0:
            print(json.dumps({"world_size": world, "other": other, "optimizer": optimizer, "gradient_acc": gradient_acc,
                              "grad_scaler": fp16, "skipped_steps": list(skip_at), "steps": steps,
                              "worst_relative_error_per_rank": everyone}), flush=True)
    else:
        for what, err in worst.items():
            assert err < tolerance, f"rank {rank}: {what} relative error {err:.3g} against {other} ({worst})"
    finish()


def state_round_trip(rank, world, port, sample_rate, classes, dim, batch, features):
    """A train_v2 checkpoint per rank (checkpoint_gpu_{rank}.pt) written mid-run and loaded by a
    fresh job continues bit-identically on every rank."""
    init(rank, world, port)
    data = dataset(10, batch, features, classes, seed=2 + rank)

    def trainer(seed):
        torch.manual_seed(seed)
        head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, classes, sample_rate)
        net = torch.nn.parallel.DistributedDataParallel(backbone(features, dim, seed=seed))
        return Trainer(net, head, len(data), optimizer="adamw", lr=1e-3, weight_decay=0.1)

    a = trainer(0)
    for images, labels in data[:5]:
        a.step(images, labels)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    expected = [a.step(x, y) + (a.head.centers(),) for x, y in data[5:]]
    b = trainer(9)
    saved.seek(0)
    b.load_state_dict(torch.load(saved, weights_only=True))
    got = [b.step(x, y) + (b.head.centers(),) for x, y in data[5:]]
    for step, ((la, ga, _, ca), (lb, gb, _, cb)) in enumerate(zip(expected, got)):
        assert la == lb and torch.equal(ga, gb) and torch.equal(ca, cb), f"rank {rank} step {step} differs"
    finish()
