"""What the torch module is compared with: a float64 model of SPEC §1 (the reference's PartialFC_V2
semantics at sample_rate 1, one process) as a torch module with a real `weight` Parameter, so a torch
optimizer updates it exactly as the reference's optimizer updates its weight; a train_v2.py-style
training loop that drives either module; and the reference's PolynomialLRWarmup schedule."""
import copy
import math

import torch
import torch.nn.functional as F


class Float64PartialFC(torch.nn.Module):
    """Cosine logits with the combined margin (straight-through gradient by default, SPEC §1.8), the
    inter-class filter, and an exact log-softmax cross-entropy averaged over the batch, all in float64."""

    def __init__(self, weight, s, m1, m2, m3, threshold=0.0, exact=False, loss_cap=None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().to(torch.float64).clone())
        self.s, self.m1, self.m2, self.m3, self.threshold = s, m1, m2, m3, threshold
        self.exact = exact  # the true derivative of the margin instead of the straight-through one
        # The reference clamps each sample's target probability at 1e-30 (a loss of at most 69.08)
        # in the loss it reports, not in its gradient; loss_cap reproduces that report.
        self.loss_cap = loss_cap

    def forward(self, embeddings, labels):
        labels = labels.reshape(-1).long()
        x = F.normalize(embeddings.to(self.weight.dtype))
        cos = (x @ F.normalize(self.weight).T).clamp(-1, 1)
        rows = torch.arange(labels.shape[0])
        if self.threshold > 0:
            with torch.no_grad():
                dirty = cos > self.threshold
                dirty[rows, labels] = False
            cos = cos.masked_fill(dirty, 0.0)
        with torch.set_grad_enabled(self.exact and torch.is_grad_enabled()):
            target = cos[rows, labels]
            shift = torch.zeros_like(cos)
            shift[rows, labels] = torch.cos(self.m1 * torch.acos(target) + self.m2) - self.m3 - target
        if not self.exact:
            shift = shift.detach()
        logits = (cos + shift) * self.s
        if self.loss_cap is None:
            return F.cross_entropy(logits, labels)
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        reported = per_sample.detach().clamp(max=self.loss_cap)
        return (per_sample + (reported - per_sample.detach())).mean()


def polynomial_lr_warmup(optimizer, warmup_iters, total_iters, power=1.0):
    """insightface's PolynomialLRWarmup schedule (linear warmup from 0, then polynomial decay to 0)
    as a LambdaLR: lr_t = base·t/w for t ≤ w, base·(1 − (min(t, T) − w)/(T − w))^power after."""
    def factor(t):
        if t <= warmup_iters:
            return t / warmup_iters if warmup_iters > 0 else 1.0
        return (1.0 - (min(total_iters, t) - warmup_iters) / (total_iters - warmup_iters)) ** power
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backbone(in_features, embedding_size, dtype=torch.float32, seed=1):
    """A small stand-in for iresnet: linear, PReLU, linear, BatchNorm1d features."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(in_features, 96), torch.nn.PReLU(96), torch.nn.Linear(96, embedding_size),
        torch.nn.BatchNorm1d(embedding_size))
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return net.to(dtype)


def dataset(steps, batch, in_features, num_classes, seed=2):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, in_features, generator=g)
    out = []
    for _ in range(steps):
        labels = torch.randint(0, num_classes, (batch,), generator=g)
        images = centers[labels] + 0.5 * torch.randn(batch, in_features, generator=g)
        out.append((images, labels))
    return out


class Trainer:
    """train_v2.py's loop: one optimizer over [backbone, head] param groups, PolynomialLRWarmup, the
    GradScaler branch when `fp16`, gradient accumulation, backbone clipping at 5, and its checkpoint
    dict (backbone, head, optimizer, scheduler). `skip_at`: global steps whose update GradScaler must
    skip (an Inf is put in a backbone gradient there; without fp16 the step is simply not taken, the
    same effect on a model without a scaler)."""

    def __init__(self, net, head, total_steps, optimizer="sgd", lr=0.1, weight_decay=5e-4, gradient_acc=1,
                 fp16=False, warmup=3, skip_at=(), dtype=torch.float32):
        self.net, self.head, self.dtype = net, head, dtype
        groups = [{"params": net.parameters()}, {"params": head.parameters()}]
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(params=groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            self.opt = torch.optim.AdamW(params=groups, lr=lr, weight_decay=weight_decay)
        self.scheduler = polynomial_lr_warmup(self.opt, warmup, total_steps)
        self.amp = torch.amp.GradScaler("cpu", growth_interval=100) if fp16 else None
        self.gradient_acc, self.skip_at, self.global_step = gradient_acc, set(skip_at), 0

    def step(self, images, labels):
        """One iteration; returns (loss, embedding gradient of the unscaled loss, whether the update ran)."""
        self.global_step += 1
        embeddings = self.net(images.to(self.dtype))
        embeddings.retain_grad()
        loss = self.head(embeddings, labels)
        stepped = self.global_step % self.gradient_acc == 0
        skip = self.global_step in self.skip_at
        amp, opt = self.amp, self.opt
        scale = amp.get_scale() if amp else 1.0
        if amp:
            amp.scale(loss).backward()
            if stepped:
                if skip:
                    next(self.net.parameters()).grad.view(-1)[0] = float("inf")
                amp.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5)
                amp.step(opt)
                amp.update()
                opt.zero_grad()
        else:
            loss.backward()
            if stepped:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5)
                if not skip:
                    opt.step()
                opt.zero_grad()
        self.scheduler.step()
        return float(loss.detach()), embeddings.grad.detach() / scale, stepped and not skip

    def state_dict(self):
        return {"global_step": self.global_step, "state_dict_backbone": self.net.state_dict(),
                "state_dict_softmax_fc": self.head.state_dict(), "state_optimizer": self.opt.state_dict(),
                "state_lr_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, checkpoint):
        self.global_step = checkpoint["global_step"]
        self.net.load_state_dict(checkpoint["state_dict_backbone"])
        self.head.load_state_dict(checkpoint["state_dict_softmax_fc"])
        self.opt.load_state_dict(checkpoint["state_optimizer"])
        self.scheduler.load_state_dict(checkpoint["state_lr_scheduler"])


def resumed_identically(a, make_b, data):
    """`a`'s state_dict saved, loaded into the trainer `make_b()` makes, and both stepped over `data`:
    the losses, embedding gradients, sampled counts and centers equal step by step. Returns `b`."""
    import io
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    expected = [a.step(x, y) + (a.head.centers(),) for x, y in data]
    b = make_b()
    saved.seek(0)
    b.load_state_dict(torch.load(saved, weights_only=True))
    got = [b.step(x, y) + (b.head.centers(),) for x, y in data]
    for step, ((la, ga, sa, ca), (lb, gb, sb, cb)) in enumerate(zip(expected, got)):
        assert la == lb, f"step {step}: loss {lb} != {la}"
        assert torch.equal(ga, gb), f"step {step}: embedding gradients differ"
        assert torch.equal(ca, cb), f"step {step}: centers differ"
        assert sa == sb
    return b


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64 (the golden files' measure)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_in_loop(make_other, other_dtype, classes, dim, batch, steps, features, optimizer, lr, weight_decay,
                    margin=(1.0, 0.5, 0.0), gradient_acc=1, fp16=False, skip_at=()):
    """partialfc.torch.PartialFC_V2 and another head (`make_other(initial centers)`, with a `weight`
    Parameter) trained side by side by Trainer from the same centers, backbone and data; the other
    loop runs in `other_dtype`. Returns our per-step (loss, embedding grad, stepped, centers), the
    worst relative errors of loss, embedding gradient and centers over the steps, and the other
    head's smallest loss (small losses are where an f32 log-softmax loses digits)."""
    from partialfc.torch import CombinedMarginLoss, PartialFC_V2
    torch.manual_seed(0)
    ours = PartialFC_V2(CombinedMarginLoss(64, *margin), dim, classes)
    other = make_other(ours.centers())
    data = dataset(steps, batch, features, classes)
    net = backbone(features, dim)
    net_other = copy.deepcopy(net).to(other_dtype)
    kw = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, gradient_acc=gradient_acc, skip_at=skip_at)
    trainer = Trainer(net, ours, steps, fp16=fp16, **kw)
    trainer_other = Trainer(net_other, other, steps, dtype=other_dtype, **kw)
    got, worst = [], {"loss": 0.0, "grad": 0.0, "centers": 0.0}
    smallest_loss = math.inf
    for images, labels in data:
        mine = trainer.step(images, labels) + (ours.centers(),)
        loss, grad, stepped, centers = trainer_other.step(images, labels) + (other.weight.detach().clone(),)
        assert mine[2] == stepped
        worst["loss"] = max(worst["loss"], abs(mine[0] - loss) / abs(loss))
        smallest_loss = min(smallest_loss, loss)
        worst["grad"] = max(worst["grad"], rel(mine[1], grad))
        worst["centers"] = max(worst["centers"], rel(mine[3], centers))
        got.append(mine)
    return got, worst, smallest_loss


def golden_step_errors(module, opt, t, step, centers, dtype=None):
    """One step of a golden file (`t`, its tensors) through `module` (called on the step's embeddings,
    in `dtype` if given, and labels) and `opt`: the relative errors of the loss, the embedding
    gradient and, after the optimizer step, `centers()`."""
    emb = t[f"emb.{step}"].clone() if dtype is None else t[f"emb.{step}"].to(dtype)
    emb.requires_grad_(True)
    loss = module(emb, t[f"labels.{step}"])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return {
        "loss": rel(loss.detach().reshape(1), t[f"loss.{step}"]),
        "grad_emb": rel(emb.grad, t[f"grad_emb.{step}"]),
        "weight": rel(centers(), t[f"weight.{step}"]),
    }


def golden_margin(cfg):
    """The margin of a golden file's `config`: partialfc.torch's AdaFace or CurricularFace for the
    authors' heads (its `head`), the combined margin otherwise."""
    from partialfc.torch import AdaFace, CombinedMarginLoss, CurricularFace
    if cfg.get("head") == "adaface":
        return AdaFace(cfg["m"], cfg["h"], cfg["s"], cfg["t_alpha"])
    if cfg.get("head") == "curricular":
        return CurricularFace(cfg["m"], cfg["s"])
    return CombinedMarginLoss(cfg["scale"], cfg["m1"], cfg["m2"], cfg["m3"], cfg["interclass_filtering_threshold"])


def golden_optimizer(cfg, params):
    """The torch optimizer a golden file's `config` names, with its settings."""
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["adamw_betas"]), eps=cfg["adamw_eps"],
                                 weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


class Float64AdaFace(torch.nn.Module):
    """AdaFace as SPEC §1.6a states it, in float64 with autograd for the exact margin gradient: the
    model the library's AdaFace is checked against where the authors' head has no vectors (r < 1,
    several shards: at any sampling the loss is this softmax over the sampled columns). `sampled`
    restricts the softmax to those columns (the labels' among them). Running statistics update in
    training mode only, before use."""

    EPS = 1e-3

    def __init__(self, weight, s, m, h, t_alpha):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().to(torch.float64).clone())
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        self.state = [20.0, 100.0]

    def forward(self, embeddings, labels, sampled=None):
        eps, labels = self.EPS, labels.reshape(-1).long()
        e = embeddings.to(torch.float64)
        norms = e.norm(dim=1).detach().clamp(0.001, 100)
        mean, std = self.state
        if self.training:
            mean = self.t_alpha * float(norms.mean()) + (1 - self.t_alpha) * mean
            std = self.t_alpha * float(norms.std()) + (1 - self.t_alpha) * std
            self.state = [mean, std]
        g = ((norms - mean) / (std + eps) * self.h).clamp(-1, 1)
        w, cols = F.normalize(self.weight), labels
        if sampled is not None:
            w, cols = w[sampled], torch.searchsorted(sampled, labels)
        cos = (F.normalize(e) @ w.T).clamp(-1 + eps, 1 - eps)
        rows = torch.arange(labels.shape[0])
        theta = torch.acos(cos[rows, cols])
        target = torch.cos((theta - self.m * g).clamp(eps, math.pi - eps)) - (self.m + self.m * g)
        logits = cos.index_put((rows, cols), target) * self.s
        return F.cross_entropy(logits, cols)


class Float64CurricularFace(torch.nn.Module):
    """CurricularFace as SPEC §1.6a states it, in float64 with autograd (t held constant in the
    reweighting); `sampled` and training mode as for `Float64AdaFace`."""

    def __init__(self, weight, s, m):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().to(torch.float64).clone())
        self.s, self.m = s, m
        self.t = 0.0

    def forward(self, embeddings, labels, sampled=None):
        labels = labels.reshape(-1).long()
        w, cols = F.normalize(self.weight), labels
        if sampled is not None:
            w, cols = w[sampled], torch.searchsorted(sampled, labels)
        cos = (F.normalize(embeddings.to(torch.float64)) @ w.T).clamp(-1, 1)
        rows = torch.arange(labels.shape[0])
        target = cos[rows, cols]
        with_margin = torch.cos(torch.acos(target) + self.m)
        phi = torch.where(target > math.cos(math.pi - self.m), with_margin, target - self.m * math.sin(math.pi - self.m))
        if self.training:
            self.t = 0.01 * float(target.detach().mean()) + 0.99 * self.t
        hard = cos > with_margin.detach()[:, None]
        logits = torch.where(hard, cos * (self.t + cos), cos).index_put((rows, cols), phi) * self.s
        return F.cross_entropy(logits, cols)


def adaptive_margin_head(cfg, weight):
    """The float64 model of an adaptive-margin golden file's `config` (its `head`)."""
    if cfg["head"] == "adaface":
        return Float64AdaFace(weight, cfg["s"], cfg["m"], cfg["h"], cfg["t_alpha"])
    return Float64CurricularFace(weight, cfg["s"], cfg["m"])


def adaptive_margin_state(head):
    """The running statistics of a float64 adaptive-margin model, as the golden files' `state.t`."""
    return list(head.state) if isinstance(head, Float64AdaFace) else [head.t]


def set_adaptive_margin_state(head, values):
    """Sets a float64 adaptive-margin model's running statistics from `adaptive_margin_state`'s list."""
    if isinstance(head, Float64AdaFace):
        head.state = [float(v) for v in values]
    else:
        (head.t,) = (float(v) for v in values)
