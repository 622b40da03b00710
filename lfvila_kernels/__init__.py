"""lfvila_kernels: LF-VILA's fast ops as torch custom ops.

- `htwa_attention`: hierarchical temporal window attention (3D windows, Swin shifts, relative position bias).
- `info_nce_loss`, `temporal_contrastive_loss`, `sample_mtc_indices`, `gather_with_grad`: the VPC and MTC
  contrastive losses, fused so that no B x B matrix is stored.
"""

from .htwa import htwa_attention, htwa_attention_qkv
from .losses import gather_with_grad, info_nce_loss, sample_mtc_indices, temporal_contrastive_loss

__all__ = [
    "htwa_attention",
    "htwa_attention_qkv",
    "info_nce_loss",
    "temporal_contrastive_loss",
    "sample_mtc_indices",
    "gather_with_grad",
]
__version__ = "0.1.0"
