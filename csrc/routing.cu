// Fused routing: router logits [T, E] -> top-k expert ids, weights and per-expert
// token counts, one warp per token.
//
// Pipeline per token (one warp, 4 warps per CTA): lane l holds experts l, l+32, ...
// in registers (VPT = ceil(E/32) <= 16, so E <= 512); scores in fp32 whatever the
// logits' dtype; k rounds of a warp argmax pick the experts (k <= 32; ties to the
// lowest expert index, as torch.topk and moe_kernels.routing); lane j keeps the j-th
// choice, so the stores are coalesced; counts[e] += 1 per choice (integer atomics:
// exact and order-free). `counts` must be zeroed before the launch (the host
// launcher memsets it on the same stream).
//
//   softmax_topk:         p = softmax(x); choose by p; w = p (/ sum of the chosen).
//   grouped_sigmoid_topk: s = sigmoid(x), c = s + bias; groups of E/n_group experts
//                         scored by the sum of their two best c; the topk_group best
//                         groups stay; choose by c among them; w = s (/ (sum + 1e-20))
//                         * routed_scaling_factor (DeepSeek-V3).
//
// Non-finite logits: a NaN choice score is never chosen. Softmax turns a row with a
// NaN or +inf logit (or only -inf ones) into NaN everywhere; grouped sigmoid makes
// only the NaN logits' (or NaN bias') experts NaN and scores a group by its best two
// non-NaN scores, never keeping a group whose score is NaN. A choice round that finds
// no candidate left gives id E (dropped), weight 0, no count, and adds nothing to the
// renormalisation total (a row with every slot dropped gets weight 0, not 0/0).
//
// No backward kernel: the gradient to the logits is a small torch expression of the
// saved weights and ids (moe_kernels/backends/cuda/backend.py), nothing is saved here.
// Pure-PyTorch twins: moe_kernels/backends/cuda/twins.py (route_softmax_topk,
// route_grouped_sigmoid_topk).
#include "common.cuh"

namespace moe {

constexpr int kRouteWarps = 4;

// k rounds of warp argmax over the lane's candidates (`score`, carrying `weight`);
// returns in lane j the j-th choice. NaN scores never win (both comparisons are false);
// a round with no candidate left returns num_experts and weight 0: without that the
// kNoIndex sentinel would reach the ids and index `counts` far out of bounds.
template <int VPT>
__device__ __forceinline__ void select_topk(const float (&score)[VPT], const float (&weight)[VPT], int num_experts,
                                            int top_k, int lane, int& my_id, float& my_w) {
  unsigned taken = 0u;
  my_id = 0;
  my_w = 0.f;
  for (int j = 0; j < top_k; ++j) {
    float bv = neg_inf();
    int bi = kNoIndex;
    float bw = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + 32 * i;
      // Strict '>' with e increasing: the lowest index wins a tie within the lane.
      if (e < num_experts && !((taken >> i) & 1u) && (score[i] > bv || (bi == kNoIndex && score[i] == bv))) {
        bv = score[i];
        bi = e;
        bw = weight[i];
      }
    }
    warp_argmax(bv, bi, bw);
    if (bi != kNoIndex && (bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == j) {
      const bool found = bi != kNoIndex;
      my_id = found ? bi : num_experts;
      my_w = found ? bw : 0.f;
    }
  }
}

template <typename T, int VPT>
__device__ __forceinline__ void route_softmax_topk(const T* __restrict__ logits, int* __restrict__ ids,
                                                   float* __restrict__ weights, int* __restrict__ counts,
                                                   int num_tokens, int num_experts, int top_k, int renormalize) {
  const int lane = threadIdx.x & 31;
  const long long token = (long long)blockIdx.x * kRouteWarps + (threadIdx.x >> 5);
  if (token >= num_tokens) return;
  const T* row = logits + token * num_experts;

  float p[VPT];
  float m = neg_inf();
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    // Clamped, unpredicated loads (then a select): 16 live predicates spill on sm_80.
    const int e = lane + 32 * i;
    const float v = to_f32(row[min(e, num_experts - 1)]);
    p[i] = e < num_experts ? v : neg_inf();
    m = fmaxf(m, p[i]);
  }
  m = warp_max(m);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < num_experts ? expf(p[i] - m) : 0.f;
    sum += p[i];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int i = 0; i < VPT; ++i) p[i] = p[i] / sum;

  int my_id;
  float my_w;
  select_topk<VPT>(p, p, num_experts, top_k, lane, my_id, my_w);
  // Dropped slots carry weight 0, so the total is over the chosen ones; softmax drops
  // either every slot of a row (total 0) or none (total >= 1/E).
  const float total = warp_sum(lane < top_k ? my_w : 0.f);
  if (lane < top_k) {
    const bool chosen = my_id < num_experts;
    ids[token * top_k + lane] = my_id;
    weights[token * top_k + lane] = renormalize && chosen ? my_w / total : my_w;
    if (chosen) atomicAdd(counts + my_id, 1);
  }
}

template <typename T, int VPT>
__device__ __forceinline__ void route_grouped_sigmoid_topk(const T* __restrict__ logits, const float* __restrict__ bias,
                                                           int* __restrict__ ids, float* __restrict__ weights,
                                                           int* __restrict__ counts, int num_tokens, int num_experts,
                                                           int top_k, int n_group, int topk_group, float scale,
                                                           int renormalize) {
  // Per warp, in dynamic shared memory sized by the launcher (none when n_group == 1):
  // the choice scores for the group scan, one padding word after every 32 (lane g reads
  // group g's run of `per` scores: unpadded, per = 32 puts every lane on one bank), then
  // the group scores and the kept-group flags. See route_group_smem_words.
  extern __shared__ float sh_route[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const long long token = (long long)blockIdx.x * kRouteWarps + warp;
  if (token >= num_tokens) return;
  const T* row = logits + token * num_experts;

  float s[VPT], c[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + 32 * i;
    const int ec = min(e, num_experts - 1);  // clamped loads, as in route_softmax_topk
    const float x = to_f32(row[ec]);
    const float b = bias != nullptr ? bias[ec] : 0.f;
    if (e < num_experts) {
      s[i] = 1.f / (1.f + expf(-x));
      c[i] = bias != nullptr ? s[i] + b : s[i];
    } else {
      s[i] = 0.f;
      c[i] = neg_inf();
    }
  }

  if (n_group > 1) {
    const int per = num_experts / n_group;
    const int padded = num_experts + (num_experts >> 5) + 1;
    float* choice = sh_route + warp * (padded + 2 * n_group);
    float* group = choice + padded;
    int* keep = reinterpret_cast<int*>(group + n_group);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + 32 * i;
      if (e < num_experts) choice[e + (e >> 5)] = c[i];
    }
    __syncwarp();
    for (int g = lane; g < n_group; g += 32) {
      float a = neg_inf(), b = neg_inf();  // the group's best two, duplicates counted, NaN skipped
      for (int q = 0; q < per; ++q) {
        const int e = g * per + q;
        const float v = choice[e + (e >> 5)];
        if (v > a) {
          b = a;
          a = v;
        } else if (v > b) {
          b = v;
        }
      }
      group[g] = per > 1 ? a + b : a;
      keep[g] = 0;
    }
    __syncwarp();
    for (int r = 0; r < topk_group; ++r) {
      float bv = neg_inf();
      int bi = kNoIndex;
      float unused = 0.f;
      for (int g = lane; g < n_group; g += 32) {
        if (!keep[g] && (group[g] > bv || (bi == kNoIndex && group[g] == bv))) {
          bv = group[g];
          bi = g;
        }
      }
      warp_argmax(bv, bi, unused);
      if (lane == 0 && bi != kNoIndex) keep[bi] = 1;
      __syncwarp();
    }
    // Masked experts stay choosable (at -inf, when the kept groups run short of
    // non-NaN experts), NaN ones stay NaN: never chosen, so no NaN weight gets out.
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + 32 * i;
      if (e < num_experts && !keep[e / per] && !is_nan(c[i])) c[i] = neg_inf();
    }
  }

  int my_id;
  float my_w;
  select_topk<VPT>(c, s, num_experts, top_k, lane, my_id, my_w);
  const float total = warp_sum(lane < top_k ? my_w : 0.f);  // dropped slots add their 0
  if (lane < top_k) {
    const float w = renormalize ? my_w / (total + 1e-20f) : my_w;  // 0 stays 0
    ids[token * top_k + lane] = my_id;
    weights[token * top_k + lane] = w * scale;
    if (my_id < num_experts) atomicAdd(counts + my_id, 1);
  }
}

}  // namespace moe

// One entry point per (dtype, VPT): plain names the host looks up in the image.
#define MOE_ROUTE_KERNELS(TNAME, T, VPT)                                                                        \
  extern "C" __global__ void __launch_bounds__(moe::kRouteWarps * 32)                                           \
      _route_softmax_topk_fwd_kernel_##TNAME##_v##VPT(                                                          \
          const T* __restrict__ logits, /* [T, E] */                                                            \
          int* __restrict__ ids,        /* [T, k] */                                                            \
          float* __restrict__ weights,  /* [T, k] */                                                            \
          int* __restrict__ counts,     /* [E], zeroed */                                                       \
          int num_tokens, int num_experts, int top_k, int renormalize) {                                        \
    moe::route_softmax_topk<T, VPT>(logits, ids, weights, counts, num_tokens, num_experts, top_k, renormalize); \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(moe::kRouteWarps * 32)                                           \
      _route_grouped_sigmoid_topk_fwd_kernel_##TNAME##_v##VPT(                                                  \
          const T* __restrict__ logits, /* [T, E] */                                                            \
          const float* __restrict__ bias, /* [E] or null */                                                     \
          int* __restrict__ ids,        /* [T, k] */                                                            \
          float* __restrict__ weights,  /* [T, k] */                                                            \
          int* __restrict__ counts,     /* [E], zeroed */                                                       \
          int num_tokens, int num_experts, int top_k, int n_group, int topk_group, float scale,                 \
          int renormalize) {                                                                                    \
    moe::route_grouped_sigmoid_topk<T, VPT>(logits, bias, ids, weights, counts, num_tokens, num_experts, top_k, \
                                            n_group, topk_group, scale, renormalize);                           \
  }

#define MOE_ROUTE_ALL_VPT(TNAME, T) \
  MOE_ROUTE_KERNELS(TNAME, T, 1)    \
  MOE_ROUTE_KERNELS(TNAME, T, 2)    \
  MOE_ROUTE_KERNELS(TNAME, T, 4)    \
  MOE_ROUTE_KERNELS(TNAME, T, 8)    \
  MOE_ROUTE_KERNELS(TNAME, T, 16)

MOE_ROUTE_ALL_VPT(f32, float)
MOE_ROUTE_ALL_VPT(f16, __half)
MOE_ROUTE_ALL_VPT(bf16, __nv_bfloat16)
