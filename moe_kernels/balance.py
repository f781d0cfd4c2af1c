"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024).

The grouped sigmoid router chooses experts by ``sigmoid(logits) + selection_bias`` and
weighs them by ``sigmoid(logits)`` alone, so the bias steers load without entering the
output or the gradients. After each step the bias moves by a fixed rate toward balance:

    selection_bias[i] += rate * sign(mean_j load[j] - load[i])

(an overloaded expert is made less attractive, an idle one more). ``load`` is the count
of tokens each expert received in the step, which the layer keeps as
``layer.last_expert_load`` (on the device, no host sync). DeepSeek-V3 uses ``rate =
0.001`` for most of training and 0 at its end.

Typical use, once per optimizer step (outside autograd)::

    loss.backward(); opt.step()
    for layer in moe_layers:
        update_selection_bias(layer, rate=1e-3)

With gradient accumulation, sum the loads of the micro-batches and pass ``load=``.
Under expert parallelism the loads of every rank are summed first (an ``all_reduce``
on the layer's group: call it on every rank), so every rank applies the same update
and the replicated bias stays replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_float, check_tensor

__all__ = ["update_selection_bias"]


@torch.no_grad()
def update_selection_bias(layer: nn.Module, rate: float, load: torch.Tensor | None = None) -> torch.Tensor:
    """Nudge ``layer.selection_bias`` by ``rate * sign(mean(load) - load)`` in place.

    Args:
        layer: a :class:`~moe_kernels.MoE` or
            :class:`~moe_kernels.parallel.ExpertParallelMoE` with ``router=
            "grouped_sigmoid_topk"`` (the router that has a selection bias).
        rate: the step size (``>= 0``; DeepSeek-V3: 0.001).
        load: tokens per expert [E] (any numeric dtype); default the layer's
            ``last_expert_load``. Under expert parallelism: this rank's part, summed over
            the layer's group here.

    Returns:
        The load imbalance ``mean(load) - load`` [E] (float32) that was applied.
    """
    bias = getattr(layer, "selection_bias", None)
    if bias is None:
        raise ValueError("layer: expected a MoE layer with router='grouped_sigmoid_topk' (the router with a "
                         "selection bias), got one without a selection_bias buffer")
    check_float("rate", rate, low=0.0)
    if load is None:
        load = layer.last_expert_load
        if load is None:
            raise ValueError("load: the layer has run no forward since it was built (or its last forward raised); "
                             "run a forward first or pass load=")
    check_tensor("load", load, ndim=1, contiguous=False)
    if load.shape[0] != bias.shape[0]:
        raise ValueError(f"load: expected shape ({bias.shape[0]},) (one count per expert), got {tuple(load.shape)}")
    load = load.detach().to(device=bias.device, dtype=torch.float32)
    group_size = getattr(layer, "world_size", 1)
    if group_size > 1:
        import torch.distributed as dist

        load = load.clone()
        dist.all_reduce(load, op=dist.ReduceOp.SUM, group=layer.group)
    imbalance = load.mean() - load
    bias.add_(torch.sign(imbalance).to(bias.dtype), alpha=rate)
    return imbalance
