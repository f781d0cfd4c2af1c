// Launchers of the extension's ops. Tensors arrive as raw device addresses (from
// torch's data_ptr()), sizes as integers, the dtype as a code (0 fp32, 1 fp16,
// 2 bf16) and the stream as its integer handle. The Python layer
// (moe_kernels/backends/cuda/backend.py) validates shapes, dtypes, devices and contiguity;
// these re-check what a raw call could get wrong (ValueError) and raise RuntimeError
// naming the op for any CUDA failure.
#pragma once

#include <cstdint>

namespace moe_ext {

using ptr_t = std::uintptr_t;

constexpr int kRouteMaxExperts = 512;
constexpr int kRouteMaxTopK = 32;
constexpr int kPlanMaxExperts = 4000;

// logits [T, E] (dtype) -> ids int32 [T, k], weights fp32 [T, k], counts int32 [E].
// NaN scores are never chosen; a slot left without a candidate gets id E (dropped),
// weight 0 and no count (see routing.cu).
void route_softmax_topk(ptr_t logits, ptr_t ids, ptr_t weights, ptr_t counts, std::int64_t num_tokens,
                        std::int64_t num_experts, std::int64_t top_k, bool renormalize, int dtype, int device,
                        ptr_t stream);

// As above plus bias fp32 [E] (0 = none) and DeepSeek-V3 grouping.
void route_grouped_sigmoid_topk(ptr_t logits, ptr_t bias, ptr_t ids, ptr_t weights, ptr_t counts,
                                std::int64_t num_tokens, std::int64_t num_experts, std::int64_t top_k,
                                std::int64_t n_group, std::int64_t topk_group, double routed_scaling_factor,
                                bool renormalize, int dtype, int device, ptr_t stream);

// The DispatchPlan index tensors (all int32); token_fill int32 [T] and scratch
// (plan_scratch_words int32) are scratch. One CTA up to kPlanSingleMaxSlots slots, many past it.
void build_plan(ptr_t slot_expert, ptr_t slot_token, ptr_t expert_counts, ptr_t expert_offsets, ptr_t sorted_slot,
                ptr_t slot_position, ptr_t padded_offsets, ptr_t padded_slot, ptr_t block_expert, ptr_t token_slots,
                ptr_t token_fill, ptr_t scratch, std::int64_t scratch_words, std::int64_t num_slots,
                std::int64_t num_experts, std::int64_t num_tokens, std::int64_t max_slots_per_token,
                std::int64_t top_k, std::int64_t block_m, std::int64_t num_padded_rows, int device, ptr_t stream);

// int32 words of scratch build_plan needs (the scan levels of the many-CTA plan; 0 for
// the one-CTA plan, S <= kPlanSingleMaxSlots).
std::int64_t plan_scratch_words(std::int64_t num_slots, std::int64_t num_experts);

// out[r] = x[slot_token[row_slot[r]]] or 0; rows of `hidden` elements of elem_size bytes.
// Indices are bounds-checked (row_slot < num_slots, slot_token < x_rows): an index out
// of range gives a zero row and sets int32 *bad = 1 (bad may be 0: no flag).
void permute_rows(ptr_t x, ptr_t slot_token, ptr_t row_slot, ptr_t out, std::int64_t num_rows, std::int64_t hidden,
                  int elem_size, std::int64_t num_slots, std::int64_t x_rows, ptr_t bad, int device, ptr_t stream);

// out[t] = sum_j w[s_j] * y[slot_row[s_j]] over s_j = token_slots[t, j] >= 0 (slot_row 0: row s).
// A cell s_j >= num_slots or a row >= y_rows is skipped and sets int32 *bad = 1.
void unpermute_rows(ptr_t y, ptr_t slot_row, ptr_t token_slots, ptr_t weights, ptr_t out, std::int64_t num_tokens,
                    std::int64_t max_slots, std::int64_t hidden, int dtype, std::int64_t num_slots,
                    std::int64_t y_rows, ptr_t bad, int device, ptr_t stream);

// max_padded_rows of moe_kernels.plan: the worst-case padded row count.
std::int64_t max_padded_rows(std::int64_t num_slots, std::int64_t num_experts, std::int64_t block_m);

}  // namespace moe_ext
