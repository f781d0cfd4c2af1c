"""The ``cuda`` backend: hand-written CUDA (csrc/) for routing, the plan and row permutation;
the GEMMs are Triton's experts op. Files by role: :mod:`.backend`, :mod:`.routing`,
:mod:`.plan`, :mod:`.experts`, the twins :mod:`.twins`, and :mod:`.extension` (loading
``moe_kernels._C``). ``import moe_kernels`` does not import this package; importing it
loads the extension (no GPU needed) and exposes the backend's public surface.
"""

from .backend import CudaBackend
from .experts import experts_permuted, permute_rows, unpermute_rows
from .extension import compatibility_reason, extension_info, load_kernels
from .plan import build_plan
from .routing import route_fused, route_grouped_sigmoid_topk, route_softmax_topk

__all__ = ["CudaBackend", "build_plan", "compatibility_reason", "experts_permuted", "extension_info", "load_kernels",
           "permute_rows", "route_fused", "route_grouped_sigmoid_topk", "route_softmax_topk", "unpermute_rows"]
