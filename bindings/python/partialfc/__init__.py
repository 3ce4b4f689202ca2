"""partialfc: the PartialFC classification head (sharded class centers, sampled margin softmax,
sparse center updates) from libpartialfc's C ABI.

- `partialfc.torch.PartialFC_V2`: a drop-in for insightface arcface_torch's module of that name.
- `partialfc.Head`, `partialfc.config`: the C ABI's head, for hosts that are not PyTorch;
  `partialfc.Index`: search over exported centers or a checkpoint.
"""
from ._native import version as library_version
from ._head import Batch, Head, Index, PartialFCError, config, nccl_unique_id

__version__ = "0.1.0"
__all__ = ["Batch", "Head", "Index", "PartialFCError", "config", "library_version", "nccl_unique_id"]
