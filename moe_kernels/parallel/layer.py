"""Expert parallelism over ``torch.distributed``: :class:`ExpertParallelMoE`.

When the experts outgrow one device they are spread over the ranks of a process group
(GShard, Switch, DeepSpeed-MoE, Megatron-core do this): with ``R`` ranks and ``E``
experts, rank ``r`` holds the ``E_local = E / R`` experts ``[r*E_local, (r+1)*E_local)``
(``E % R != 0`` is a ``ValueError``; replicating hot experts is out of scope). The
router is *replicated*: every rank holds the same ``router_weight`` (and
``noise_weight``, ``selection_bias``) and the user keeps them in sync, e.g. with DDP
over the non-expert parameters, or :meth:`ExpertParallelMoE.reduce_replicated_grads`
before each optimizer step and :meth:`ExpertParallelMoE.broadcast_replicated_` once.

Forward on rank ``r`` with its batch ``x_r`` [T_r, H]:

0. at the first forward only: compare every rank's configuration fingerprint (experts,
   sizes, dtype, router and its options, activation; :mod:`.fingerprint`), so a rank
   built differently raises a ``ValueError`` naming the field on every rank instead of
   aborting the process (gloo), hanging, or computing garbage;

1. route locally with the same routers (:func:`moe_kernels.parallel.routing.route_local`);
   Switch and Expert Choice exchange what their *global* capacity needs (below);
2. count exchange: one ``all_to_all_single`` of an [R, E_local + 4] int64 table per
   rank (rows sent to each expert of each rank, ``T_r``, a failure flag, the
   ``num_global_tokens`` hint, a hash of the layer's configuration fingerprint), then
   **the host sync** that every variable-split all-to-all needs (``.tolist()`` of the
   counts);
3. send each valid slot's input row to the rank owning its expert (``all_to_all_single``
   with those splits), sorted by expert, so a receiver gets, per source rank, rows
   grouped by its local experts;
4. run the local experts on the received rows through the backend's fused path
   (``backend.plan`` + ``backend.experts`` on a :class:`Routing` whose tokens are the
   received rows, experts the local ids, weights 1);
5. send the results back (the reverse all-to-all), then weight and combine per token
   exactly as the single-process torch backend does: fixed slot order, float32/64
   accumulation, no atomics (deterministic);
6. all-reduce the local sums the aux losses need (one small collective, skipped for
   routers without losses).

Backward mirrors it through autograd: the all-to-alls are autograd Functions whose
backward is the reverse exchange (:mod:`moe_kernels.parallel.comm`).

Equality target: the layer on ``R`` ranks with batches ``x_0..x_{R-1}`` equals
:class:`~moe_kernels.layer.MoE` with all experts (same weights) on
``concat(x_0, ..., x_{R-1})``: output rows, aux losses, and every gradient - ``x`` and
the local experts' ``w13``/``w2``/``b13``/``b2`` directly, the replicated router's
after summing over ranks (see *Gradients*).

Capacity is global, as in the papers. The global batch is rank-major
(``concat(x_0, ..., x_{R-1})``):

* **Switch**: ``capacity = ceil(capacity_factor * T_global / E)`` with ``T_global`` the
  sum of every rank's per-expert top-1 counts (one ``all_gather`` of an [E] int64
  vector, kept on the device). A token's place in its expert's queue is the count of
  that expert's tokens on lower ranks plus its place among this rank's tokens, so
  exactly the tokens the single-process layer drops on the concatenated batch are
  dropped. ``load_balancing`` and ``dropped_fraction`` are those of the global batch.
* **Expert Choice**: ``C = min(T_global, ceil(capacity_factor * T_global / E))``; each
  rank sends each expert's best ``min(C, T_r)`` local scores with their global token
  ids (one ``all_gather`` of [2, E, C] float64), and every rank selects the same global
  top-``C`` per expert (ties to the lowest global token index, as the single-process
  router), then keeps the slots of its own tokens. ``C`` is a shape, so ``T_global``
  must reach the host: one extra small ``all_gather`` + host sync, unless the caller
  passes ``num_global_tokens`` to :meth:`forward` (then checked at the count exchange).

Host synchronisations per forward (all on every rank, in this order):

* The first forward only: the fingerprint check (``.tolist()`` of an [R, 26] gather).
* Expert Choice only, without ``num_global_tokens``: ``T_global`` (``.tolist()`` of an
  [R, 2] gather).
* The count exchange (step 2): one ``.tolist()`` of [R + R*(E_local+4)] integers -
  the sync the variable-split all-to-alls need; it also carries every rank's ``T_r``
  and failure flag.
* None in backward: the splits are saved from the forward.
* Not counted here: the expert backend's own (the torch backend's per-expert loop reads
  its counts on the host; the Triton/CUDA plans are sync-free), and the value checks
  that the package runs on CPU tensors or with ``MOE_KERNELS_DEBUG=1``.

Gradients: an expert's parameters live on one rank and receive, through the reverse
all-to-all, the gradient of the *sum over ranks* of each rank's loss. The replicated
router's gradient on rank ``r`` covers rank ``r``'s tokens only (a global aux loss
back-propagates into each rank's own tokens; see ``all_reduce_sum``): sum it over ranks
(:meth:`reduce_replicated_grads`) to get the single-process gradient of
``sum_r loss_r`` where each rank adds the aux loss once. DDP *averages* instead; scale
accordingly (divide expert gradients by ``R`` too, or scale the loss).

Failures: a rank that raises before its first collective (bad input, non-finite
logits, a bad option) still takes part, with an empty batch, up to the count exchange,
where every rank sees its flag and raises (the failing rank its own error, the others a
``RuntimeError``): the group stays usable. A rank that fails later (inside the experts,
out of memory) cannot warn the others; they raise when the process group's timeout
expires (``init_process_group(timeout=...)``) or its connection drops. Every rank must
run the backward of every forward it ran (as with DDP), since the backward exchanges too.
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn

from ..activations import Activation
from ..backends import get_backend
from ..primitives import combine_slots, zero_link
from ..functional import check_inputs
from ..layer import MoE, MoEConfig, StepOutputs, add_parameters, router_options
from ..options import KernelOptions
from ..params import ExpertParams, expert_params
from .comm import all_to_all, group_rank_world
from .fingerprint import check_fingerprint, fingerprint, fingerprint_hash, layer_fingerprint, options_fingerprint
from .routing import LocalRouting, raise_if_failed, route_local
from ..plan import build_plan_torch
from ..routing import ROUTER_ALIASES, Routing, router_jitter, weighted_aux_loss

__all__ = ["ExpertParallelMoE", "expert_parallel_experts", "expert_parallel_moe", "local_expert_range"]


def router_name_of(router) -> str:
    """The canonical name of ``router`` when it is one (unknown names raise later, alike on every rank)."""
    return ROUTER_ALIASES.get(router, router) if isinstance(router, str) else router


def local_expert_range(num_experts: int, group=None) -> tuple[int, int]:
    """``(start, stop)``: the experts this rank holds; ``ValueError`` when ``num_experts``
    is not a multiple of the group's size."""
    rank, world = group_rank_world(group)
    if num_experts % world:
        raise ValueError(f"num_experts: expected a multiple of the expert-parallel world size {world} (each rank "
                         f"holds E / world_size experts; uneven splits and expert replication are not supported), "
                         f"got {num_experts}")
    n = num_experts // world
    return rank * n, (rank + 1) * n


def expert_parallel_experts(
    x: torch.Tensor,
    local: LocalRouting,
    params: ExpertParams,
    group=None,
    *,
    backend: str = "auto",
    num_global_tokens: int | None = None,
    stats: dict | None = None,
    options: KernelOptions | None = None,
    fingerprint_: list[int] | None = None,
) -> torch.Tensor:
    """Dispatch this rank's slots to the ranks that own their experts, run the local
    experts (``params``: this rank's ``E_local`` experts) on what arrives, bring the
    results back and combine them per token: the expert half of the layer (steps 2-6 of
    the module docstring). ``x`` [T_r, H]; returns [T_r, H]. ``num_global_tokens``: the
    caller's hint, checked against the ranks' counts. ``stats`` (a dict) receives the
    host-side split sizes and byte counts; ``local.info`` the tokens per rank.
    ``fingerprint_``: the caller's configuration fingerprint
    (:mod:`moe_kernels.parallel.fingerprint`); its hash travels in the count exchange and a
    difference raises the same ``ValueError`` on every rank before any row is sent."""
    rank, world = group_rank_world(group)
    routing = local.routing
    e, e_local = routing.num_experts, params.num_experts
    if e_local * world != e:
        raise ValueError(f"params: expected {e // world} local experts (E = {e} over {world} ranks), got {e_local}")
    dev = x.device
    t, h = x.shape
    plan = build_plan_torch(routing, 1)  # bookkeeping only: sort by expert, token -> slots
    # Header row for each destination: rows for each of its experts, then T_r, failure
    # flag, num_global_tokens hint (-1: none) and configuration hash - so every rank can
    # check every rank.
    width = e_local + 4
    header = torch.empty(world, width, dtype=torch.long, device=dev)
    header[:, :e_local] = plan.expert_counts.view(world, e_local)
    header[:, e_local] = t
    header[:, e_local + 1] = int(local.failure is not None)
    header[:, e_local + 2] = -1 if num_global_tokens is None else num_global_tokens
    header[:, e_local + 3] = 0 if fingerprint_ is None else fingerprint_hash(fingerprint_)
    received = all_to_all(header, [1] * world, [1] * world, group)  # one row per peer
    host = torch.cat([header[:, :e_local].sum(1), received.reshape(-1)]).tolist()  # THE host sync
    send_splits = host[:world]
    table = [host[world + r * width: world + (r + 1) * width] for r in range(world)]
    if len({row[e_local + 3] for row in table}) > 1:  # every rank sees it: all exchange and raise alike
        check_fingerprint(fingerprint_ or fingerprint(), group, dev)
    raise_if_failed([row[e_local + 1] for row in table], local.failure)
    recv_splits = [sum(row[:e_local]) for row in table]
    tokens = [row[e_local] for row in table]
    hints = sorted({row[e_local + 2] for row in table} - {-1})
    if hints and (hints != [sum(tokens)] or any(row[e_local + 2] == -1 for row in table)):
        raise ValueError(f"num_global_tokens: expected the sum of every rank's tokens {sum(tokens)} on every rank "
                         f"(tokens per rank: {tokens}), got {[row[e_local + 2] for row in table]} (-1: not given)")
    local.info["tokens_per_rank"] = tokens
    local.info["num_global_tokens"] = sum(tokens)
    n_sent, n_recv = sum(send_splits), sum(recv_splits)

    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in (params.w13, params.w2, params.b13, params.b2)))
    anchor = torch.empty(0, device=dev, requires_grad=True) if needs_grad else None
    rows = x.index_select(0, plan.slot_token.index_select(0, plan.sorted_slot[:n_sent]).long())
    recv_rows = all_to_all(rows, recv_splits, send_splits, group, anchor=anchor)

    # Received rows come per source rank, grouped by local expert within each source.
    per_source = received.view(world, width)[:, :e_local].reshape(-1)
    local_ids = torch.arange(e_local, device=dev, dtype=torch.int32).repeat(world)
    local_ids = torch.repeat_interleave(local_ids, per_source, output_size=n_recv)
    impl = get_backend(backend, dev)
    if n_recv:
        weight_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        inner = Routing(torch.arange(n_recv, device=dev, dtype=torch.int32), local_ids,
                        torch.ones(n_recv, dtype=weight_dtype, device=dev), n_recv, e_local, 1, top_k=1)
        y = impl.experts(recv_rows, impl.plan(inner, params, options), params, options)
    else:
        y = recv_rows * 0
        link = zero_link(params.w13, params.w2, params.b13, params.b2)
        y = y if link is None else y + link
    y_back = all_to_all(y, send_splits, recv_splits, group)

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = routing.num_slots
    padded = torch.cat([y_back, y_back.new_zeros(s - n_sent, h)]) if s > n_sent else y_back
    y_slot = padded.index_select(0, plan.slot_position.long()).to(acc) * routing.slot_weight.to(acc).unsqueeze(1)
    out = combine_slots(y_slot, plan.token_slots).to(x.dtype)
    if stats is not None:
        b = x.element_size() * h
        stats.update({
            "tokens_per_rank": tokens, "send_splits": send_splits, "recv_splits": recv_splits,
            "rows_sent": n_sent, "rows_received": n_recv,
            # dispatch + return; the off-rank part excludes what a rank sends to itself
            "bytes_sent": b * (n_sent + n_recv),
            "bytes_sent_off_rank": b * (n_sent - send_splits[rank] + n_recv - recv_splits[rank]),
            "header_bytes": 8 * world * width,
        })
    return out


def expert_parallel_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    group=None,
    router: str = "softmax_topk",
    activation: str | Activation = "swiglu",
    transposed: bool = False,
    interleaved: bool = False,
    backend: str = "auto",
    training: bool = True,
    z_loss: bool = False,
    num_global_tokens: int | None = None,
    return_routing: bool = False,
    check_ranks: bool = True,
    **router_options,
):
    """The functional twin of :func:`moe_kernels.moe` under expert parallelism:
    ``x`` [T_r, H] and ``router_logits`` [T_r, E] of this rank's tokens, ``w13``/``w2``/
    ``b13``/``b2`` this rank's ``E / R`` experts. Router options as for ``moe`` (for
    ``noisy_topk`` also ``noise_logits`` and ``noise`` of this rank's tokens). With
    ``return_routing=True`` returns ``(out, routing)`` with the global losses in
    ``routing.losses``. Every rank of ``group`` must call it with the same options.
    A bad ``x`` or ``router_logits`` on one rank raises on every rank (at the count
    exchange); bad weights raise at once, before any collective (they are expected to be
    alike on every rank).

    ``check_ranks``: first compare every rank's router, router options, expert sizes,
    dtype and activation (:mod:`~moe_kernels.parallel.fingerprint`: one small
    ``all_gather`` and a host sync) and raise the same ``ValueError`` on every rank,
    naming the field, when they differ. ``False`` skips that exchange (then a difference
    may hang, abort the process in gloo or give wrong results)."""
    params = expert_params(w13, w2, b13, b2, activation=activation, transposed=transposed, interleaved=interleaved)
    act = params.activation
    fp = options_fingerprint(
        router_name_of(router), router_options, num_experts=params.num_experts * group_rank_world(group)[1],
        num_local_experts=params.num_experts, hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size, dtype=params.dtype, activation=act.name,
        alpha=act.alpha if act.name == "swiglu_oai" else None, limit=act.limit if act.name == "swiglu_oai" else None,
        interleaved=interleaved, bias=b13 is not None or b2 is not None, z_loss=z_loss,
        training=training if router_name_of(router) == "noisy_topk" else None)
    if check_ranks:
        check_fingerprint(fp, group, params.w13.device, what="expert_parallel_moe call")
    failure = None
    try:
        check_inputs(x, params)
        e = params.num_experts * group_rank_world(group)[1]
        if router_logits.dim() != 2 or tuple(router_logits.shape) != (x.shape[0], e):
            raise ValueError(f"router_logits: expected shape ({x.shape[0]}, {e}) (tokens of x, local experts of w13 "
                             f"times the world size), got {tuple(router_logits.shape)}")
    except ValueError as exc:  # take part with an empty batch; every rank raises at the count exchange
        failure = exc
        x = params.w13.new_zeros(0, params.hidden_size)
        router_logits = params.w13.new_zeros(0, params.num_experts * group_rank_world(group)[1])
    local = route_local(router_logits, router, router_options, group, training=training, z_loss=z_loss,
                        backend=get_backend(backend, x.device), num_global_tokens=num_global_tokens,
                        failure=failure)
    if local.failure is not None:
        x = x.new_zeros(0, x.shape[1])
    out = expert_parallel_experts(x, local, params, group, backend=backend, num_global_tokens=num_global_tokens,
                                  fingerprint_=fp if check_ranks else None)
    local.finish_losses(group, local.info["num_global_tokens"])
    return (out, local.routing) if return_routing else out


class ExpertParallelMoE(StepOutputs, nn.Module):
    """A :class:`~moe_kernels.layer.MoE` whose experts are spread over a process group.

    Parameters as in ``MoE`` except that ``w13`` [E_local, n*I, H], ``w2`` [E_local, H,
    I], ``b13``, ``b2`` hold this rank's experts ``[expert_start, expert_start +
    E_local)``; ``router_weight`` [E, H], ``noise_weight`` and the ``selection_bias``
    buffer are replicated. See the module docstring for the data flow, global capacity,
    host syncs, gradients and failure behaviour.

    Example::

        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
        full = MoE(hidden_size=1024, intermediate_size=2048, num_experts=64, top_k=6)
        layer = ExpertParallelMoE.from_moe(full)           # keeps this rank's experts
        y = layer(x)                                       # x: this rank's [..., 1024]
        (task_loss(y) + layer.aux_loss).backward()
        layer.reduce_replicated_grads()                    # or DDP over the router
    """

    def __init__(self, config: MoEConfig | None = None, group=None, *, device=None, dtype=None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = MoEConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"pass either config or keyword options, not both (got {sorted(kwargs)})")
        self.config = c = config
        self.group = group
        self.rank, self.world_size = group_rank_world(group)
        self.expert_start, stop = local_expert_range(c.num_experts, group)
        self.num_local_experts = stop - self.expert_start
        self.activation = act = Activation(c.activation, c.alpha, c.limit)
        add_parameters(self, c, act, self.num_local_experts, device=device, dtype=dtype)
        self._step_state()
        self.last_dispatch: dict = {}
        self._ranks_checked = False  # the fingerprint exchange runs at the first forward
        self.reset_parameters()

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> "ExpertParallelMoE":
        """This rank's share of a full ``MoE``: the replicated router and its experts'
        slices of ``w13``/``w2``/``b13``/``b2`` (copied)."""
        p = moe.router_weight
        layer = cls(moe.config, group, device=p.device, dtype=p.dtype)
        start, stop = layer.expert_start, layer.expert_start + layer.num_local_experts
        with torch.no_grad():
            layer.router_weight.copy_(moe.router_weight)
            if moe.noise_weight is not None:
                layer.noise_weight.copy_(moe.noise_weight)
            if moe.selection_bias is not None:
                layer.selection_bias.copy_(moe.selection_bias)
            for name in ("w13", "w2", "b13", "b2"):
                src = getattr(moe, name)
                if src is not None:
                    getattr(layer, name).copy_(src[start:stop])
        layer.train(moe.training)
        return layer

    def reset_parameters(self) -> None:
        """Same distributions as ``MoE``. The router draws from this rank's RNG: seed
        every rank alike or call :meth:`broadcast_replicated_` afterwards."""
        MoE.reset_parameters(self)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, num_experts={c.num_experts}, "
                f"local_experts=[{self.expert_start}, {self.expert_start + self.num_local_experts}), "
                f"world_size={self.world_size}, router={c.router!r}, top_k={c.top_k}, activation={c.activation!r}")

    def replicated_tensors(self) -> list[torch.Tensor]:
        """The router's parameters and buffers, the same on every rank."""
        return [v for v in (self.router_weight, self.noise_weight, self.selection_bias) if v is not None]

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's expert parameters (keep them out of DDP's gradient averaging)."""
        return [p for p in (self.w13, self.w2, self.b13, self.b2) if p is not None]

    @torch.no_grad()
    def broadcast_replicated_(self, src: int = 0) -> None:
        """Copy the router's parameters and buffers from group rank ``src`` to every rank."""
        for v in self.replicated_tensors():
            dist.broadcast(v, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                           group=self.group)

    @torch.no_grad()
    def reduce_replicated_grads(self, average: bool = False) -> None:
        """Sum (or average) the router's gradients over the group, turning each rank's
        partial gradient into the gradient of the global batch. Call on every rank."""
        for p in (self.router_weight, self.noise_weight):
            if p is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
            if average:
                p.grad /= self.world_size

    def forward(self, x: torch.Tensor, *, num_global_tokens: int | None = None) -> torch.Tensor:
        """``x`` [..., H]: this rank's tokens; returns [..., H]. ``num_global_tokens``:
        the sum of every rank's token count, if known (spares Expert Choice a host
        sync; a wrong value raises on every rank). Every rank must call it."""
        c = self.config
        step = self._step_state()
        step.clear()  # a forward that raises leaves nothing of the previous step readable
        # Before any other collective: a rank built differently must raise, not abort or hang.
        fp = layer_fingerprint(c, self.w13.dtype, self.num_local_experts, self.training)
        if not self._ranks_checked:
            check_fingerprint(fp, self.group, self.router_weight.device, what="ExpertParallelMoE")
            self._ranks_checked = True
        failure = None
        try:
            if x.shape[-1] != c.hidden_size:
                raise ValueError(f"x: expected last dimension hidden_size={c.hidden_size}, got shape {tuple(x.shape)}")
            x2d = x.reshape(-1, c.hidden_size).contiguous()
            params = expert_params(self.w13, self.w2, self.b13, self.b2, activation=self.activation)
            check_inputs(x2d, params)
            router_in = router_jitter(x2d, c.jitter_eps, self.training) if c.router == "switch" else x2d
            logits = router_in @ self.router_weight.t()
            options = router_options(self.config, self.selection_bias)
            if c.router == "noisy_topk":
                options["noise_logits"] = x2d @ self.noise_weight.t()
        except Exception as exc:  # take part with an empty batch; every rank raises at the count exchange
            failure = exc
            w = self.router_weight
            x2d = w.new_zeros(0, c.hidden_size)
            params = expert_params(self.w13, self.w2, self.b13, self.b2, activation=self.activation)
            logits = w.new_zeros(0, c.num_experts)
            options = router_options(self.config, self.selection_bias)
            if c.router == "noisy_topk":
                options["noise_logits"] = w.new_zeros(0, c.num_experts)
        local = route_local(logits, c.router, options, self.group, training=self.training, z_loss=bool(c.z_loss_coef),
                            backend=get_backend(c.backend, x2d.device), num_global_tokens=num_global_tokens,
                            failure=failure)
        if local.failure is not None and failure is None:
            x2d = x2d.new_zeros(0, c.hidden_size)  # routing failed here: the empty batch goes on
        stats: dict = {}
        out = expert_parallel_experts(x2d, local, params, self.group, backend=c.backend, options=c.kernel_options(),
                                      num_global_tokens=num_global_tokens, stats=stats, fingerprint_=fp)
        self.last_dispatch = {**stats, **{k: v for k, v in local.info.items() if k != "tokens_per_rank"}}
        losses = local.finish_losses(self.group, local.info["num_global_tokens"])
        step.losses = losses
        step.aux_loss = weighted_aux_loss(losses, c.aux_loss_coef, c.z_loss_coef, x2d)
        step.expert_load = local.routing.expert_load().detach()
        return out.reshape(x.shape)
