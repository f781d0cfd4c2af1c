"""Routers: from router logits to *slots*, in pure PyTorch.

Every router returns a :class:`Routing`: ``S`` slots, each a (token, expert, weight)
triple. After routing, the expert computation sees only slots, so one set of kernels
serves every router of the field:

===========================  ==========================================  ==================
router                       source                                      slots
===========================  ==========================================  ==================
:func:`dense_softmax`        Jacobs, Jordan, Nowlan, Hinton 1991         S = T*E, s = t*E+e
:func:`noisy_topk`           Shazeer et al. 2017                         S = T*k, s = t*k+j
:func:`softmax_topk`         Mixtral, Qwen-MoE, OLMoE                    S = T*k, s = t*k+j
:func:`grouped_sigmoid_topk` DeepSeek-V3                                 S = T*k, s = t*k+j
:func:`switch`               Fedus et al. 2021 (Switch Transformer)      S = T,   s = t
:func:`expert_choice`        Zhou et al. 2022                            S = E*C, s = e*C+c
===========================  ==========================================  ==================

A slot whose expert is the sentinel ``E`` (``num_experts``) is *dropped*: it has
weight 0 and the dispatch plan skips it (Switch tokens over capacity). Gradients reach
the router logits through ``slot_weight``; expert ids carry no gradient.

Aux losses are returned in ``Routing.losses`` (unweighted); :func:`z_loss` is the
ST-MoE router z-loss and applies to any router.

Routing math runs in float32 (or float64 if the logits are float64) whatever the
activation dtype: softmax over bf16 logits picks different experts than the
reference implementations do.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._checks import (FLOAT_DTYPES, check_bool, check_finite, check_float, check_int, check_positive_float, check_tensor,
                      value_checks_enabled)

__all__ = [
    "Routing",
    "ROUTERS",
    "ROUTER_ALIASES",
    "router_name",
    "route",
    "weighted_aux_loss",
    "route_dtype",
    "topk_lowest_first",
    "check_logits",
    "router_jitter",
    "BALANCE_LOSSES",
    "softmax_topk",
    "grouped_sigmoid_topk",
    "noisy_topk",
    "switch",
    "expert_choice",
    "dense_softmax",
    "z_loss",
    "check_grouped_options",
    "switch_load_balancing_loss",
    "topk_load_balancing_loss",
    "cv_squared",
    "expert_choice_capacity",
    "switch_capacity",
]


@dataclass
class Routing:
    """The output of every router: ``S`` slots of (token, expert, weight).

    Invariants (checked in ``__post_init__``; value checks on the CPU or with
    ``MOE_KERNELS_DEBUG=1``):

    * ``slot_token``, ``slot_expert``: int32, shape ``[S]``, on one device;
      ``0 <= slot_token < num_tokens`` and ``0 <= slot_expert <= num_experts``
      (``num_experts`` is the *dropped* sentinel).
    * ``slot_weight``: floating, shape ``[S]``; dropped slots have weight 0.
    * ``max_slots_per_token`` bounds how many slots share one token (``k`` for
      top-k, 1 for Switch, ``E`` for dense and expert choice); the combine uses it.
    * ``top_k``: set when slots are laid out token-major, ``s = t*top_k + j``
      (top-k, dense, Switch with ``top_k=1``); ``None`` for expert choice.
    """

    slot_token: torch.Tensor
    slot_expert: torch.Tensor
    slot_weight: torch.Tensor
    num_tokens: int
    num_experts: int
    max_slots_per_token: int
    top_k: int | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_tensor("slot_token", self.slot_token, ndim=1, dtypes=(torch.int32,))
        check_tensor("slot_expert", self.slot_expert, ndim=1, dtypes=(torch.int32,))
        check_tensor("slot_weight", self.slot_weight, ndim=1, dtypes=FLOAT_DTYPES)
        s = self.slot_token.shape[0]
        for name in ("slot_expert", "slot_weight"):
            t = getattr(self, name)
            if t.shape[0] != s:
                raise ValueError(f"{name}: expected {s} slots like slot_token, got {t.shape[0]}")
            if t.device != self.slot_token.device:
                raise ValueError(f"{name}: expected device {self.slot_token.device}, got {t.device}")
        check_int("num_tokens", self.num_tokens, low=0)
        check_int("num_experts", self.num_experts, low=1)
        check_int("max_slots_per_token", self.max_slots_per_token, low=1)
        if self.top_k is not None:
            check_int("top_k", self.top_k, low=1)
            if self.top_k > self.max_slots_per_token:
                raise ValueError(f"max_slots_per_token: expected >= top_k = {self.top_k}, got {self.max_slots_per_token}")
            if s != self.num_tokens * self.top_k:
                raise ValueError(f"top_k: token-major layout needs S = T*top_k = {self.num_tokens * self.top_k}, got S = {s}")
        if value_checks_enabled(self.slot_token) and s:
            if int(self.slot_token.min()) < 0 or int(self.slot_token.max()) >= self.num_tokens:
                raise ValueError(f"slot_token: expected values in [0, {self.num_tokens}), got range "
                                 f"[{int(self.slot_token.min())}, {int(self.slot_token.max())}]")
            if int(self.slot_expert.min()) < 0 or int(self.slot_expert.max()) > self.num_experts:
                raise ValueError(f"slot_expert: expected values in [0, {self.num_experts}] ({self.num_experts} = dropped), "
                                 f"got range [{int(self.slot_expert.min())}, {int(self.slot_expert.max())}]")
            if self.top_k is None:
                # The plan's [T, K] token table has room for K valid slots per token only.
                valid = self.slot_expert < self.num_experts
                most = int(torch.bincount(self.slot_token[valid].long(), minlength=1).max())
                if most > self.max_slots_per_token:
                    raise ValueError(f"max_slots_per_token: expected >= the most valid slots of one token ({most}), "
                                     f"got {self.max_slots_per_token}")

    @property
    def num_slots(self) -> int:
        return self.slot_token.shape[0]

    def expert_load(self) -> torch.Tensor:
        """Valid slots per expert (dropped slots excluded): int32 [E] on the routing's
        device, computed there without a host sync (a scatter-add, not ``bincount``,
        whose output size would have to come from the device)."""
        e = self.num_experts
        counts = torch.zeros(e + 1, dtype=torch.int32, device=self.slot_expert.device)
        counts.scatter_add_(0, self.slot_expert.long(), torch.ones_like(self.slot_expert))
        return counts[:e]

    @classmethod
    def from_topk(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  losses: dict | None = None) -> "Routing":
        """Build token-major slots from ``[T, k]`` expert ids and weights (any router
        computed elsewhere, e.g. a HF model's own router). Ids ``>= num_experts`` or
        negative (expert-parallel sentinels) become dropped slots."""
        check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), contiguous=False)
        check_tensor("topk_weights", topk_weights, ndim=2, contiguous=False,
                     dtypes=FLOAT_DTYPES)
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"topk_weights: expected shape {tuple(topk_ids.shape)} like topk_ids, got {tuple(topk_weights.shape)}")
        t, k = topk_ids.shape
        if k < 1:
            raise ValueError("topk_ids: expected at least one expert per token (shape [T, k] with k >= 1)")
        ids = topk_ids.reshape(-1)
        dropped = (ids < 0) | (ids >= num_experts)
        ids = torch.where(dropped, torch.full_like(ids, num_experts), ids).to(torch.int32)
        w = topk_weights.reshape(-1)
        w = torch.where(dropped, torch.zeros_like(w), w)
        token = torch.arange(t, device=ids.device, dtype=torch.int32).repeat_interleave(k)
        return cls(token, ids, w, t, num_experts, k, top_k=k, losses=dict(losses or {}))


# --------------------------------------------------------------------------- helpers


def route_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def topk_lowest_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` along the last dim with ties broken toward the lowest index.

    ``torch.topk`` leaves the order of equal values unspecified (on the CPU it does not
    pick the lowest index), so routing with tied scores (a zero-initialised router)
    would differ between devices and from the kernels; a stable descending sort fixes it."""
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[..., :k].contiguous(), idx[..., :k].contiguous()  # contiguous like topk's: k=1 slots must flatten


def check_logits(logits: torch.Tensor, name: str = "logits") -> tuple[int, int]:
    check_tensor(name, logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_finite(name, logits)
    t, e = logits.shape
    if e < 1:
        raise ValueError(f"{name}: expected at least one expert (shape [T, E] with E >= 1), got {tuple(logits.shape)}")
    return t, e


def _token_major(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, losses: dict) -> Routing:
    t, k = ids.shape
    token = torch.arange(t, device=ids.device, dtype=torch.int32).repeat_interleave(k)
    return Routing(token, ids.reshape(-1).to(torch.int32), weights.reshape(-1), t, num_experts, k, top_k=k, losses=losses)


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, ``var(x) / (mean(x)^2 + eps)`` (unbiased
    variance), the balance measure of Shazeer et al. 2017. 0 for a single value."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): ``mean_t logsumexp(logits[t])^2``.

    Penalises large router logits, which keeps the router's softmax numerically
    stable in low precision. Returns 0 for T = 0.

    A float64 0-d tensor: ``logsumexp`` itself is stable in the routing dtype, but its
    square overflows float32 once a logit passes ~1.8e19 (1e20 gives 1e40), so the
    square and the mean run in float64."""
    check_logits(logits)
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float64)
    return torch.logsumexp(logits.to(route_dtype(logits)), dim=-1).to(torch.float64).square().mean()


def switch_load_balancing_loss(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss: ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of tokens whose argmax expert is ``i`` (counted before
    capacity dropping, as in the paper), ``P_i`` the mean router probability of
    expert ``i``. Equals 1 under perfectly uniform routing."""
    t, e = probs.shape
    if t == 0:
        return probs.new_zeros(())
    f = torch.zeros(e, dtype=probs.dtype, device=probs.device).scatter_add_(
        0, expert.long(), torch.ones_like(expert, dtype=probs.dtype)) / t
    return e * torch.sum(f * probs.mean(dim=0))


# --------------------------------------------------------------------------- routers


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax top-k (Mixtral; Qwen-MoE with ``norm_topk_prob``; OLMoE without).

    ``p = softmax(logits)``; keep the ``k`` largest ``p[t, e]`` (ties: lowest expert
    index first); ``w = p / sum_j p_j`` over the kept ones when
    ``renormalize``, else ``w = p``. Losses: ``load_balancing`` (Switch form over the
    top-k assignments, as Mixtral and OLMoE train with), normalised so that uniform
    routing gives 1: ``f_i`` is the share of the ``T*k`` assignments that went to ``i``.
    HF transformers' ``load_balancing_loss_func`` divides by ``T`` only, so its value is
    ``k`` times this one; scale ``aux_loss_coef`` accordingly when porting a recipe."""
    t, e = check_logits(logits)
    check_int("top_k", top_k, low=1, high=e)
    check_bool("renormalize", renormalize)
    probs = torch.softmax(logits.to(route_dtype(logits)), dim=-1)
    w, ids = topk_lowest_first(probs, top_k)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    losses = {"load_balancing": topk_load_balancing_loss(probs, ids)} if t else {}
    return _token_major(ids, w, e, losses)


def topk_load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """The top-k load-balancing loss of :func:`softmax_topk`: ``E * sum_i f_i * P_i``
    with ``f_i`` the share of the ``T*k`` assignments in ``expert_ids`` [T, k] that went
    to expert ``i`` and ``P_i`` the mean of ``probs`` [T, E] (router softmax). Every
    backend with a fused softmax top-k router reports it through this function."""
    t, e = probs.shape
    # Ids outside [0, E) (dropped slots) count in a spare bin that is sliced off.
    ids = expert_ids.reshape(-1).long().clamp(min=0, max=e)
    f = torch.zeros(e + 1, dtype=probs.dtype, device=probs.device).scatter_add_(
        0, ids, torch.ones(ids.numel(), dtype=probs.dtype, device=probs.device))[:e] / max(ids.numel(), 1)
    return e * torch.sum(f * probs.mean(dim=0))


def check_grouped_options(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None, n_group: int,
                          topk_group: int, routed_scaling_factor: float) -> None:
    """Validate the DeepSeek-V3 router's options against ``logits`` [T, E]; shared by
    the torch router and the Triton and CUDA routing kernels' wrappers."""
    e = logits.shape[1]
    check_int("top_k", top_k, low=1, high=e)
    check_int("n_group", n_group, low=1, high=e)
    if e % n_group:
        raise ValueError(f"n_group: expected a divisor of the number of experts {e}, got {n_group}")
    check_int("topk_group", topk_group, low=1, high=n_group)
    if top_k > topk_group * (e // n_group):
        raise ValueError(f"top_k: expected <= topk_group * experts per group = {topk_group * (e // n_group)}, got {top_k}")
    check_positive_float("routed_scaling_factor", routed_scaling_factor)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES,
                     contiguous=False)
        if bias.shape[0] != e:
            raise ValueError(f"bias: expected shape ({e},) (one per expert), got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias: expected device {logits.device}, got {bias.device}")
        check_finite("bias", bias)


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
) -> Routing:
    """Sigmoid scores, selection bias and grouped top-k (DeepSeek-V3).

    ``s = sigmoid(logits)``; the choice score is ``c = s + bias`` (the per-expert
    ``e_score_correction_bias`` of auxiliary-loss-free balancing). Experts form
    ``n_group`` equal groups; a group scores the sum of its two best ``c`` (its best one
    if a group has a single expert); the ``topk_group`` best groups stay, the others are
    masked; the ``k`` best ``c`` among the rest are chosen. The weights come from ``s``,
    never from ``c``: ``w = s / sum_j s_j`` over the chosen when ``renormalize``, then
    ``w *= routed_scaling_factor``. The bias changes which experts are chosen, never
    their weights."""
    t, e = check_logits(logits)
    check_grouped_options(logits, top_k, bias, n_group, topk_group, routed_scaling_factor)
    check_bool("renormalize", renormalize)
    dt = route_dtype(logits)
    scores = torch.sigmoid(logits.to(dt))
    choice = scores if bias is None else scores + bias.detach().to(dt)
    if n_group > 1:
        per = e // n_group
        group_score = choice.view(t, n_group, per).topk(min(2, per), dim=-1).values.sum(-1)
        keep_groups = topk_lowest_first(group_score, topk_group)[1]
        mask = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep_groups, True)
        mask = mask.unsqueeze(-1).expand(t, n_group, per).reshape(t, e)
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = topk_lowest_first(choice, top_k)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * routed_scaling_factor
    return _token_major(ids, w, e, {})


def noisy_topk(
    clean_logits: torch.Tensor,
    top_k: int,
    noise_logits: torch.Tensor | None = None,
    training: bool = True,
    noise: torch.Tensor | None = None,
    noise_epsilon: float = 1e-2,
) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

    ``H = x·Wg + N(0,1) * softplus(x·Wnoise)`` while training (``clean_logits = x·Wg``,
    ``noise_logits = x·Wnoise``); keep the top ``k`` of ``H`` and softmax over them
    (the others get weight 0). Without ``noise_logits`` or when not training,
    ``H = x·Wg``. ``noise`` overrides the standard-normal draw (for tests).

    Losses (unweighted, as in the paper): ``importance = cv²(sum_t G[t])`` and
    ``load = cv²(sum_t P[t])`` where ``P[t, i] = Φ((clean_i - θ_i) / σ_i)`` is the
    smooth probability that expert ``i`` stays in the top k under fresh noise, with
    ``θ_i`` the k-th largest noisy logit of the others. Without noise the load is the
    count of tokens per expert."""
    t, e = check_logits(clean_logits, "clean_logits")
    check_int("top_k", top_k, low=1, high=e)
    check_bool("training", training)
    check_float("noise_epsilon", noise_epsilon, low=0.0)
    dt = route_dtype(clean_logits)
    clean = clean_logits.to(dt)
    use_noise = training and noise_logits is not None
    if use_noise:
        check_tensor("noise_logits", noise_logits, ndim=2, contiguous=False)
        if noise_logits.shape != clean_logits.shape:
            raise ValueError(f"noise_logits: expected shape {tuple(clean_logits.shape)}, got {tuple(noise_logits.shape)}")
        check_finite("noise_logits", noise_logits)
        std = F.softplus(noise_logits.to(dt)) + noise_epsilon
        if noise is None:
            noise = torch.randn_like(clean)
        else:
            check_tensor("noise", noise, ndim=2, dtypes=FLOAT_DTYPES, contiguous=False)
            if noise.shape != clean.shape:
                raise ValueError(f"noise: expected shape {tuple(clean.shape)}, got {tuple(noise.shape)}")
            check_finite("noise", noise)
        logits = clean + noise.to(dt) * std
    else:
        logits = clean
    m = min(top_k + 1, e)
    top_vals, top_ids = topk_lowest_first(logits, m)
    ids, kept = top_ids[:, :top_k], top_vals[:, :top_k]
    w = torch.softmax(kept, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, ids, w)
    losses = {"importance": cv_squared(gates.sum(0))}
    if use_noise and top_k < e and t:
        # theta_i: k-th largest of the others = (k+1)-th overall if i is kept, else k-th.
        theta_in = top_vals[:, top_k:top_k + 1]
        theta_out = top_vals[:, top_k - 1:top_k]
        is_in = logits > theta_in
        # Phi via special.ndtr: torch.distributions validates its arguments with a host sync.
        p = torch.where(is_in, torch.special.ndtr((clean - theta_in) / std), torch.special.ndtr((clean - theta_out) / std))
        losses["load"] = cv_squared(p.sum(0))
    else:
        losses["load"] = cv_squared((gates > 0).sum(0).to(dt))
    return _token_major(ids, w, e, losses)


def _capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    # min(T, ceil(cf * T / E)), decided before the float reaches int: a huge factor
    # (1e30, or one whose product overflows to inf) means "drop nothing", not an
    # OverflowError when the capacity meets an int64 tensor.
    c = capacity_factor * num_tokens / num_experts
    return num_tokens if not c < num_tokens else int(math.ceil(c))


def switch_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Switch expert capacity: ``ceil(capacity_factor * T / E)`` (the router caps it at
    ``T``, which drops the same tokens: no expert is offered more than ``T``)."""
    c = capacity_factor * num_tokens / num_experts
    return int(math.ceil(c)) if math.isfinite(c) else num_tokens


def switch(logits: torch.Tensor, capacity_factor: float | None = 1.0) -> Routing:
    """Switch routing (Fedus et al. 2021): top-1 with expert capacity.

    ``p = softmax(logits)``; each token goes to ``argmax p`` with weight ``max p``. An
    expert takes at most ``capacity = ceil(capacity_factor * T / E)`` tokens, in token
    order; later tokens are *dropped* (sentinel expert ``E``, weight 0), so their layer
    output is zero and the residual connection carries them. ``capacity_factor=None``
    drops nothing. Multiplicative jitter of the router input is applied by the layer
    (:class:`moe_kernels.MoE`), before the router projection. Losses:
    ``load_balancing = E * sum_i f_i * P_i`` and ``dropped_fraction`` (detached)."""
    t, e = check_logits(logits)
    probs = torch.softmax(logits.to(route_dtype(logits)), dim=-1)
    w, expert = probs.max(dim=-1)
    losses = {"load_balancing": switch_load_balancing_loss(probs, expert)}
    if capacity_factor is not None:
        check_positive_float("capacity_factor", capacity_factor)
        cap = _capacity(t, e, capacity_factor)
        one_hot = F.one_hot(expert, e).to(torch.int32)
        position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(-1) - 1  # rank of t within its expert
        keep = position < cap
        expert = torch.where(keep, expert, torch.full_like(expert, e))
        w = torch.where(keep, w, torch.zeros_like(w))
        losses["dropped_fraction"] = (~keep).to(probs.dtype).mean().detach() if t else probs.new_zeros(())
    token = torch.arange(t, device=logits.device, dtype=torch.int32)
    return Routing(token, expert.to(torch.int32), w, t, e, 1, top_k=1, losses=losses)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Expert Choice capacity: ``C = ceil(capacity_factor * T / E)``, at most ``T``."""
    return _capacity(num_tokens, num_experts, capacity_factor)


def expert_choice(logits: torch.Tensor, capacity_factor: float = 1.0) -> Routing:
    """Expert Choice routing (Zhou et al. 2022): experts choose tokens.

    ``p = softmax(logits)`` over experts; each expert ``e`` takes the ``C`` tokens with
    the largest ``p[:, e]`` (ties: lowest token index first), ``C =
    ceil(capacity_factor * T / E)`` capped at ``T``; the slot weight is ``p[t, e]``.
    Slots are expert-major, ``s = e*C + c``: exactly ``C`` per expert, and a token
    gets anywhere from 0 to ``E`` experts. No balancing loss is needed."""
    t, e = check_logits(logits)
    check_positive_float("capacity_factor", capacity_factor)
    cap = expert_choice_capacity(t, e, capacity_factor)
    probs = torch.softmax(logits.to(route_dtype(logits)), dim=-1)
    w, token = topk_lowest_first(probs.t(), cap)  # [E, C]
    expert = torch.arange(e, device=logits.device, dtype=torch.int32).repeat_interleave(cap)
    return Routing(token.reshape(-1).to(torch.int32), expert, w.reshape(-1), t, e, e, top_k=None, losses={})


def dense_softmax(logits: torch.Tensor) -> Routing:
    """The dense softmax mixture (Jacobs, Jordan, Nowlan, Hinton 1991): every token
    goes to every expert, ``w[t, e] = softmax(logits[t])[e]``; ``S = T*E``."""
    t, e = check_logits(logits)
    probs = torch.softmax(logits.to(route_dtype(logits)), dim=-1)
    ids = torch.arange(e, device=logits.device, dtype=torch.int32).repeat(t, 1)  # not expand: E=1 gives a stride-0 view
    return _token_major(ids, probs, e, {})


ROUTERS = {fn.__name__: fn for fn in (softmax_topk, grouped_sigmoid_topk, noisy_topk, switch, expert_choice,
                                      dense_softmax)}
# Other accepted spellings of router names (the key a config or a call may use).
ROUTER_ALIASES = {"dense": "dense_softmax"}


def router_name(router: str) -> str:
    """The canonical name (a key of :data:`ROUTERS`) of ``router`` or of its alias;
    ``ValueError`` naming the choices otherwise."""
    name = ROUTER_ALIASES.get(router, router) if isinstance(router, str) else router
    if name not in ROUTERS:
        raise ValueError(f"router: expected one of {sorted(ROUTERS)} (or an alias in {sorted(ROUTER_ALIASES)}), "
                         f"got {router!r}")
    return name


BALANCE_LOSSES = ("load_balancing", "importance", "load")


def weighted_aux_loss(losses: dict, aux_loss_coef: float, z_loss_coef: float, like: torch.Tensor) -> torch.Tensor:
    """``aux_loss_coef * (sum of the balancing losses) + z_loss_coef * z_loss``: the one
    number a layer adds to the training loss (fp32 0-d tensor on ``like``'s device)."""
    balance = sum((v for k, v in losses.items() if k in BALANCE_LOSSES),
                  start=like.new_zeros((), dtype=torch.float32))
    return aux_loss_coef * balance + z_loss_coef * losses.get("z_loss", 0.0)


def router_jitter(x: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    """Switch's multiplicative jitter of the router input: ``x * U(1-eps, 1+eps)`` while
    training with ``eps > 0``, else ``x`` itself."""
    if not training or eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def _options_of(fn) -> tuple[frozenset, frozenset]:
    """(all option names, required ones) of a router, after its logits argument."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return (frozenset(p.name for p in params),
            frozenset(p.name for p in params if p.default is inspect.Parameter.empty))


# Read once at import, so checking a call's options costs two set operations.
_ROUTER_OPTIONS = {name: _options_of(fn) for name, fn in ROUTERS.items()}


def route(logits: torch.Tensor, router: str = "softmax_topk", **options) -> Routing:
    """Route with the router named ``router`` (a key of :data:`ROUTERS`, or ``"dense"``)."""
    router = router_name(router)
    names, required = _ROUTER_OPTIONS[router]
    if not names.issuperset(options) or not required.issubset(options):
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of router {router!r} (its options: {sorted(names)})")
        raise ValueError(f"{sorted(required - set(options))[0]}: required by router {router!r}")
    return ROUTERS[router](logits, **options)
