// The dispatch plan: per-expert histogram, exclusive scans, and the stable scatter of
// slots into expert order (plain and padded to BLOCK_M), the block->expert map and the
// token->slots table. Output is bit-identical to moe_kernels.plan.build_plan_torch
// (fields documented on DispatchPlan). Two shapes, picked by the host from S: one CTA
// for decode sizes (below), many CTAs past kPlanSingleMaxSlots (second half of the file).
//
// One-CTA pipeline (one CTA of NW warps, NW chosen by the host so the shared memory fits in
// 48 KB: NW * (E+1) per-warp counters plus two (E+1) scans; E <= 4000):
//   0. fill: padded_slot = -1; token_slots (token-major routings: slot ids or -1;
//      otherwise -1 and the per-token fill counters zeroed);
//   1. count: warp w walks its contiguous slice of slots 32 at a time; lanes with the
//      same expert find each other with __match_any_sync and the lowest one adds the
//      group's size to the warp's counter (no atomics, no races). Dropped slots (and,
//      defensively, ids outside [0, E]) form bucket E so that they sort last.
//      Slots of non-token-major routings append themselves to their token's row
//      (integer atomics; the row is sorted in step 4, so the result is exact);
//   2. scan: per bucket, an exclusive scan over the warps (each warp's start inside
//      the bucket); then block-wide exclusive scans of the bucket totals and of the
//      totals rounded up to BLOCK_M -> expert_offsets, padded_offsets; block_expert
//      by binary search of each block's first row in padded_offsets;
//   3. scatter: the same walk again; a slot's position = bucket start + its warp's
//      start in the bucket + its rank among equal lanes of this round (stable by slot
//      id, because slices and rounds are in slot order);
//   4. non-token-major routings: insertion-sort each token's row by slot id.
// No host synchronisation: every size is a worst-case bound known from S, E, T, K.
// Integer-only, so there is no backward. Pure-PyTorch twin:
// moe_kernels/backends/cuda/twins.py build_plan.
#include "common.cuh"
#include "plan_shape.h"

namespace moe {

// Exclusive scan of a[0..n) and of round_up(a[i], block_m) for i < n-1 (0 for the
// last bucket, the dropped one) into a (in place) and b; every thread of the block
// takes a contiguous run of items, so the sum order is fixed.
__device__ __forceinline__ void block_scan_pair(int* a, int* b, int n, int block_m, int* warp_tot) {
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = nthreads >> 5;
  const int per = (n + nthreads - 1) / nthreads;
  const int lo = min(n, tid * per), hi = min(n, lo + per);
  int sa = 0, sb = 0;
  for (int i = lo; i < hi; ++i) {
    sa += a[i];
    sb += i < n - 1 ? (a[i] + block_m - 1) / block_m * block_m : 0;
  }
  // Inclusive warp scan of the per-thread sums, then of the warp totals.
  int ia = sa, ib = sb;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int ta = __shfl_up_sync(MOE_FULL_MASK, ia, o), tb = __shfl_up_sync(MOE_FULL_MASK, ib, o);
    if (lane >= o) {
      ia += ta;
      ib += tb;
    }
  }
  if (lane == 31) {
    warp_tot[warp] = ia;
    warp_tot[32 + warp] = ib;
  }
  __syncthreads();
  if (tid == 0) {
    int ra = 0, rb = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int ta = warp_tot[w], tb = warp_tot[32 + w];
      warp_tot[w] = ra;
      warp_tot[32 + w] = rb;
      ra += ta;
      rb += tb;
    }
  }
  __syncthreads();
  int ra = warp_tot[warp] + ia - sa, rb = warp_tot[32 + warp] + ib - sb;
  for (int i = lo; i < hi; ++i) {
    const int v = a[i];
    const int pv = i < n - 1 ? (v + block_m - 1) / block_m * block_m : 0;
    a[i] = ra;
    b[i] = rb;
    ra += v;
    rb += pv;
  }
  __syncthreads();
}

// Sorts one token's row of slot ids ascending (insertion sort: rows hold at most K
// entries, mostly already in order); the one-CTA and the many-CTA plans both end with it.
__device__ __forceinline__ void sort_token_row(int* row, int n) {
  for (int a = 1; a < n; ++a) {
    const int v = row[a];
    int b = a - 1;
    while (b >= 0 && row[b] > v) {
      row[b + 1] = row[b];
      --b;
    }
    row[b + 1] = v;
  }
}

__device__ __forceinline__ int plan_bucket(int e, int num_experts) {
  return (e >= 0 && e < num_experts) ? e : num_experts;
}

}  // namespace moe

extern "C" __global__ void __launch_bounds__(1024) _plan_build_fwd_kernel(
    const int* __restrict__ slot_expert,  // [S]; E = dropped
    const int* __restrict__ slot_token,   // [S]; read only when top_k == 0
    int* __restrict__ expert_counts,      // [E]
    int* __restrict__ expert_offsets,     // [E+1]
    int* __restrict__ sorted_slot,        // [S]
    int* __restrict__ slot_position,      // [S]
    int* __restrict__ padded_offsets,     // [E+1]
    int* __restrict__ padded_slot,        // [P]
    int* __restrict__ block_expert,       // [P / block_m]
    int* __restrict__ token_slots,        // [T, K]
    int* __restrict__ token_fill,         // [T] scratch; used only when top_k == 0
    int num_slots, int num_experts, int num_tokens, int max_slots_per_token, int top_k, int block_m,
    int num_padded_rows) {
  using namespace moe;
  extern __shared__ int smem[];
  const int nb = num_experts + 1;  // buckets: experts, then dropped
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = nthreads >> 5;
  int* wcnt = smem;                 // [nwarps][nb]
  int* base = wcnt + nwarps * nb;   // [nb] bucket start in sorted order
  int* pbase = base + nb;           // [nb] expert start in padded order (pbase[E] = padded total)
  int* warp_tot = pbase + nb;       // [64] scan scratch
  const long long table = (long long)num_tokens * max_slots_per_token;

  // 0. fill
  for (int i = tid; i < nwarps * nb; i += nthreads) wcnt[i] = 0;
  for (int i = tid; i < num_padded_rows; i += nthreads) padded_slot[i] = -1;
  if (top_k > 0) {
    // A thread per token row (no 64-bit divide per cell): S = T * top_k < 2^31.
    for (int t = tid; t < num_tokens; t += nthreads) {
      int* row = token_slots + (long long)t * max_slots_per_token;
      const int s0 = t * top_k;
      for (int j = 0; j < max_slots_per_token; ++j) {
        row[j] = (j < top_k && plan_bucket(slot_expert[s0 + j], num_experts) < num_experts) ? s0 + j : -1;
      }
    }
  } else {
    for (long long i = tid; i < table; i += nthreads) token_slots[i] = -1;
    for (int t = tid; t < num_tokens; t += nthreads) token_fill[t] = 0;
  }
  __syncthreads();

  // 1. count
  const int slice = (num_slots + nwarps - 1) / nwarps;
  const int lo = min(num_slots, warp * slice), hi = min(num_slots, lo + slice);
  int* my_cnt = wcnt + warp * nb;
  for (int i0 = lo; i0 < hi; i0 += 32) {
    const int s = i0 + lane;
    const int key = s < hi ? plan_bucket(slot_expert[s], num_experts) : -1;
    const unsigned same = __match_any_sync(MOE_FULL_MASK, key);
    if (key >= 0 && lane == __ffs(same) - 1) my_cnt[key] += __popc(same);
    if (top_k == 0 && key >= 0 && key < num_experts) {
      const int t = slot_token[s];
      if (t >= 0 && t < num_tokens) {
        const int c = atomicAdd(token_fill + t, 1);
        if (c < max_slots_per_token) token_slots[(long long)t * max_slots_per_token + c] = s;
      }
    }
    __syncwarp();
  }
  __syncthreads();

  // 2. scan: per bucket over warps, then over buckets
  for (int b = tid; b < nb; b += nthreads) {
    int run = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int c = wcnt[w * nb + b];
      wcnt[w * nb + b] = run;
      run += c;
    }
    base[b] = run;
    if (b < num_experts) expert_counts[b] = run;
  }
  __syncthreads();
  block_scan_pair(base, pbase, nb, block_m, warp_tot);
  for (int b = tid; b < nb; b += nthreads) {
    expert_offsets[b] = base[b];
    padded_offsets[b] = pbase[b];
  }
  const int num_blocks = num_padded_rows / block_m;
  for (int blk = tid; blk < num_blocks; blk += nthreads) {
    // searchsorted(padded_offsets[1:], blk * block_m, right=True)
    const int start = blk * block_m;
    int a = 0, z = num_experts;
    while (a < z) {
      const int mid = (a + z) >> 1;
      if (pbase[mid + 1] <= start) {
        a = mid + 1;
      } else {
        z = mid;
      }
    }
    block_expert[blk] = a < num_experts ? a : -1;
  }

  // 3. scatter
  for (int i0 = lo; i0 < hi; i0 += 32) {
    const int s = i0 + lane;
    const int key = s < hi ? plan_bucket(slot_expert[s], num_experts) : -1;
    const unsigned same = __match_any_sync(MOE_FULL_MASK, key);
    if (key >= 0) {
      const int pos = base[key] + my_cnt[key] + __popc(same & lanemask_lt());
      sorted_slot[pos] = s;
      slot_position[s] = pos;
      if (key < num_experts) padded_slot[pbase[key] + (pos - base[key])] = s;
    }
    __syncwarp();  // every lane has read my_cnt[key] before the leader moves it on
    if (key >= 0 && lane == __ffs(same) - 1) my_cnt[key] += __popc(same);
    __syncwarp();
  }

  // 4. token rows of non-token-major routings, in slot order
  if (top_k == 0) {
    for (int t = tid; t < num_tokens; t += nthreads) {
      moe::sort_token_row(token_slots + (long long)t * max_slots_per_token, min(token_fill[t], max_slots_per_token));
    }
  }
}

// ---------------------------------------------------------------------------------
// The same plan over many CTAs, for prefill sizes (S > kPlanSingleMaxSlots; the host
// picks). Buckets are the E experts plus bucket E (dropped), W = E + 1 of them.
//   a. _plan_hist_fwd_kernel, one CTA per chunk of kPlanChunk slots: counts per bucket
//      in shared memory (integer atomics: a sum, whose order never shows) -> hist[b, :];
//   b. _plan_scan_fwd_kernel, one launch per level: groups of kPlanScanRows rows are
//      scanned in place down each column (exclusive); each group's totals make a row of
//      the next level, until a level has one row (the bucket totals);
//   c. _plan_offsets_fwd_kernel, one CTA: expert_counts, expert_offsets, padded_offsets
//      from the totals (block scans; its loops grow with E, never with S);
//   d. _plan_place_fwd_kernel, one CTA per chunk: each bucket's start for this chunk =
//      its offset + the chunk's entry of every level; one warp then walks the chunk in
//      slot order (rank among equal lanes by __match_any_sync), so the sort is stable;
//   e. _plan_blocks_fwd_kernel, one thread per padded row: its segment by binary search
//      in padded_offsets, -1 in padding rows, block_expert at each block's first row;
//   f. token_slots: token-major routings by formula (_plan_token_major_fwd_kernel);
//      other layouts: fill (-1), append through per-token atomic cursors, then sort
//      each row (_plan_token_fill/_append/_sort_fwd_kernel): the order is restored.
// No loop of any CTA runs longer with S (the level loop runs at most kPlanMaxLevels
// times); the grid grows as S / kPlanChunk.

namespace moe {
using namespace moe_plan;
}  // namespace moe

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanChunk) _plan_hist_fwd_kernel(
    const int* __restrict__ slot_expert,  // [S]
    int* __restrict__ hist,               // [NBK, E+1] out
    int num_slots, int num_experts) {
  using namespace moe;
  extern __shared__ int cnt[];  // [E+1]
  const int w = num_experts + 1;
  for (int i = threadIdx.x; i < w; i += blockDim.x) cnt[i] = 0;
  __syncthreads();
  const long long s = (long long)blockIdx.x * kPlanChunk + threadIdx.x;
  if (s < num_slots) atomicAdd(cnt + plan_bucket(slot_expert[s], num_experts), 1);
  __syncthreads();
  int* row = hist + (long long)blockIdx.x * w;
  for (int i = threadIdx.x; i < w; i += blockDim.x) row[i] = cnt[i];
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanRowThreads) _plan_scan_fwd_kernel(
    int* __restrict__ x,    // [R, W] in: a level; out: exclusive prefix within each group of rows
    int* __restrict__ tot,  // [cdiv(R, kPlanScanRows), W] out: the next level
    int rows, int width) {
  using namespace moe;
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (col >= width) return;
  const int r0 = blockIdx.x * kPlanScanRows, r1 = min(rows, r0 + kPlanScanRows);
  int run = 0;
  for (int r = r0; r < r1; ++r) {
    int* p = x + (long long)r * width + col;
    const int v = *p;
    *p = run;
    run += v;
  }
  tot[(long long)blockIdx.x * width + col] = run;
}

extern "C" __global__ void __launch_bounds__(1024) _plan_offsets_fwd_kernel(
    const int* __restrict__ totals,  // [E+1] slots per bucket
    int* __restrict__ expert_counts,   // [E]
    int* __restrict__ expert_offsets,  // [E+1]
    int* __restrict__ padded_offsets,  // [E+1]
    int num_experts, int block_m) {
  using namespace moe;
  extern __shared__ int smem[];
  const int w = num_experts + 1;
  int* a = smem;          // [W]
  int* b = a + w;         // [W]
  int* warp_tot = b + w;  // [64]
  for (int i = threadIdx.x; i < w; i += blockDim.x) {
    const int c = totals[i];
    a[i] = c;
    if (i < num_experts) expert_counts[i] = c;
  }
  __syncthreads();
  block_scan_pair(a, b, w, block_m, warp_tot);
  for (int i = threadIdx.x; i < w; i += blockDim.x) {
    expert_offsets[i] = a[i];
    padded_offsets[i] = b[i];
  }
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanPlaceThreads) _plan_place_fwd_kernel(
    const int* __restrict__ slot_expert,     // [S]
    const int* __restrict__ levels,          // [sum of level rows, E+1] exclusive prefixes per level
    const int* __restrict__ expert_offsets,  // [E+1]
    const int* __restrict__ padded_offsets,  // [E+1]
    int* __restrict__ sorted_slot,           // [S]
    int* __restrict__ slot_position,         // [S]
    int* __restrict__ padded_slot,           // [P] (valid slots' rows)
    int num_slots, int num_experts, int num_chunks, int num_levels) {
  using namespace moe;
  extern __shared__ int cursor[];  // [E+1] next position of each bucket in this chunk
  const int w = num_experts + 1;
  for (int i = threadIdx.x; i < w; i += blockDim.x) {
    int v = expert_offsets[i];
    long long row0 = 0;
    int rows = num_chunks, idx = blockIdx.x;
    for (int l = 0; l < num_levels && l < kPlanMaxLevels; ++l) {
      v += levels[(row0 + idx) * w + i];
      row0 += rows;
      rows = (rows + kPlanScanRows - 1) / kPlanScanRows;
      idx /= kPlanScanRows;
    }
    cursor[i] = v;
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const int lo = blockIdx.x * kPlanChunk, hi = min(num_slots, lo + kPlanChunk);
  for (int i0 = lo; i0 < hi; i0 += 32) {
    const int s = i0 + lane;
    const int key = s < hi ? plan_bucket(slot_expert[s], num_experts) : -1;
    const unsigned same = __match_any_sync(MOE_FULL_MASK, key);
    if (key >= 0) {
      const int pos = cursor[key] + __popc(same & lanemask_lt());
      sorted_slot[pos] = s;
      slot_position[s] = pos;
      if (key < num_experts) padded_slot[padded_offsets[key] + (pos - expert_offsets[key])] = s;
    }
    __syncwarp();  // every lane has read cursor[key] before the leader moves it on
    if (key >= 0 && lane == __ffs(same) - 1) cursor[key] += __popc(same);
    __syncwarp();
  }
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanRowThreads) _plan_blocks_fwd_kernel(
    const int* __restrict__ expert_counts,   // [E]
    const int* __restrict__ padded_offsets,  // [E+1]
    int* __restrict__ padded_slot,           // [P] out: -1 in padding rows
    int* __restrict__ block_expert,          // [P / block_m] out
    int num_experts, int num_padded_rows, int block_m) {
  const long long rr = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // no int wrap near P = 2^31
  if (rr >= num_padded_rows) return;
  const int r = (int)rr;
  // searchsorted(padded_offsets[1:], r, right=True)
  int a = 0, z = num_experts;
  while (a < z) {
    const int mid = (a + z) >> 1;
    if (padded_offsets[mid + 1] <= r) {
      a = mid + 1;
    } else {
      z = mid;
    }
  }
  const bool used = a < num_experts;
  if (!used || r - padded_offsets[a] >= expert_counts[a]) padded_slot[r] = -1;
  const int blk = r / block_m;
  if (r == blk * block_m) block_expert[blk] = used ? a : -1;
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanRowThreads) _plan_token_major_fwd_kernel(
    const int* __restrict__ slot_expert,  // [T * top_k]
    int* __restrict__ token_slots,        // [T, K] out
    int num_experts, int num_tokens, int max_slots_per_token, int top_k) {
  using namespace moe;
  const long long tt = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (tt >= num_tokens) return;
  const int t = (int)tt;
  int* row = token_slots + (long long)t * max_slots_per_token;
  const int s0 = t * top_k;  // < S < 2^31
  for (int j = 0; j < max_slots_per_token; ++j) {
    row[j] = (j < top_k && plan_bucket(slot_expert[s0 + j], num_experts) < num_experts) ? s0 + j : -1;
  }
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanRowThreads) _plan_token_fill_fwd_kernel(
    int* __restrict__ token_slots,  // [T, K] out: -1
    int* __restrict__ token_fill,   // [T] out: 0
    int num_tokens, int max_slots_per_token) {
  const long long tt = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (tt >= num_tokens) return;
  const int t = (int)tt;
  int* row = token_slots + (long long)t * max_slots_per_token;
  for (int j = 0; j < max_slots_per_token; ++j) row[j] = -1;
  token_fill[t] = 0;
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanRowThreads) _plan_token_append_fwd_kernel(
    const int* __restrict__ slot_expert,  // [S]
    const int* __restrict__ slot_token,   // [S]
    int* __restrict__ token_slots,        // [T, K] out: valid slots, any order within a row
    int* __restrict__ token_fill,         // [T] scratch cursors
    int num_slots, int num_experts, int num_tokens, int max_slots_per_token) {
  using namespace moe;
  const long long ss = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (ss >= num_slots) return;
  const int s = (int)ss;
  if (plan_bucket(slot_expert[s], num_experts) >= num_experts) return;
  const int t = slot_token[s];
  if (t < 0 || t >= num_tokens) return;
  const int c = atomicAdd(token_fill + t, 1);
  if (c < max_slots_per_token) token_slots[(long long)t * max_slots_per_token + c] = s;
}

extern "C" __global__ void __launch_bounds__(moe_plan::kPlanRowThreads) _plan_token_sort_fwd_kernel(
    int* __restrict__ token_slots,       // [T, K] in/out: each row's slots ascending
    const int* __restrict__ token_fill,  // [T]
    int num_tokens, int max_slots_per_token) {
  const long long tt = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (tt >= num_tokens) return;
  const int t = (int)tt;
  moe::sort_token_row(token_slots + (long long)t * max_slots_per_token, min(token_fill[t], max_slots_per_token));
}
