// Row permutation between token order and expert order.
//
//   permute:   out[r, :] = x[slot_token[row_slot[r]], :], or 0 where row_slot[r] < 0
//              (padding rows). A dtype-blind copy: 16-byte vectors when both row
//              starts are 16-byte aligned, else element-sized scalars.
//   unpermute: out[t, :] = sum over j < K with s = token_slots[t, j] >= 0 of
//              w[s] * y[slot_row[s], :] (slot_row null: row s), accumulated in fp32 in
//              column order j with separate round-to-nearest multiply and add (no FMA
//              contraction, so the pure-PyTorch twin reproduces it bit for bit), one
//              rounding to the output dtype at the end. Deterministic: no atomics.
//
// One warp per output row (4 per CTA); lanes stride over the row's vectors. Row
// offsets are 64-bit (rows * row length can pass 2^31). Every index read from memory
// is bounds-checked (one unsigned compare): a slot id >= S or a row outside the source
// (which the CPU twins reject with an IndexError) is not followed; permute writes a
// zero row, unpermute skips the cell, and both set *bad = 1 (the same value from any
// thread, so order does not matter) for the wrapper to raise on, instead of an
// illegal-address fault that would kill the CUDA context. No backward kernels: the
// backward of permute is unpermute with unit weights, and the backward of unpermute
// is a gather and a row-wise dot product done with torch ops in
// moe_kernels/backends/cuda/backend.py; nothing is saved beyond the op's inputs.
// Pure-PyTorch twins: moe_kernels/backends/cuda/twins.py (permute_rows, unpermute_rows).
#include "common.cuh"

namespace moe {

constexpr int kPermuteWarps = 4;

// V: the unit copied (uint4 = 16 bytes, or one element); nvec: units per row.
template <typename V>
__device__ __forceinline__ void permute_rows(const V* __restrict__ x, const int* __restrict__ slot_token,
                                             const int* __restrict__ row_slot, V* __restrict__ out,
                                             long long num_rows, long long nvec, int num_slots, long long x_rows,
                                             int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const long long r = (long long)blockIdx.x * kPermuteWarps + (threadIdx.x >> 5);
  if (r >= num_rows) return;
  const int s = row_slot[r];
  V* dst = out + r * nvec;
  const int tok = (s >= 0 && (unsigned)s < (unsigned)num_slots) ? slot_token[s] : -1;
  const bool out_of_range =
      s >= num_slots || (s >= 0 && (unsigned long long)(long long)tok >= (unsigned long long)x_rows);
  if (s < 0 || out_of_range) {
    if (out_of_range && lane == 0 && bad != nullptr) *bad = 1;
    const V zero{};
    for (long long c = lane; c < nvec; c += 32) dst[c] = zero;
    return;
  }
  const V* src = x + (long long)tok * nvec;
#pragma unroll 4
  for (long long c = lane; c < nvec; c += 32) dst[c] = src[c];
}

// VEC elements per thread and step; 16 / sizeof(T) when rows are 16-byte aligned.
template <typename T, int VEC>
__device__ __forceinline__ void unpermute_rows(const T* __restrict__ y, const int* __restrict__ slot_row,
                                               const int* __restrict__ token_slots, const float* __restrict__ w,
                                               T* __restrict__ out, long long num_tokens, int max_slots,
                                               long long hidden, int num_slots, long long y_rows,
                                               int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const long long t = (long long)blockIdx.x * kPermuteWarps + (threadIdx.x >> 5);
  if (t >= num_tokens) return;
  const int* cells = token_slots + t * max_slots;
  T* dst = out + t * hidden;
  for (long long c = (long long)lane * VEC; c < hidden; c += 32LL * VEC) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    for (int j = 0; j < max_slots; ++j) {
      const int s = cells[j];
      if (s < 0) continue;
      const long long row = (unsigned)s >= (unsigned)num_slots ? -1LL
                            : slot_row != nullptr              ? (long long)slot_row[s]
                                                               : (long long)s;
      if ((unsigned long long)row >= (unsigned long long)y_rows) {  // also s >= S (row -1)
        if (lane == 0 && bad != nullptr) *bad = 1;
        continue;
      }
      const float ws = w[s];
      const T* src = y + row * hidden + c;
      alignas(16) T buf[VEC];
      if constexpr (VEC * sizeof(T) == 16) {
        *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) buf[v] = src[v];
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = __fadd_rn(acc[v], __fmul_rn(ws, to_f32(buf[v])));
    }
    alignas(16) T res[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) res[v] = from_f32<T>(acc[v]);
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(dst + c) = *reinterpret_cast<const uint4*>(res);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) dst[c + v] = res[v];
    }
  }
}

}  // namespace moe

#define MOE_PERMUTE_KERNEL(SUFFIX, V)                                                                       \
  extern "C" __global__ void __launch_bounds__(moe::kPermuteWarps * 32) _permute_rows_fwd_kernel_##SUFFIX( \
      const V* __restrict__ x,              /* [T, nvec] */                                                 \
      const int* __restrict__ slot_token,   /* [S] */                                                       \
      const int* __restrict__ row_slot,     /* [R]; -1 = zero row */                                        \
      V* __restrict__ out,                  /* [R, nvec] */                                                 \
      long long num_rows, long long nvec, int num_slots, long long x_rows,                                  \
      int* __restrict__ bad /* [1] set to 1 on an out-of-range index; may be null */) {                     \
    moe::permute_rows<V>(x, slot_token, row_slot, out, num_rows, nvec, num_slots, x_rows, bad);             \
  }

MOE_PERMUTE_KERNEL(v16, uint4)
MOE_PERMUTE_KERNEL(s4, unsigned int)
MOE_PERMUTE_KERNEL(s2, unsigned short)

#define MOE_UNPERMUTE_KERNEL(SUFFIX, T, VEC)                                                                    \
  extern "C" __global__ void __launch_bounds__(moe::kPermuteWarps * 32) _unpermute_rows_fwd_kernel_##SUFFIX(   \
      const T* __restrict__ y,              /* [R, H] */                                                        \
      const int* __restrict__ slot_row,     /* [S] or null (row = slot) */                                      \
      const int* __restrict__ token_slots,  /* [T, K]; -1 = none */                                             \
      const float* __restrict__ w,          /* [S] */                                                           \
      T* __restrict__ out,                  /* [T, H] */                                                        \
      long long num_tokens, int max_slots, long long hidden, int num_slots, long long y_rows,                    \
      int* __restrict__ bad /* [1] set to 1 on an out-of-range index; may be null */) {                         \
    moe::unpermute_rows<T, VEC>(y, slot_row, token_slots, w, out, num_tokens, max_slots, hidden, num_slots,     \
                                y_rows, bad);                                                                   \
  }

MOE_UNPERMUTE_KERNEL(f32_v4, float, 4)
MOE_UNPERMUTE_KERNEL(f32_v1, float, 1)
MOE_UNPERMUTE_KERNEL(f16_v8, __half, 8)
MOE_UNPERMUTE_KERNEL(f16_v1, __half, 1)
MOE_UNPERMUTE_KERNEL(bf16_v8, __nv_bfloat16, 8)
MOE_UNPERMUTE_KERNEL(bf16_v1, __nv_bfloat16, 1)
