"""Pure-PyTorch twins of the CUDA kernels in csrc/, one per op, same signatures as the
ops of :mod:`moe_kernels.backends.cuda.extension` (which run these on the CPU).

Each twin states the exact contract its kernel keeps: the tie rule of the routing
selection (lowest expert index first, written out with a stable sort rather than
left to ``torch.topk``) and what it does with non-finite logits (NaN scores are never
chosen; a slot left without a candidate is dropped, id ``E``, weight 0), the plan's
stable order, and the combine's summation order (fp32, one slot after the other,
multiply and add rounded separately: the kernel avoids FMA contraction so that the
twin reproduces it bit for bit). The kernels are tested against these on a GPU
(tests/test_cuda_gpu.py) and these against
:mod:`moe_kernels.routing`, :func:`moe_kernels.plan.build_plan_torch` and naive loops
on the CPU (tests/test_cuda_twins.py).
"""

from __future__ import annotations

import torch

from ...plan import max_padded_rows

__all__ = ["route_softmax_topk", "route_grouped_sigmoid_topk", "build_plan", "build_plan_blocked", "permute_rows",
           "unpermute_rows"]

_I32 = torch.int32


def _select(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' selection: the ``k`` largest entries per row, ties to the lowest
    index, ``-inf`` entries choosable, NaN entries never (a pick that lands on one is
    invalid). Returns indices int64 [T, k] and whether each pick is valid [T, k]."""
    nan = torch.isnan(score)
    order = torch.sort(score.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    # A second stable pass moves the NaN entries behind every other, keeping the order.
    order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, stable=True).indices)
    ids = order[:, :k]
    return ids, ~nan.gather(-1, ids)


def _counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert; ids ``== num_experts`` (dropped) are not counted."""
    flat = ids.reshape(-1).long()
    return torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))[:num_experts].to(_I32)


def route_softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p = softmax(float32(logits))``; the ``top_k`` largest ``p`` per token (ties: lowest
    expert first); ``w = p`` or ``p / sum(p over the chosen)``. Returns ids int32
    [T, k], weights float32 [T, k], counts int32 [E] (tokens per expert).

    A row with a NaN or +inf logit (or only -inf ones) has ``p`` NaN everywhere: every
    one of its slots is dropped, id ``E`` and weight 0, and counted nowhere."""
    e = logits.shape[1]
    p = torch.softmax(logits.float(), dim=-1)
    ids, valid = _select(p, top_k)
    w = torch.where(valid, p.gather(1, ids), 0.0)
    if renormalize:  # a row is valid whole or dropped whole: no 0/0 kept
        w = torch.where(valid, w / w.sum(dim=-1, keepdim=True), 0.0)
    ids = torch.where(valid, ids, e)
    return ids.to(_I32), w, _counts(ids, e)


def route_grouped_sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
                               topk_group: int, routed_scaling_factor: float, renormalize: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: ``s = sigmoid(float32(logits))``, ``c = s + bias``; each of ``n_group``
    groups of consecutive experts scores the sum of its two best ``c`` (one if the
    group has one expert); the ``topk_group`` best groups (ties: lowest group) stay;
    the ``top_k`` best ``c`` among them are chosen (ties: lowest expert);
    ``w = s / (sum + 1e-20)`` if ``renormalize`` else ``s``, times the scaling factor.

    Non-finite values: an expert whose ``c`` is NaN (NaN logit or bias) is never chosen
    and never counts toward its group's score (a group with fewer than two others
    scores -inf); a group whose score is NaN (``inf + -inf`` from infinite biases) is
    never kept. Masked experts stay choosable at ``-inf`` when the kept groups run out;
    a slot with nothing left is dropped: id ``E``, weight 0, counted nowhere."""
    t, e = logits.shape
    s = torch.sigmoid(logits.float())
    c = s + bias.float() if bias is not None else s
    nan = torch.isnan(c)
    if n_group > 1:
        per = e // n_group
        ranked = torch.sort(c.masked_fill(nan, float("-inf")).view(t, n_group, per), dim=-1, descending=True).values
        group_score = ranked[..., 0] + ranked[..., 1] if per > 1 else ranked[..., 0]
        keep, kept = _select(group_score, topk_group)
        mask = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, kept)
        c = c.masked_fill(~mask.repeat_interleave(per, dim=1) & ~nan, float("-inf"))
    ids, valid = _select(c, top_k)
    w = torch.where(valid, s.gather(1, ids), 0.0)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * routed_scaling_factor
    ids = torch.where(valid, ids, e)
    return ids.to(_I32), w, _counts(ids, e)


def build_plan(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
               max_slots_per_token: int, top_k: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The index tensors of a :class:`~moe_kernels.plan.DispatchPlan`, in its field
    order: expert_counts [E], expert_offsets [E+1], sorted_slot [S], slot_position [S],
    padded_offsets [E+1], padded_slot [P], block_expert [P/block_m], token_slots [T, K];
    all int32. ``top_k > 0`` means token-major slots (``s = t*top_k + j``), 0 any layout.

    Slots whose expert is outside ``[0, E)`` count as dropped (the kernel's rule; the
    Routing type only ever holds the sentinel ``E``). The sort is stable by slot id."""
    s, e, t, k, bm = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token, block_m
    dev = slot_expert.device
    se = slot_expert.long()
    bucket = torch.where((se >= 0) & (se < e), se, torch.full_like(se, e))
    valid = bucket < e
    counts_all = torch.zeros(e + 1, dtype=torch.long, device=dev).scatter_add_(0, bucket, torch.ones_like(bucket))
    offsets = torch.cumsum(counts_all, 0) - counts_all  # bucket starts; offsets[E] = valid slots
    order = torch.sort(bucket, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(s, device=dev)

    counts = counts_all[:e]
    padded = (counts + bm - 1) // bm * bm
    poffs = torch.zeros(e + 1, dtype=torch.long, device=dev)
    poffs[1:] = torch.cumsum(padded, 0)
    p = max_padded_rows(s, e, bm)
    safe = bucket.clamp(max=e - 1)
    row = torch.where(valid, poffs[safe] + position - offsets[safe], torch.full_like(position, p))
    padded_slot = torch.full((p + 1,), -1, dtype=torch.long, device=dev)
    padded_slot[row] = torch.arange(s, device=dev)  # dropped slots all land on the dump row p

    starts = torch.arange(p // bm, device=dev) * bm
    block_expert = torch.searchsorted(poffs[1:].contiguous(), starts, right=True)
    block_expert = torch.where(block_expert < e, block_expert, torch.full_like(block_expert, -1))

    slots = torch.arange(s, device=dev)
    if top_k > 0:
        table = torch.where(valid, slots, torch.full_like(slots, -1)).view(t, top_k)
        token_slots = torch.full((t, k), -1, dtype=torch.long, device=dev)
        token_slots[:, :top_k] = table
    else:
        tok = torch.where(valid, slot_token.long(), torch.full_like(se, t))
        by_token = torch.sort(tok, stable=True).indices  # slot order within each token
        tok_sorted = tok[by_token]
        tok_counts = torch.zeros(t + 1, dtype=torch.long, device=dev).scatter_add_(0, tok, torch.ones_like(tok))
        rank = torch.arange(s, device=dev) - (torch.cumsum(tok_counts, 0) - tok_counts)[tok_sorted]
        cell = torch.where((tok_sorted < t) & (rank < k), tok_sorted * k + rank, torch.full_like(rank, t * k))
        flat = torch.full((t * k + 1,), -1, dtype=torch.long, device=dev)
        flat[cell] = by_token
        token_slots = flat[:t * k].view(t, k)
    return (counts.to(_I32), offsets.to(_I32), order.to(_I32), position.to(_I32), poffs.to(_I32),
            padded_slot[:p].to(_I32), block_expert.to(_I32), token_slots.to(_I32).contiguous())


def build_plan_blocked(slot_expert: torch.Tensor, slot_token: torch.Tensor, num_tokens: int, num_experts: int,
                       max_slots_per_token: int, top_k: int, block_m: int, chunk: int = 256, scan_rows: int = 128,
                       append_order: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`build_plan` computed the way the many-CTA kernels of csrc/plan.cu compute it,
    step by step (a: histogram per chunk of ``chunk`` slots; b: exclusive scans within
    groups of ``scan_rows`` rows, level after level; c: offsets from the totals; d: each
    slot's position = its bucket's offset + the level entries of its chunk + its stable
    rank in the chunk; e: block map and padding by searchsorted per row; f: token rows
    appended in ``append_order`` (any permutation of the slots: the atomics' order) and
    then sorted). Same outputs as :func:`build_plan`, bit for bit; the CPU check of the
    kernels' decomposition (the kernels themselves run on a GPU only)."""
    s, e, t, k, bm = slot_expert.shape[0], num_experts, num_tokens, max_slots_per_token, block_m
    dev, w, long = slot_expert.device, num_experts + 1, torch.long
    se = slot_expert.long()
    bucket = torch.where((se >= 0) & (se < e), se, torch.full_like(se, e))
    slots = torch.arange(s, device=dev)
    nbk = -(-s // chunk)
    chunk_of = slots // chunk
    # a. histogram per chunk
    key = chunk_of * w + bucket
    hist = torch.zeros(nbk * w, dtype=long, device=dev).scatter_add_(0, key, torch.ones_like(key)).view(nbk, w)
    # b. levels of in-group exclusive scans; c. totals -> offsets
    levels, x = [], hist
    while x.shape[0] > 1:
        r, g = x.shape[0], -(-x.shape[0] // scan_rows)
        grouped = torch.zeros(g * scan_rows, w, dtype=long, device=dev)
        grouped[:r] = x
        grouped = grouped.view(g, scan_rows, w)
        inclusive = grouped.cumsum(1)
        levels.append((inclusive - grouped).view(-1, w)[:r])
        x = inclusive[:, -1]
    totals = x[0] if nbk else torch.zeros(w, dtype=long, device=dev)
    offsets = totals.cumsum(0) - totals
    counts = totals[:e]
    padded = (counts + bm - 1) // bm * bm
    poffs = torch.zeros(w, dtype=long, device=dev)
    poffs[1:] = padded.cumsum(0)
    # d. placement: chunk base from the levels, rank among the chunk's slots of the bucket
    base = offsets.unsqueeze(0).repeat(nbk, 1)
    chunks = torch.arange(nbk, device=dev)
    for depth, level in enumerate(levels):
        base += level[chunks // scan_rows ** depth]
    by_key = torch.sort(key, stable=True).indices
    key_start = hist.view(-1).cumsum(0) - hist.view(-1)
    rank = torch.empty_like(slots)
    rank[by_key] = slots - key_start[key[by_key]]
    position = base[chunk_of, bucket] + rank
    order = torch.empty_like(slots)
    order[position] = slots
    p = max_padded_rows(s, e, bm)
    valid = bucket < e
    padded_slot = torch.full((p,), -1, dtype=long, device=dev)
    padded_slot[(poffs[bucket] + position - offsets[bucket])[valid]] = slots[valid]
    # e. per padded row: its segment, padding, block_expert at each block's first row
    rows = torch.arange(p, device=dev)
    seg = torch.searchsorted(poffs[1:].contiguous(), rows, right=True)
    used = seg < e
    safe = seg.clamp(max=e - 1)
    padding = ~used | (rows - poffs[safe] >= counts[safe])
    if bool((padded_slot[padding] != -1).any()) or bool((padded_slot[~padding] < 0).any()):
        raise AssertionError("placement and padding rows overlap")  # steps d and e write disjoint rows
    block_expert = torch.where(used, seg, torch.full_like(seg, -1))[::bm]
    # f. token table
    if top_k > 0:
        token_slots = torch.full((t, k), -1, dtype=long, device=dev)
        token_slots[:, :top_k] = torch.where(valid, slots, torch.full_like(slots, -1)).view(t, top_k)
    else:
        tok = slot_token.long()
        live = valid & (tok >= 0) & (tok < t)
        flat = torch.full((t * k + 1,), -1, dtype=long, device=dev)
        fill = torch.zeros(t + 1, dtype=long, device=dev)
        for i in (append_order if append_order is not None else slots).tolist():  # the atomics, one by one
            if live[i]:
                c = int(fill[tok[i]])
                fill[tok[i]] += 1
                if c < k:
                    flat[int(tok[i]) * k + c] = i
        table = flat[:t * k].view(t, k)
        token_slots = torch.sort(torch.where(table < 0, s, table), dim=1).values
        token_slots = torch.where(token_slots == s, -1, token_slots)
    return (counts.to(_I32), offsets.to(_I32), order.to(_I32), position.to(_I32), poffs.to(_I32),
            padded_slot.to(_I32), block_expert.to(_I32), token_slots.to(_I32).contiguous())


def permute_rows(x: torch.Tensor, slot_token: torch.Tensor, row_slot: torch.Tensor,
                 slot_row: torch.Tensor | None = None, token_slots: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r] = x[slot_token[row_slot[r]]]``, zero where ``row_slot[r] < 0``; [R, H].
    ``slot_row`` and ``token_slots`` only serve the op's backward and are not read here."""
    valid = row_slot >= 0
    tok = slot_token.long()[row_slot.long().clamp(min=0)]
    out = x.index_select(0, torch.where(valid, tok, torch.zeros_like(tok)))
    return out.masked_fill(~valid.unsqueeze(1), 0)


def unpermute_rows(y: torch.Tensor, slot_row: torch.Tensor | None, token_slots: torch.Tensor,
                   slot_weight: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j w[s_j] * y[slot_row[s_j]]`` over ``s_j = token_slots[t, j] >= 0``
    (``slot_row`` None: row ``s_j``), in float32, ``j`` ascending, one rounding to
    ``y.dtype`` at the end; [T, H]."""
    t, k = token_slots.shape
    s, r = slot_weight.shape[0], y.shape[0]
    # Empty cells read a zero weight and a zero row: acc + 0 * 0 leaves acc unchanged.
    w = torch.cat([slot_weight.float(), slot_weight.new_zeros(1, dtype=torch.float32)])
    rows = torch.cat([y.float(), y.new_zeros(1, y.shape[1], dtype=torch.float32)])
    row_of = torch.arange(s, device=y.device) if slot_row is None else slot_row.long()
    row_of = torch.cat([row_of, row_of.new_full((1,), r)])
    acc = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):
        cell = token_slots[:, j].long()
        cell = torch.where(cell >= 0, cell, torch.full_like(cell, s))
        acc = acc + w[cell].unsqueeze(1) * rows[row_of[cell]]
    return acc.to(y.dtype)
