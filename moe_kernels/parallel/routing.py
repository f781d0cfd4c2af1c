"""Routing for expert parallelism: every router of :mod:`moe_kernels.routing`, with the
decisions and aux losses of the single-process router on the concatenated batch.

Each rank routes its own tokens (``logits`` [T_r, E], global expert ids; ``E`` is the
dropped sentinel). The *global* batch is the ranks' batches concatenated in rank order
(rank-major token order). What each router needs from the other ranks:

==========================  =============================================================
router                      cross-rank information
==========================  =============================================================
softmax_topk, dense,        none for the decisions (each token decides alone); the aux
grouped_sigmoid_topk,       losses are functions of sums over all tokens, so every rank
noisy_topk                  contributes its local sums to one ``all_reduce``
switch (with capacity)      per-expert token counts of every rank (``all_gather``, [R, E]):
                            capacity ``ceil(cf * T_global / E)`` with ``T_global`` their
                            sum, and a token's place in its expert's queue = the count on
                            lower ranks + its place among this rank's tokens
expert_choice               ``T_global`` (for ``C``) and each expert's best ``C`` local
                            candidates from every rank (``all_gather``, [R, 2, E, C]);
                            every rank then picks the same global top-``C``
==========================  =============================================================

The losses are computed by :meth:`LocalRouting.finish_losses` after the dispatch's count
exchange, so that a rank that failed earlier can still reach that exchange (with an
empty batch and a failure flag) and every rank raises together instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, check_positive_float, check_tensor
from .comm import all_gather_stack, all_reduce_sum, group_rank_world
from ..routing import (ROUTERS, Routing, check_logits, cv_squared, expert_choice_capacity, noisy_topk, route,
                       route_dtype, topk_lowest_first, ROUTER_ALIASES)

__all__ = ["LocalRouting", "route_local", "raise_if_failed"]

_RANK_SHIFT = 40  # Expert Choice candidate id = rank << 40 | local token; ordered like the global token index
_PAD_ID = float(2 ** 52)


@dataclass
class LocalRouting:
    """This rank's part of the global routing.

    ``routing``: slots of this rank's tokens (global expert ids, ``E`` = dropped; its
    ``losses`` are filled by :meth:`finish_losses`). ``stats``: this rank's sums that
    the global aux losses need. ``failure``: the exception this rank hit before its
    first collective, if any (it then took part with an empty batch)."""

    routing: Routing
    stats: torch.Tensor
    finish: Callable[[torch.Tensor, int], dict]
    failure: BaseException | None = None
    info: dict = field(default_factory=dict)

    def finish_losses(self, group, num_global_tokens: int) -> dict:
        """All-reduce the local sums (one collective, none when the router has no loss)
        and compute the losses of the global batch; stores them in ``routing.losses``."""
        total = all_reduce_sum(self.stats, group) if self.stats.numel() else self.stats
        self.routing.losses = self.finish(total, num_global_tokens)
        return self.routing.losses


def raise_if_failed(flags: list[int], failure: BaseException | None) -> None:
    """Raise on every rank when any rank flagged a failure: the failing rank re-raises its
    own exception, the others a ``RuntimeError`` naming the failing ranks."""
    bad = [r for r, f in enumerate(flags) if f]
    if not bad:
        return
    if failure is not None:
        raise failure
    raise RuntimeError(f"expert-parallel forward failed on rank(s) {bad} of the group (see the error raised "
                       f"there); every rank stops at the same collective so the group stays usable")


def _div(x: torch.Tensor, n: int) -> torch.Tensor:
    return x / n if n else x * 0


# --------------------------------------------------------------------------- local phase
# Everything here is local and may raise (bad input); nothing here communicates.


def _local_phase(logits, router, options, training, backend):
    e = logits.shape[1]
    t = logits.shape[0]
    dt = route_dtype(logits)
    opts = dict(options)
    if router == "softmax_topk":
        routing = backend.route(logits, router, opts) if backend is not None else route(logits, router, **opts)
        k = routing.top_k
        probs = torch.softmax(logits.to(dt), dim=-1)
        ids = routing.slot_expert.long()
        counts = torch.zeros(e, dtype=dt, device=logits.device).scatter_add_(
            0, ids, torch.ones(ids.shape[0], dtype=dt, device=logits.device))

        def finish(g, tg):
            f, p = _div(g[:e], tg * k), _div(g[e:], tg)
            return {"load_balancing": e * torch.sum(f * p)}
        return {"routing": routing, "stats": [counts, probs.sum(0)], "finish": finish}
    if router in ("grouped_sigmoid_topk", "dense_softmax"):
        routing = backend.route(logits, router, opts) if backend is not None else route(logits, router, **opts)
        return {"routing": routing, "stats": [], "finish": lambda g, tg: {}}
    if router == "noisy_topk":
        return _noisy_local(logits, opts, training)
    if router == "switch":
        check_logits(logits, "logits")
        unknown = sorted(set(opts) - {"capacity_factor"})
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of router 'switch' (its options: ['capacity_factor'])")
        cf = opts.get("capacity_factor", 1.0)
        if cf is not None:
            check_positive_float("capacity_factor", cf)
        probs = torch.softmax(logits.to(dt), dim=-1)
        w, expert = probs.max(dim=-1)
        counts = torch.zeros(e, dtype=torch.long, device=logits.device).scatter_add_(0, expert, torch.ones_like(expert))
        one_hot = F.one_hot(expert, e).to(torch.int32)
        position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(-1) - 1  # place among this rank's tokens of its expert
        return {"probs": probs, "w": w, "expert": expert, "counts": counts, "position": position, "cf": cf,
                "stats": [probs.sum(0)]}
    if router == "expert_choice":
        check_logits(logits, "logits")
        unknown = sorted(set(opts) - {"capacity_factor"})
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of router 'expert_choice' "
                             f"(its options: ['capacity_factor'])")
        cf = opts.get("capacity_factor", 1.0)
        check_positive_float("capacity_factor", cf)
        probs = torch.softmax(logits.to(dt), dim=-1)
        return {"probs": probs, "cf": cf, "t": t, "stats": [], "finish": lambda g, tg: {}}
    raise ValueError(f"router: expected one of {sorted(ROUTERS)}, got {router!r}")


def _noisy_local(logits, opts, training):
    e, t = logits.shape[1], logits.shape[0]
    dt = route_dtype(logits)
    k = opts.get("top_k")
    noise_logits = opts.pop("noise_logits", None)
    noise = opts.pop("noise", None)
    eps = opts.pop("noise_epsilon", 1e-2)
    opts.pop("training", None)
    if set(opts) - {"top_k"}:
        raise ValueError(f"{sorted(set(opts) - {'top_k'})[0]}: not an option of router 'noisy_topk'")
    use_noise = training and noise_logits is not None
    if use_noise and noise is None:
        noise = torch.randn(t, e, dtype=dt, device=logits.device)
    routing = noisy_topk(logits, k, noise_logits=noise_logits, training=training, noise=noise, noise_epsilon=eps)
    ids = routing.slot_expert.view(t, k).long()
    gates = torch.zeros(t, e, dtype=dt, device=logits.device).scatter(1, ids, routing.slot_weight.view(t, k).to(dt))
    if use_noise and k < e:
        # The smooth load estimator of Shazeer et al. 2017, as noisy_topk computes it, summed here
        # over this rank's tokens only; the sum over ranks is the single-process sum.
        clean = logits.to(dt)
        std = F.softplus(noise_logits.to(dt)) + eps
        noisy = clean + noise.to(dt) * std
        top_vals, _ = topk_lowest_first(noisy, k + 1)
        theta_in, theta_out = top_vals[:, k:k + 1], top_vals[:, k - 1:k]
        p = torch.where(noisy > theta_in, torch.special.ndtr((clean - theta_in) / std),
                        torch.special.ndtr((clean - theta_out) / std))
        load = p.sum(0)
    else:
        load = (gates > 0).sum(0).to(dt)

    def finish(g, tg):
        return {"importance": cv_squared(g[:e]), "load": cv_squared(g[e:])}
    return {"routing": routing, "stats": [gates.sum(0), load], "finish": finish}


# --------------------------------------------------------------------------- global phase


def _switch_global(part, t, e, group, rank):
    counts_all = all_gather_stack(part["counts"], group)  # [R, E]
    global_counts = counts_all.sum(0)
    expert, w, cf = part["expert"], part["w"], part["cf"]
    dt = part["probs"].dtype
    cap = None
    if cf is not None:
        t_global = global_counts.sum()
        # Same float64 arithmetic as switch_capacity's math.ceil(cf * T / E), on the device.
        cap = torch.ceil(t_global.to(torch.float64) * cf / e)
        queue = part["position"] + counts_all[:rank].sum(0)[expert]
        keep = queue.to(torch.float64) < cap
        expert = torch.where(keep, expert, torch.full_like(expert, e))
        w = torch.where(keep, w, torch.zeros_like(w))
    token = torch.arange(t, device=w.device, dtype=torch.int32)
    routing = Routing(token, expert.to(torch.int32), w, t, e, 1, top_k=1)

    def finish(g, tg):
        f, p = _div(global_counts.to(dt), tg), _div(g[:e], tg)
        losses = {"load_balancing": e * torch.sum(f * p)}
        if cap is not None:
            dropped = (global_counts.to(torch.float64) - cap).clamp(min=0).sum().to(dt)
            losses["dropped_fraction"] = _div(dropped, tg).detach()
        return losses
    return routing, finish, {"capacity": cap}


def _expert_choice_global(part, t, e, group, rank, world, num_global_tokens, failure):
    probs, cf = part["probs"], part["cf"]
    dev = probs.device
    if num_global_tokens is None:
        # The one extra host sync of Expert Choice: C is a shape, and depends on T_global.
        header = all_gather_stack(torch.tensor([t, int(failure is not None)], dtype=torch.long, device=dev), group)
        rows = header.tolist()
        raise_if_failed([r[1] for r in rows], failure)
        t_global = sum(r[0] for r in rows)
    else:
        t_global = num_global_tokens
    cap = expert_choice_capacity(t_global, e, cf)
    info = {"capacity": cap, "num_global_tokens": t_global}
    if cap == 0:  # T_global == 0, the same on every rank: nothing to gather
        empty = torch.zeros(0, dtype=torch.int32, device=dev)
        return Routing(empty, empty.clone(), probs.new_zeros(0), t, e, e, top_k=None), info
    c_loc = min(cap, t)
    vals, idx = topk_lowest_first(probs.detach().t(), c_loc)  # [E, c_loc]
    cand = torch.empty(2, e, cap, dtype=torch.float64, device=dev)
    cand[0].fill_(-1.0)  # below every probability: a pad never wins
    cand[1].fill_(_PAD_ID)
    cand[0, :, :c_loc] = vals.to(torch.float64)
    cand[1, :, :c_loc] = (idx + (rank << _RANK_SHIFT)).to(torch.float64)
    every = all_gather_stack(cand, group)  # [R, 2, E, C]
    v = every[:, 0].permute(1, 0, 2).reshape(e, world * cap)
    gid = every[:, 1].permute(1, 0, 2).reshape(e, world * cap)
    # Order the candidates by global token index, then a stable descending sort by score:
    # ties go to the lowest global token index, as in the single-process router.
    order = torch.argsort(gid, dim=1, stable=True)
    v, gid = v.gather(1, order), gid.gather(1, order)
    _, pick = topk_lowest_first(v, cap)
    win = gid.gather(1, pick).to(torch.long)  # [E, C] global candidate ids, each expert's best first
    if t == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=dev)
        return Routing(empty, empty.clone(), probs.new_zeros(0), 0, e, e, top_k=None), info
    own = (win >> _RANK_SHIFT) == rank
    token = torch.where(own, win - (rank << _RANK_SHIFT), torch.zeros_like(win)).reshape(-1)
    expert_of_slot = torch.arange(e, device=dev).repeat_interleave(cap)
    own = own.reshape(-1)
    w = torch.where(own, probs[token, expert_of_slot], torch.zeros((), dtype=probs.dtype, device=dev))
    expert = torch.where(own, expert_of_slot, torch.full_like(expert_of_slot, e))
    return Routing(token.to(torch.int32), expert.to(torch.int32), w, t, e, e, top_k=None), info


# --------------------------------------------------------------------------- entry point


def route_local(
    logits: torch.Tensor,
    router: str,
    options: dict,
    group=None,
    *,
    training: bool = True,
    z_loss: bool = False,
    backend=None,
    num_global_tokens: int | None = None,
    failure: BaseException | None = None,
) -> LocalRouting:
    """Route this rank's tokens as the single-process ``router`` would route them inside
    the concatenated batch of all ranks.

    ``options``: the router's keyword arguments (for ``noisy_topk`` also the per-token
    ``noise_logits`` and optional ``noise`` of this rank's tokens). ``backend``: a
    :class:`~moe_kernels.backends.Backend` whose (possibly fused) routers serve the
    per-token routers. ``num_global_tokens``: ``sum_r T_r`` if the caller knows it
    (saves Expert Choice its host sync; checked later by the dispatch). ``failure``:
    an error this rank already hit; it then routes an empty batch, so that it still
    takes part in every collective and the group fails together at the next check.

    Must be called by every rank of ``group`` with the same router and options."""
    rank, world = group_rank_world(group)
    router = ROUTER_ALIASES.get(router, router)  # an unknown name raises inside the local phase
    if world >= 1 << (52 - _RANK_SHIFT):
        raise ValueError(f"group: expert parallelism supports fewer than {1 << (52 - _RANK_SHIFT)} ranks, got {world}")
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    e = logits.shape[1]

    def attempt(lg, opts):
        part = _local_phase(lg, router, opts, training, backend)
        if z_loss:
            part["stats"] = part["stats"] + [
                torch.logsumexp(lg.to(route_dtype(lg)), dim=-1).to(torch.float64).square().sum().reshape(1)]
        return part

    try:
        if failure is not None:
            raise failure
        part = attempt(logits, options)
    except Exception as exc:  # take part with an empty batch; every rank raises at the next check
        failure = exc
        logits = logits.detach().new_zeros(0, e)
        opts = {k: (v.new_zeros(0, e) if k in ("noise_logits", "noise") and torch.is_tensor(v) else v)
                for k, v in options.items()}
        part = attempt(logits, opts)  # raises too when the options themselves are bad (alike on every rank)
    t = logits.shape[0]
    info: dict = {}
    if router == "switch":
        routing, finish, info = _switch_global(part, t, e, group, rank)
    elif router == "expert_choice":
        routing, info = _expert_choice_global(part, t, e, group, rank, world, num_global_tokens, failure)
        finish = part["finish"]
    else:
        routing, finish = part["routing"], part["finish"]
    routing.losses = {}
    stats = part["stats"]
    dt = route_dtype(logits)
    vt = torch.float64 if z_loss else dt  # the z-loss sum overflows float32 past |logit| ~1.8e19
    vec = torch.cat([s.reshape(-1).to(vt) for s in stats]) if stats else logits.new_zeros(0, dtype=vt)

    def finish_all(g, tg):
        n_router = g.shape[0] - (1 if z_loss else 0)
        losses = finish(g[:n_router].to(dt), tg)
        if z_loss:
            losses["z_loss"] = _div(g[n_router], tg)
        return losses
    return LocalRouting(routing, vec, finish_all, failure, info)
