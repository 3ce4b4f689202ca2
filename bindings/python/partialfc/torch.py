"""`PartialFC_V2` for PyTorch trainers: insightface arcface_torch's module of that name, backed by
libpartialfc. A `train_v2.py` user changes one line — the import — and keeps the rest of the loop:

    from partialfc.torch import PartialFC_V2
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
    module_partial_fc.train().cuda()
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}], ...)
    ...
    loss = module_partial_fc(local_embeddings, local_labels)
    loss.backward(); opt.step(); opt.zero_grad()

How it maps onto the head (and where it differs from the reference):
- The class centers live in the library, not in a torch Parameter. `parameters()` yields one scalar
  placeholder, `pfc_token`, whose place in the optimizer's param groups ties the head to that
  optimizer: at each `optimizer.step()` the head takes the learning rate of the token's param group
  (so `PolynomialLRWarmup` or any scheduler drives it) and that group's SGD or AdamW settings.
- forward runs the head's forward and backward at once (pfc_train_compute): the loss comes back
  with its embedding gradient ready, and the centers' gradient accumulates in the head. The update
  is applied at the optimizer's step (pfc_train_apply). A step that does not happen — GradScaler
  skipping it, or `zero_grad()` without a step — drops the accumulated gradient; several
  forward/backward passes before one step accumulate, as train_v2's gradient accumulation does.
- The loss scale does not reach the head: the head's gradient is that of the unscaled loss, exactly
  what the reference applies after GradScaler unscales. A loss multiplied by anything else before
  `backward()` (or gradient clipping that includes `pfc_token`) cannot be honoured for the centers
  and is refused at the step with an error.
- At sample_rate < 1 only the sampled centers and their optimizer state change (sparse update,
  SPEC §1.9); the reference's v2 applies momentum and weight decay to every center every step. At
  sample_rate = 1 the update is the reference's. The negatives are drawn by the library's
  counter-based sampler (different on every shard), not by torch's random generator.
- The margin is the true combined margin s·(cos(m1·θ + m2) − m3); the reference ignores m2 when m3 > 0.
- `margin_loss` may also be `AdaFace(m, h, s, t_alpha)` or `CurricularFace(m, s)` (SPEC §1.6a): the
  margins of those authors' heads, with their exact margin gradient. AdaFace takes each sample's
  margin from the norm of the embedding the module receives: pass the backbone's features before
  any normalization, as the authors' head receives their norm beside the normalized features. The
  running statistics (AdaFace's batch_mean and batch_std over the global batch, CurricularFace's t)
  are `module.margin_state`; every training forward folds its batch in, as the authors' heads do at
  every forward, while evaluation (eval() or no autograd) neither folds nor uses a new batch's.
- `storage_dtype="bf16"` (keyword; default "f32") stores the centers and their optimizer state in
  bfloat16, half the memory, every update rounded stochastically (SPEC §2 `storage_dtype`). The
  centers still come and go as float32 — `centers()` and `state_dict()["weight"]` are the stored
  values widened exactly, a `weight` loaded is rounded to nearest — and the `_extra_state`
  checkpoint holds them as stored; either storage loads the other's state (bf16 into f32 exactly).
- `eval()` mode, or no autograd, evaluates the loss over all classes and changes nothing.
- state_dict() holds the reference's `weight` (this rank's centers, [num_local, embedding_size])
  and `_extra_state`, the head's full checkpoint (optimizer state, step, seed, the margin's running
  statistics; a state of another margin kind is refused); a reference
  state_dict (weight only) loads too, resetting the centers' optimizer state. The reference's
  optimizer state for its `weight` (inside the optimizer's state_dict) is not imported.
"""
import contextlib
import ctypes
import json
import math
import os
import shutil
import tempfile
import warnings
import weakref

import torch
from torch import distributed
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _native as n
from ._head import Batch, Head, PartialFCError, config

__all__ = ["PartialFC_V2", "CombinedMarginLoss", "AdaFace", "CurricularFace", "PartialFCError"]

_DTYPES = {torch.float32: n.PFC_DTYPE_F32, torch.float16: n.PFC_DTYPE_F16, torch.bfloat16: n.PFC_DTYPE_BF16}
_MARGIN_GRADS = {"straight_through": n.PFC_MARGIN_GRAD_STRAIGHT_THROUGH, "exact": n.PFC_MARGIN_GRAD_EXACT}
_STORAGE = {"f32": n.PFC_DTYPE_F32, torch.float32: n.PFC_DTYPE_F32, "bf16": n.PFC_DTYPE_BF16, torch.bfloat16: n.PFC_DTYPE_BF16}
_STATE_FORMAT = "partialfc.torch/1"


def _f32(x):
    return ctypes.c_float(float(x)).value


class CombinedMarginLoss(torch.nn.Module):
    """The package's equivalent of insightface's `losses.CombinedMarginLoss(s, m1, m2, m3,
    interclass_filtering_threshold)`: PartialFC_V2 reads these five settings from either class.

    As a module of its own it maps cosine logits [N, C] and labels [N] (-1: no target among these
    columns) to margin logits: the target becomes s·(cos(m1·θ + m2) − m3) and the rest s·cos, with
    the reference's straight-through gradient (∂logit/∂cos = s on every column); with a threshold t,
    non-target cosines above t are zeroed first.
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s = s
        self.m1 = m1
        self.m2 = m2
        self.m3 = m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        labels = labels.reshape(-1)
        rows = torch.where(labels != -1)[0]
        cols = labels[rows]
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = logits > self.interclass_filtering_threshold
                dirty[rows, cols] = False
            logits = logits.masked_fill(dirty, 0.0)
        with torch.no_grad():
            target = logits[rows, cols].clamp(-1, 1)
            margin = torch.cos(self.m1 * torch.arccos(target) + self.m2) - self.m3
            shift = torch.zeros_like(logits)
            shift[rows, cols] = margin - target
        return (logits + shift) * self.s


class AdaFace:
    """AdaFace (Kim et al., CVPR 2022) as PartialFC_V2's `margin_loss`: the settings of the authors'
    head (mk-minchul/AdaFace head.py, `AdaFace(embedding_size, classnum, m, h, s, t_alpha)`) without
    its centers, which PartialFC_V2 holds. m: the margin (0.4); h: how far a norm's standardized
    value moves it (0.333); s: the scale (64); t_alpha: the weight of the newest batch in the running
    norm statistics — 0.01, what the authors train with (their config.py), where head.py's own
    default is 1.0. The module takes the norms from the embeddings it receives (un-normalized
    features); its `margin_state` holds the running statistics, `batch_mean` and `batch_std`."""

    kind = n.PFC_MARGIN_ADAFACE
    state_names = ("batch_mean", "batch_std")

    def __init__(self, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
        _nonzero_margin(type(self).__name__, m)
        self.m, self.h, self.s, self.t_alpha = float(m), float(h), float(s), float(t_alpha)

    def config_fields(self):
        return dict(margin_kind=self.kind, margin_m=self.m, adaface_h=self.h, adaface_t_alpha=self.t_alpha, scale=self.s)

    def __repr__(self):
        return f"AdaFace(m={self.m}, h={self.h}, s={self.s}, t_alpha={self.t_alpha})"


class CurricularFace:
    """CurricularFace (Huang et al., CVPR 2020) as PartialFC_V2's `margin_loss`: the settings of the
    authors' head (HuangYG123/CurricularFace head/metrics.py, `CurricularFace(in_features,
    out_features, m, s)`) without its centers, which PartialFC_V2 holds. m: the margin (0.5); s: the
    scale (64). The module's `margin_state` holds the running curriculum parameter `t`."""

    kind = n.PFC_MARGIN_CURRICULAR
    state_names = ("t",)

    def __init__(self, m=0.5, s=64.0):
        _nonzero_margin(type(self).__name__, m)
        self.m, self.s = float(m), float(s)

    def config_fields(self):
        return dict(margin_kind=self.kind, margin_m=self.m, scale=self.s)

    def __repr__(self):
        return f"CurricularFace(m={self.m}, s={self.s})"


def _nonzero_margin(name, m):
    # pfc_config's margin_m = 0 means "the kind's default", so m = 0 cannot be passed through.
    if m == 0:
        raise ValueError(f"{name} m = 0 is not a margin partialfc can apply: its C ABI reads margin_m = 0 as the "
                         "kind's default; give m > 0")


# Attributes of objects PartialFC_V2 cannot read as a margin although they have `s` and `m`: the
# authors' AdaFace and CurricularFace heads (their own centers `kernel`, running statistics).
_FOREIGN_ADAPTIVE = ("kernel", "t_alpha", "batch_mean", "batch_std", "t")


def _margin_settings(margin_loss):
    """(pfc_config fields, names of the running statistics) of a margin: AdaFace or CurricularFace, a
    CombinedMarginLoss (insightface's or ours), or insightface's ArcFace(s, margin) / CosFace(s, m)."""
    if isinstance(margin_loss, (AdaFace, CurricularFace)):
        return margin_loss.config_fields(), margin_loss.state_names
    foreign = next((a for a in _FOREIGN_ADAPTIVE if hasattr(margin_loss, a)), None)
    if foreign is not None:
        raise TypeError(
            f"margin_loss {type(margin_loss).__name__} has `{foreign}`, which PartialFC_V2 cannot take over: the "
            "authors' AdaFace and CurricularFace heads hold class centers of their own (kernel) and running "
            "statistics, where PartialFC_V2 holds the centers and the library the statistics; pass the margin's "
            "settings as partialfc.torch.AdaFace(m, h, s, t_alpha) or partialfc.torch.CurricularFace(m, s)")
    combined = None
    if all(hasattr(margin_loss, a) for a in ("s", "m1", "m2", "m3")):
        t = getattr(margin_loss, "interclass_filtering_threshold", 0.0)
        combined = margin_loss.s, margin_loss.m1, margin_loss.m2, margin_loss.m3, t
    elif hasattr(margin_loss, "s") and hasattr(margin_loss, "margin"):
        combined = margin_loss.s, 1.0, margin_loss.margin, 0.0, 0.0
    elif hasattr(margin_loss, "s") and hasattr(margin_loss, "m"):
        combined = margin_loss.s, 1.0, 0.0, margin_loss.m, 0.0
    if combined is None:
        raise TypeError(
            "margin_loss must be partialfc.torch's AdaFace or CurricularFace, a CombinedMarginLoss (insightface's or "
            "partialfc.torch's: attributes s, m1, m2, m3, interclass_filtering_threshold) or insightface's "
            f"ArcFace/CosFace; got {type(margin_loss).__name__}")
    s, m1, m2, m3, t = (float(v) for v in combined)
    return dict(scale=s, m1=m1, m2=m2, m3=m3, interclass_filter=t), ()


def _optimizer_settings(optimizer, group):
    """The head's optimizer settings for the param group holding the token, in pfc_config terms."""
    def unsupported(what):
        return TypeError(f"partialfc's head cannot follow {type(optimizer).__name__} with {what}: "
                         "it implements PyTorch SGD (no dampening, no nesterov) and AdamW (no amsgrad)")

    if group.get("maximize", False):
        raise unsupported("maximize=True")
    wd = _f32(group.get("weight_decay", 0.0))
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("dampening", 0) != 0:
            raise unsupported("dampening")
        if group.get("nesterov", False):
            raise unsupported("nesterov=True")
        return (n.PFC_OPTIMIZER_SGD, _f32(group.get("momentum", 0.0)), wd, None, None, None)
    adamw = isinstance(optimizer, torch.optim.AdamW) or (
        isinstance(optimizer, torch.optim.Adam) and (group.get("decoupled_weight_decay", False) or wd == 0.0))
    if adamw:
        if group.get("amsgrad", False):
            raise unsupported("amsgrad=True")
        beta1, beta2 = group["betas"]
        return (n.PFC_OPTIMIZER_ADAMW, None, wd, _f32(beta1), _f32(beta2), _f32(group["eps"]))
    if isinstance(optimizer, torch.optim.Adam):
        raise unsupported("L2 weight decay (use AdamW)")
    raise TypeError(f"partialfc's head follows torch.optim.SGD or torch.optim.AdamW; {type(optimizer).__name__} "
                    "holds its pfc_token")


def _settings_of(cfg):
    if cfg.optimizer == n.PFC_OPTIMIZER_SGD:
        return (n.PFC_OPTIMIZER_SGD, cfg.momentum, cfg.weight_decay, None, None, None)
    return (n.PFC_OPTIMIZER_ADAMW, None, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps)


def _with_settings(cfg, settings):
    kind, momentum, wd, beta1, beta2, eps = settings
    out = n.pfc_config.from_buffer_copy(cfg)
    out.optimizer = kind
    out.weight_decay = wd
    if kind == n.PFC_OPTIMIZER_SGD:
        out.momentum = momentum
    else:
        out.beta1, out.beta2, out.eps = beta1, beta2, eps
    return out


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if distributed.get_backend() == "nccl" else torch.device("cpu")


def _broadcast_seed(seed):
    value = torch.tensor([seed], dtype=torch.int64, device=_collective_device())
    distributed.broadcast(value, 0)
    return int(value.item())


def _allgather_callback(world_size):
    """pfc_allgather_fn over torch.distributed's default group (gloo: CPU tensors; NCCL: CUDA)."""
    def allgather(ctx, send, size, recv):
        try:
            if size == 0:
                return 0
            device = _collective_device()
            mine = torch.empty(size, dtype=torch.uint8)
            ctypes.memmove(mine.data_ptr(), send, size)
            out = torch.empty(world_size * size, dtype=torch.uint8, device=device)
            distributed.all_gather_into_tensor(out, mine.to(device))
            host = out.cpu()
            ctypes.memmove(recv, host.data_ptr(), world_size * size)
            return 0
        except Exception as e:  # the library reports PFC_ERR_COMMUNICATION; say why here
            warnings.warn(f"partialfc: torch.distributed all_gather failed: {e!r}")
            return 1
    return n.pfc_allgather_fn(allgather)


class _Compute:
    """One forward's contribution to the head's accumulated gradient. Its embeddings and labels, and the
    margin's running statistics before it, are kept so that the contribution can be computed again,
    exactly, after the head was rebuilt or partly discarded."""

    __slots__ = ("embeddings", "labels", "statistics", "backwards", "finite")

    def __init__(self, embeddings, labels, statistics=(), finite=True):
        self.embeddings = embeddings
        self.labels = labels
        self.statistics = statistics
        self.backwards = 0
        self.finite = finite  # False: a non-finite step the head did not take (nonfinite="nan")


# id(token) -> module, for the optimizer hook. Weak: a module that is gone leaves no entry behind.
_MODULES = weakref.WeakValueDictionary()


def _before_optimizer_step(optimizer, args, kwargs):
    if not _MODULES:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            module = _MODULES.get(id(p))
            if module is not None and module.pfc_token is p:
                module._optimizer_step(optimizer, group)


register_optimizer_step_pre_hook(_before_optimizer_step)


class _HeadStep(torch.autograd.Function):
    """The loss of one forward; its backward hands out the embedding gradient computed with it."""

    @staticmethod
    def forward(ctx, embeddings, token, record, grad, loss):
        ctx.record = record
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        record = ctx.record
        if record.backwards:
            raise RuntimeError("partialfc: the loss of one PartialFC_V2 forward can be backpropagated once; "
                               "the head's gradient was accumulated at forward")
        record.backwards += 1
        grad_emb = None
        if ctx.needs_input_grad[0]:
            grad_emb = (ctx.grad.float() * grad_loss.float()).to(ctx.grad.dtype)
        # The token's gradient counts backward passes times the loss multiplier (the GradScaler
        # scale, which its unscale_ removes again): the optimizer hook checks it.
        token = grad_loss.detach().reshape(()).float()
        return grad_emb, token if record.finite else torch.full_like(token, float("nan")), None, None, None


class PartialFC_V2(torch.nn.Module):
    """insightface's `PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0,
    fp16=False)` on libpartialfc; see the module documentation for the mapping.

    Keyword-only extras: `seed` (sampling; default torch.initial_seed(), agreed with rank 0),
    `margin_grad` ("straight_through", the reference's and the default, or "exact") and
    `arcface_fallback` (the combined margin's only: AdaFace's and CurricularFace's gradient is the
    exact one, and they refuse either), `storage_dtype` ("f32", the default, or "bf16" — also
    torch.float32 / torch.bfloat16 — for the centers and their optimizer state), and
    `nonfinite`: "raise" (default: NaN/Inf embeddings or a non-finite step raise PartialFCError) or
    "nan" (they give a NaN loss and NaN gradients and leave the head untouched, so that AMP's
    GradScaler skips the step, as it does the reference's overflowing steps).
    torch.distributed, when initialized, gives the process layout (one shard per process); otherwise
    the module runs as a single process (world size 1).
    """

    _version = 2

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, *,
                 seed=None, margin_grad=None, arcface_fallback=False, nonfinite="raise", storage_dtype="f32"):
        super().__init__()
        if nonfinite not in ("raise", "nan"):
            raise ValueError(f"nonfinite must be 'raise' or 'nan', not {nonfinite!r}")
        if storage_dtype not in _STORAGE:
            raise ValueError(f"storage_dtype must be 'f32' or 'bf16' (or torch.float32, torch.bfloat16), not {storage_dtype!r}")
        self.storage_dtype = "bf16" if _STORAGE[storage_dtype] == n.PFC_DTYPE_BF16 else "f32"
        self.nonfinite = nonfinite
        margin, self._state_names = _margin_settings(margin_loss)
        adaptive = margin.get("margin_kind", n.PFC_MARGIN_COMBINED) != n.PFC_MARGIN_COMBINED
        if adaptive and margin_grad is not None:
            raise ValueError(f"margin_grad applies to the combined margin only, not to {type(margin_loss).__name__}, "
                             "whose margin gradient is the exact one: leave margin_grad unset")
        if margin.get("m3", 0) > 0 and margin.get("m2", 0) != 0:
            warnings.warn("partialfc applies the full combined margin s·(cos(m1·θ + m2) − m3); "
                          "insightface's CombinedMarginLoss ignores m2 when m3 > 0", stacklevel=2)
        margin_grad = "straight_through" if margin_grad is None else margin_grad
        if margin_grad not in _MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {sorted(_MARGIN_GRADS)}, not {margin_grad!r}")
        if distributed.is_available() and distributed.is_initialized():
            self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.margin_softmax = margin_loss
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.num_local = num_classes // self.world_size + int(self.rank < num_classes % self.world_size)
        self.class_start = num_classes // self.world_size * self.rank + min(self.rank, num_classes % self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        if seed is None:
            seed = torch.initial_seed() & ((1 << 63) - 1)
        keep = ()
        if self.world_size > 1:
            # One shard per process, the reference's layout; the library's traffic goes through
            # torch.distributed (SPEC §2a). Every process must sample alike: rank 0's seed wins.
            allgather = _allgather_callback(self.world_size)
            seed = _broadcast_seed(seed)
            keep = (allgather,)
        cfg = config(
            num_classes=self.num_classes, embedding_dim=self.embedding_size, sample_rate=self.sample_rate,
            **margin, margin_grad=_MARGIN_GRADS[margin_grad],
            arcface_fallback=int(bool(arcface_fallback)),
            compute_dtype=n.PFC_DTYPE_F16 if self.fp16 else n.PFC_DTYPE_F32, storage_dtype=_STORAGE[storage_dtype],
            seed=int(seed),
            # The centers come from torch's generator below, as the reference draws them.
            init_std=0.0, backend=n.PFC_BACKEND_CPU, local_shards=1)
        if self.world_size > 1:
            cfg.process_count, cfg.process_index, cfg.allgather = self.world_size, self.rank, keep[0]
        self._head = Head(cfg, keep)
        first, count = self._head.local_classes()
        assert (first, count) == (self.class_start, self.num_local), "partition differs from the reference's"
        # Drawn exactly as the reference draws its weight, so the same torch seed gives the same centers.
        weight = torch.normal(0, 0.01, (self.num_local, self.embedding_size))
        self._head.set_centers(first, count, weight.data_ptr())
        del weight
        self.pfc_token = torch.nn.Parameter(torch.zeros(()))
        self._device = self.pfc_token.device
        self._pending = []
        # Whether the head holds optimizer state a rebuild must carry over (steps applied, or a state loaded).
        self._stateful = False
        self.last_stats = None
        _MODULES[id(self.pfc_token)] = self

    # -- the step ---------------------------------------------------------------------------------

    def _batch(self, embeddings, labels, grad):
        memory, stream = n.PFC_MEMORY_HOST, None
        if embeddings.is_cuda:
            memory, stream = n.PFC_MEMORY_DEVICE, torch.cuda.current_stream(embeddings.device).cuda_stream
        return Batch(embeddings.data_ptr(), labels.data_ptr(), grad.data_ptr() if grad is not None else None,
                     embeddings.shape[0], _DTYPES[embeddings.dtype], memory, stream)

    def _inputs(self, embeddings, labels):
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"local_embeddings must be [batch, {self.embedding_size}], got {shape}")
        if embeddings.dtype not in _DTYPES:
            raise TypeError(f"local_embeddings must be float32, float16 or bfloat16, not {embeddings.dtype}")
        if embeddings.device != self._device:
            raise ValueError(f"local_embeddings are on {embeddings.device}, the head on {self._device}: "
                             "move the module with .cuda()/.to() or the embeddings")
        labels = labels.reshape(-1)
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
        labels = labels.to(device=embeddings.device, dtype=torch.int64).contiguous()
        return embeddings.detach().contiguous(), labels

    def _stats(self, stats):
        self.last_stats = {"loss": stats.loss, "accuracy": stats.accuracy, "step": stats.step,
                           "global_batch": stats.global_batch, "sampled_classes": stats.sampled_classes}

    def forward(self, local_embeddings, local_labels):
        embeddings, labels = self._inputs(local_embeddings, local_labels)
        if not (self.training and torch.is_grad_enabled()):
            stats = self._head.evaluate([self._batch(embeddings, labels, None)])
            self._stats(stats)
            return torch.tensor(stats.loss, dtype=torch.float32, device=embeddings.device)
        if self.nonfinite == "nan" and not self._all_finite(embeddings):
            return self._nan_loss(local_embeddings, embeddings)
        grad = torch.empty_like(embeddings)
        self._drop_cleared()
        # Only the adaptive margins keep statistics (on CUDA reading them is a device read).
        statistics = self._head.margin_state() if self._state_names else []
        try:
            stats = self._head.train_compute([self._batch(embeddings, labels, grad)])
        except PartialFCError as e:
            if self.nonfinite == "nan" and e.status == n.PFC_ERR_NON_FINITE:
                return self._nan_loss(local_embeddings, embeddings)
            raise
        self._stats(stats)
        # The step's own inputs are kept for a recomputation; the caller may reuse its tensors.
        record = _Compute(embeddings.clone() if embeddings.data_ptr() == local_embeddings.data_ptr() else embeddings,
                          labels.clone() if labels.data_ptr() == local_labels.data_ptr() else labels, statistics)
        self._pending.append(record)
        loss = torch.tensor(stats.loss, dtype=torch.float32, device=embeddings.device)
        return _HeadStep.apply(local_embeddings, self.pfc_token, record, grad, loss)

    def _all_finite(self, embeddings):
        finite = torch.isfinite(embeddings).all().to(dtype=torch.int32, device=_collective_device()
                                                     if self.world_size > 1 else embeddings.device)
        if self.world_size > 1:  # every process must take the same path into the collective step
            distributed.all_reduce(finite, distributed.ReduceOp.MIN)
        return bool(finite)

    def _nan_loss(self, local_embeddings, embeddings):
        """nonfinite="nan": a NaN loss and NaN gradients, the head untouched, so that GradScaler skips
        the step as it skips the reference's non-finite steps."""
        record = _Compute(None, None, finite=False)
        grad = torch.full_like(embeddings, float("nan"))
        loss = torch.tensor(float("nan"), dtype=torch.float32, device=embeddings.device)
        return _HeadStep.apply(local_embeddings, self.pfc_token, record, grad, loss)

    def _drop_cleared(self):
        """Gradients already backpropagated whose token gradient is gone were cleared by zero_grad
        without an optimizer step (a step GradScaler skipped, or an explicit reset): drop them."""
        if any(r.backwards for r in self._pending):
            token = self.pfc_token.grad
            if token is None or not bool(token.ne(0).any()):
                self._discard()

    def _discard(self):
        if self._pending:
            self._pending = []
            self._head.train_discard()

    def _recompute(self, records):
        """Computes `records` again, each from the running statistics its first computation started from
        (so with the same margins), then restores the statistics every forward made: the authors' heads
        fold each training forward in, backpropagated or not, once."""
        after = self._head.margin_state()
        try:
            for r in records:
                self._head.set_margin_state(r.statistics)
                grad = torch.empty_like(r.embeddings)
                self._head.train_compute([self._batch(r.embeddings, r.labels, grad)])
        finally:
            self._head.set_margin_state(after)

    def _optimizer_step(self, optimizer, group):
        # An optimizer the head cannot follow is refused before anything changes.
        settings = _optimizer_settings(optimizer, group)
        token = self.pfc_token.grad
        # The head's update is done here; the optimizer then skips the token (no gradient).
        self.pfc_token.grad = None
        if optimizer.state.pop(self.pfc_token, None):
            warnings.warn("partialfc: dropped optimizer state held for pfc_token (e.g. a reference optimizer "
                          "state_dict's state for its weight): the head keeps its own optimizer state")
        records, self._pending = self._pending, []
        if token is not None and not math.isfinite(float(token)):
            if records:
                self._head.train_discard()
            raise PartialFCError(
                n.PFC_ERR_NON_FINITE,
                "optimizer.step() ran after a non-finite forward (NaN/Inf embeddings or step, nonfinite='nan') or "
                "a non-finite loss gradient; GradScaler skips such steps. The accumulated gradient was dropped",
                "PartialFC_V2")
        if token is None or not bool(token.ne(0).any()):
            if records:
                self._head.train_discard()
            return
        done = [r for r in records if r.backwards]
        total = float(token)
        if abs(total - len(done)) > 1e-5 * max(1, len(done)):
            self._head.train_discard()
            raise PartialFCError(
                n.PFC_ERR_INVALID_ARGUMENT,
                f"the head's gradient was scaled by {total / max(1, len(done)):.6g} after its loss "
                f"({len(done)} backward passes give a pfc_token gradient of {total:.6g}, expected {len(done)}): "
                "partialfc applies the gradient of the unscaled loss to the centers, so multiply the loss only by "
                "GradScaler and clip only the backbone's gradients (as train_v2 does); the accumulated gradient "
                "was dropped", "PartialFC_V2")
        rebuild = settings != _settings_of(self._head.cfg)
        if rebuild or len(done) < len(records):
            if rebuild:
                self._rebuild(_with_settings(self._head.cfg, settings))
            else:
                self._head.train_discard()
            self._recompute(done)
        self._head.set_learning_rate(float(group["lr"]))
        self._head.train_apply()
        self._stateful = True

    # -- replacing the head (optimizer settings, device) ---------------------------------------------

    def _rebuild(self, cfg, keep=()):
        """Replaces the head by one created from `cfg`, carrying over its centers and the margin's running
        statistics — and, when it holds any, its optimizer state, step, seed and learning rate.
        Accumulated gradients are not carried."""
        old = self._head
        new = Head(cfg, old._keep + tuple(keep))
        try:
            if self._stateful:
                if cfg.optimizer != old.cfg.optimizer:
                    raise PartialFCError(n.PFC_ERR_INCOMPATIBLE,
                                         "the head holds state of another optimizer (SGD vs AdamW) from earlier steps",
                                         "PartialFC_V2")
                with self._shared_dir() as tmp:
                    old.save_checkpoint(tmp)
                    self._barrier()
                    new.load_checkpoint(tmp)
            else:
                first, count = old.local_classes()
                centers = self._read_centers(old)
                new.set_centers(first, count, centers.data_ptr())
                new.set_margin_state(old.margin_state())
        except BaseException:
            new.close()
            raise
        self._pending = []
        self._head = new
        old.close()

    def _read_centers(self, head=None):
        head = head or self._head
        first, count = head.local_classes()
        out = torch.empty((count, self.embedding_size), dtype=torch.float32)
        head.get_centers(first, count, out.data_ptr())
        return out

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.pfc_token.dtype != torch.float32:
            # .half()/.to(dtype) do not change the centers (in the library, stored as storage_dtype says); the token stays f32
            # so that GradScaler can unscale its gradient.
            self.pfc_token.data = self.pfc_token.data.float()
        device = self.pfc_token.device
        if device != self._device:
            if self._pending:
                raise RuntimeError("partialfc: move the module between optimizer steps, not with gradients pending")
            cfg, keep = n.pfc_config.from_buffer_copy(self._head.cfg), ()
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                keep = ((ctypes.c_int32 * 1)(index),)
                cfg.backend, cfg.devices = n.PFC_BACKEND_CUDA, ctypes.cast(keep[0], ctypes.POINTER(ctypes.c_int32))
            elif device.type == "cpu":
                cfg.backend, cfg.devices = n.PFC_BACKEND_CPU, None
            else:
                raise ValueError(f"partialfc runs on CPU or CUDA devices, not {device}")
            self._rebuild(cfg, keep)
            self._device = device
            _MODULES[id(self.pfc_token)] = self
        elif id(self.pfc_token) not in _MODULES:
            _MODULES[id(self.pfc_token)] = self
        return self

    # -- state --------------------------------------------------------------------------------------

    def centers(self, normalized=False):
        """This rank's class centers [num_local, embedding_size] (float32, CPU), a copy."""
        first, count = self._head.local_classes()
        out = torch.empty((count, self.embedding_size), dtype=torch.float32)
        self._head.get_centers(first, count, out.data_ptr(), normalized)
        return out

    @property
    def margin_state(self):
        """The margin's running statistics by name, read from the head (pfc_margin_state; SPEC §1.6a):
        AdaFace's {"batch_mean", "batch_std"}, CurricularFace's {"t"}, {} for the combined margin.
        The same on every rank; part of state_dict()."""
        values = self._head.margin_state()
        if len(values) != len(self._state_names):
            raise PartialFCError(n.PFC_ERR_INCOMPATIBLE, f"the library reports {len(values)} running statistics for "
                                 f"this margin, {len(self._state_names)} expected", "pfc_margin_state")
        return dict(zip(self._state_names, values))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.centers()
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def _barrier(self):
        if self.world_size > 1:
            distributed.barrier()

    @contextlib.contextmanager
    def _shared_dir(self):
        """A scratch directory at the same path on every process of the job (collective): made by
        rank 0 under $PARTIALFC_STATE_DIR — a shared filesystem, for jobs over several machines —
        or the temporary directory, and removed by it once every process is done."""
        if self.world_size == 1:
            with tempfile.TemporaryDirectory(prefix="partialfc-") as tmp:
                yield tmp
            return
        path = [tempfile.mkdtemp(prefix="partialfc-", dir=os.environ.get("PARTIALFC_STATE_DIR"))
                if self.rank == 0 else None]
        distributed.broadcast_object_list(path, 0)
        try:
            yield path[0]
        finally:
            distributed.barrier()
            if self.rank == 0:
                shutil.rmtree(path[0], ignore_errors=True)

    def get_extra_state(self):
        """The head's checkpoint: its manifest and this process's shard files (collective)."""
        files = {}
        with self._shared_dir() as tmp:
            self._head.save_checkpoint(tmp)
            self._barrier()  # process 0 publishes the manifest once every shard is durable
            with open(os.path.join(tmp, "manifest.json"), "rb") as f:
                manifest = f.read()
            files["manifest.json"] = torch.frombuffer(bytearray(manifest), dtype=torch.uint8)
            for shard in json.loads(manifest)["manifest"]["shards"]:
                # One shard per process: global shard rank = process rank.
                if self.world_size == 1 or shard["rank"] == self.rank:
                    with open(os.path.join(tmp, shard["file"]), "rb") as f:
                        files[shard["file"]] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        return {"format": _STATE_FORMAT, "optimizer": list(_settings_of(self._head.cfg)), "stateful": self._stateful,
                "checkpoint": files}

    def set_extra_state(self, state):
        """Restores the head from get_extra_state's checkpoint (centers, optimizer state and
        settings, step, seed); collective: every process loads its own state at once."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise PartialFCError(n.PFC_ERR_INCOMPATIBLE, "_extra_state is not a partialfc.torch head state",
                                 "load_state_dict")
        cfg = _with_settings(self._head.cfg, tuple(state["optimizer"]))
        new = Head(cfg, self._head._keep)
        try:
            with self._shared_dir() as tmp:
                for name, data in state["checkpoint"].items():
                    if os.path.basename(name) != name or name.startswith("."):
                        raise PartialFCError(n.PFC_ERR_CORRUPT, f"bad checkpoint file name {name!r}", "load_state_dict")
                    if name == "manifest.json" and self.rank != 0:
                        continue  # the same manifest on every process: rank 0 writes it
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data.numpy().tobytes())
                self._barrier()
                new.load_checkpoint(tmp)
        except BaseException:
            new.close()
            raise
        old, self._head = self._head, new
        old.close()
        self._pending = []
        self._stateful = bool(state.get("stateful", True))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key, extra_key = prefix + "weight", prefix + "_extra_state"
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in (weight_key, extra_key) \
                        and key[len(prefix):].split(".", 1)[0] not in self._modules:
                    unexpected_keys.append(key)
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            return
        weight = state_dict[weight_key]
        shape = (self.num_local, self.embedding_size)
        if tuple(weight.shape) != shape:
            error_msgs.append(f"size mismatch for {weight_key}: copying a param with shape {tuple(weight.shape)} from "
                              f"checkpoint, the shape in current model is {shape} (this rank's classes "
                              f"[{self.class_start}, {self.class_start + self.num_local}))")
            return
        weight = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        try:
            if extra_key in state_dict:
                self.set_extra_state(state_dict[extra_key])
            self._discard()
            self._load_weight(weight)
        except PartialFCError as e:
            error_msgs.append(f"{prefix or 'PartialFC_V2'}: {e}")

    def _load_weight(self, weight):
        """Sets the centers that differ from `weight`, in runs of consecutive rows; those rows'
        optimizer state restarts."""
        first, _ = self._head.local_classes()
        differs = (self.centers() != weight).any(dim=1).tolist()
        if all(differs):
            self._stateful = False
        row = 0
        while row < self.num_local:
            if not differs[row]:
                row += 1
                continue
            end = row
            while end < self.num_local and differs[end]:
                end += 1
            self._head.set_centers(first + row, end - row, weight[row].data_ptr())
            row = end

    def __getstate__(self):
        raise TypeError("a PartialFC_V2 holds a libpartialfc head and cannot be pickled or deep-copied: "
                        "save its state_dict() instead")

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, fp16={self.fp16}, storage_dtype={self.storage_dtype}, "
                f"rank={self.rank}/{self.world_size}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local})")
