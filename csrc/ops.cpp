// Launchers: argument checks, grid shapes, kernel choice; see ops.h.
#include "ops.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <string>

#include "plan_shape.h"
#include "runtime.h"

namespace moe_ext {
namespace {

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();
constexpr int kWarpsPerCta = 4;  // routing, permute, unpermute: one warp per row
constexpr std::size_t kPlanSmemBytes = 48 * 1024;

const char* dtype_name(const char* op, int dtype) {
  switch (dtype) {
    case 0:
      return "f32";
    case 1:
      return "f16";
    case 2:
      return "bf16";
    default:
      arg_error(op, "dtype: expected code 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  }
}

void check_range(const char* op, const char* name, std::int64_t v, std::int64_t lo, std::int64_t hi) {
  if (v < lo || v > hi) {
    arg_error(op, std::string(name) + ": expected a value in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                      "], got " + std::to_string(v));
  }
}

void check_ptr(const char* op, const char* name, ptr_t p) {
  if (p == 0) arg_error(op, std::string(name) + ": expected a device address, got 0");
}

unsigned warp_rows_grid(std::int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerCta - 1) / kWarpsPerCta);
}

int route_vpt(std::int64_t num_experts) {
  int vpt = 1;
  while (32 * vpt < num_experts) vpt *= 2;
  return vpt;
}

bool aligned16(ptr_t p) { return (p & 15u) == 0; }

// The buffers every routing op writes (logits and outputs only matter when T > 0).
void check_route_buffers(const char* op, ptr_t logits, ptr_t ids, ptr_t weights, ptr_t counts,
                         std::int64_t num_tokens) {
  check_ptr(op, "counts", counts);
  if (num_tokens > 0) {
    check_ptr(op, "logits", logits);
    check_ptr(op, "ids", ids);
    check_ptr(op, "weights", weights);
  }
}

// The kernels add into counts with integer atomics, so it starts at zero (on the op's stream).
void zero_counts(const char* op, ptr_t counts, std::int64_t num_experts, ptr_t stream) {
  check_cuda(op, "zeroing counts",
             cudaMemsetAsync(reinterpret_cast<void*>(counts), 0, sizeof(std::int32_t) * num_experts,
                             reinterpret_cast<cudaStream_t>(stream)));
}

std::int64_t plan_levels_rows(std::int64_t rows, std::int64_t* per_level, int max_levels) {
  int n = 0;
  per_level[n++] = rows;
  while (rows > 1 && n <= max_levels) {
    rows = (rows + moe_plan::kPlanScanRows - 1) / moe_plan::kPlanScanRows;
    per_level[n++] = rows;
  }
  return n;
}

unsigned cdiv_u(std::int64_t a, std::int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// The many-CTA plan (plan.cu, steps a-f); arguments already checked by build_plan.
void build_plan_many(ptr_t slot_expert, ptr_t slot_token, ptr_t expert_counts, ptr_t expert_offsets,
                     ptr_t sorted_slot, ptr_t slot_position, ptr_t padded_offsets, ptr_t padded_slot,
                     ptr_t block_expert, ptr_t token_slots, ptr_t token_fill, ptr_t scratch,
                     std::int64_t scratch_words, std::int64_t num_slots, std::int64_t num_experts,
                     std::int64_t num_tokens, std::int64_t max_slots_per_token, std::int64_t top_k,
                     std::int64_t block_m, std::int64_t num_padded_rows, int device, ptr_t stream) {
  const char* op = "build_plan";
  using namespace moe_plan;
  const std::int64_t w = num_experts + 1;
  const std::int64_t chunks = (num_slots + kPlanChunk - 1) / kPlanChunk;
  std::int64_t rows[kPlanMaxLevels + 2];
  const int n = static_cast<int>(plan_levels_rows(chunks, rows, kPlanMaxLevels));
  std::int64_t total = 0;
  for (int i = 0; i < n; ++i) total += rows[i];
  if (n - 1 > kPlanMaxLevels) arg_error(op, "num_slots: too many scan levels");
  check_ptr(op, "scratch", scratch);
  if (scratch_words < total * w) {
    arg_error(op, "scratch_words: expected at least " + std::to_string(total * w) + ", got " +
                      std::to_string(scratch_words));
  }
  if (top_k == 0) check_ptr(op, "token_fill", token_fill);
  DeviceGuard guard(op, device);
  int* levels = reinterpret_cast<int*>(scratch);
  const void* se = reinterpret_cast<void*>(slot_expert);
  int a_s = static_cast<int>(num_slots), a_e = static_cast<int>(num_experts), a_w = static_cast<int>(w);
  {  // a. histogram per chunk
    void* a_hist = levels;
    void* args[] = {const_cast<void**>(&se), &a_hist, &a_s, &a_e};
    launch(op, Image::kPlan, "_plan_hist_fwd_kernel", dim3(static_cast<unsigned>(chunks)), dim3(kPlanChunk),
           sizeof(int) * w, stream, args);
  }
  std::int64_t row0 = 0;
  for (int l = 0; l + 1 < n; ++l) {  // b. one scan per level
    void* a_x = levels + row0 * w;
    void* a_tot = levels + (row0 + rows[l]) * w;
    int a_rows = static_cast<int>(rows[l]);
    void* args[] = {&a_x, &a_tot, &a_rows, &a_w};
    launch(op, Image::kPlan, "_plan_scan_fwd_kernel", dim3(cdiv_u(rows[l], kPlanScanRows), cdiv_u(w, kPlanRowThreads)),
           dim3(kPlanRowThreads), 0, stream, args);
    row0 += rows[l];
  }
  void* a_counts = reinterpret_cast<void*>(expert_counts);
  void* a_offs = reinterpret_cast<void*>(expert_offsets);
  void* a_poffs = reinterpret_cast<void*>(padded_offsets);
  int a_bm = static_cast<int>(block_m);
  {  // c. offsets from the bucket totals (the last level's one row)
    void* a_tot = levels + row0 * w;
    void* args[] = {&a_tot, &a_counts, &a_offs, &a_poffs, &a_e, &a_bm};
    launch(op, Image::kPlan, "_plan_offsets_fwd_kernel", dim3(1), dim3(1024), sizeof(int) * (2 * w + 64), stream,
           args);
  }
  void* a_sorted = reinterpret_cast<void*>(sorted_slot);
  void* a_pos = reinterpret_cast<void*>(slot_position);
  void* a_pslot = reinterpret_cast<void*>(padded_slot);
  {  // d. placement
    void* a_levels = levels;
    int a_chunks = static_cast<int>(chunks), a_nl = n - 1;
    void* args[] = {const_cast<void**>(&se), &a_levels, &a_offs, &a_poffs, &a_sorted, &a_pos, &a_pslot,
                    &a_s, &a_e, &a_chunks, &a_nl};
    launch(op, Image::kPlan, "_plan_place_fwd_kernel", dim3(static_cast<unsigned>(chunks)),
           dim3(kPlanPlaceThreads), sizeof(int) * w, stream, args);
  }
  {  // e. block map and padding rows
    void* a_bexp = reinterpret_cast<void*>(block_expert);
    int a_p = static_cast<int>(num_padded_rows);
    void* args[] = {&a_counts, &a_poffs, &a_pslot, &a_bexp, &a_e, &a_p, &a_bm};
    launch(op, Image::kPlan, "_plan_blocks_fwd_kernel", dim3(cdiv_u(num_padded_rows, kPlanRowThreads)),
           dim3(kPlanRowThreads), 0, stream, args);
  }
  if (num_tokens == 0) return;
  void* a_table = reinterpret_cast<void*>(token_slots);
  int a_t = static_cast<int>(num_tokens), a_k = static_cast<int>(max_slots_per_token), a_top = static_cast<int>(top_k);
  const dim3 token_grid(cdiv_u(num_tokens, kPlanRowThreads));
  if (top_k > 0) {  // f. token table by formula
    void* args[] = {const_cast<void**>(&se), &a_table, &a_e, &a_t, &a_k, &a_top};
    launch(op, Image::kPlan, "_plan_token_major_fwd_kernel", token_grid, dim3(kPlanRowThreads), 0, stream, args);
    return;
  }
  void* a_fill = reinterpret_cast<void*>(token_fill);
  void* a_tok = reinterpret_cast<void*>(slot_token);
  {
    void* args[] = {&a_table, &a_fill, &a_t, &a_k};
    launch(op, Image::kPlan, "_plan_token_fill_fwd_kernel", token_grid, dim3(kPlanRowThreads), 0, stream, args);
  }
  {
    void* args[] = {const_cast<void**>(&se), &a_tok, &a_table, &a_fill, &a_s, &a_e, &a_t, &a_k};
    launch(op, Image::kPlan, "_plan_token_append_fwd_kernel", dim3(cdiv_u(num_slots, kPlanRowThreads)),
           dim3(kPlanRowThreads), 0, stream, args);
  }
  {
    void* args[] = {&a_table, &a_fill, &a_t, &a_k};
    launch(op, Image::kPlan, "_plan_token_sort_fwd_kernel", token_grid, dim3(kPlanRowThreads), 0, stream, args);
  }
}

}  // namespace

std::int64_t max_padded_rows(std::int64_t num_slots, std::int64_t num_experts, std::int64_t block_m) {
  const std::int64_t bound = num_slots + std::min(num_experts, num_slots) * (block_m - 1);
  return bound / block_m * block_m;
}

void route_softmax_topk(ptr_t logits, ptr_t ids, ptr_t weights, ptr_t counts, std::int64_t num_tokens,
                        std::int64_t num_experts, std::int64_t top_k, bool renormalize, int dtype, int device,
                        ptr_t stream) {
  const char* op = "route_softmax_topk";
  const char* tname = dtype_name(op, dtype);
  check_range(op, "num_experts", num_experts, 1, kRouteMaxExperts);
  check_range(op, "top_k", top_k, 1, std::min<std::int64_t>(kRouteMaxTopK, num_experts));
  check_range(op, "num_tokens", num_tokens, 0, kInt32Max / top_k);
  check_route_buffers(op, logits, ids, weights, counts, num_tokens);
  DeviceGuard guard(op, device);
  zero_counts(op, counts, num_experts, stream);
  if (num_tokens == 0) return;
  char name[96];
  std::snprintf(name, sizeof(name), "_route_softmax_topk_fwd_kernel_%s_v%d", tname, route_vpt(num_experts));
  void* a_logits = reinterpret_cast<void*>(logits);
  void* a_ids = reinterpret_cast<void*>(ids);
  void* a_weights = reinterpret_cast<void*>(weights);
  void* a_counts = reinterpret_cast<void*>(counts);
  int a_t = static_cast<int>(num_tokens), a_e = static_cast<int>(num_experts), a_k = static_cast<int>(top_k);
  int a_renorm = renormalize ? 1 : 0;
  void* args[] = {&a_logits, &a_ids, &a_weights, &a_counts, &a_t, &a_e, &a_k, &a_renorm};
  launch(op, Image::kRouting, name, dim3(warp_rows_grid(num_tokens)), dim3(kWarpsPerCta * 32), 0, stream, args);
}

void route_grouped_sigmoid_topk(ptr_t logits, ptr_t bias, ptr_t ids, ptr_t weights, ptr_t counts,
                                std::int64_t num_tokens, std::int64_t num_experts, std::int64_t top_k,
                                std::int64_t n_group, std::int64_t topk_group, double routed_scaling_factor,
                                bool renormalize, int dtype, int device, ptr_t stream) {
  const char* op = "route_grouped_sigmoid_topk";
  const char* tname = dtype_name(op, dtype);
  check_range(op, "num_experts", num_experts, 1, kRouteMaxExperts);
  check_range(op, "n_group", n_group, 1, num_experts);
  if (num_experts % n_group != 0) {
    arg_error(op, "n_group: expected a divisor of num_experts " + std::to_string(num_experts) + ", got " +
                      std::to_string(n_group));
  }
  check_range(op, "topk_group", topk_group, 1, n_group);
  check_range(op, "top_k", top_k,
              1, std::min<std::int64_t>(kRouteMaxTopK, topk_group * (num_experts / n_group)));
  check_range(op, "num_tokens", num_tokens, 0, kInt32Max / top_k);
  if (!(routed_scaling_factor > 0.0)) arg_error(op, "routed_scaling_factor: expected a number > 0");
  check_route_buffers(op, logits, ids, weights, counts, num_tokens);
  DeviceGuard guard(op, device);
  zero_counts(op, counts, num_experts, stream);
  if (num_tokens == 0) return;
  char name[96];
  std::snprintf(name, sizeof(name), "_route_grouped_sigmoid_topk_fwd_kernel_%s_v%d", tname, route_vpt(num_experts));
  void* a_logits = reinterpret_cast<void*>(logits);
  void* a_bias = reinterpret_cast<void*>(bias);
  void* a_ids = reinterpret_cast<void*>(ids);
  void* a_weights = reinterpret_cast<void*>(weights);
  void* a_counts = reinterpret_cast<void*>(counts);
  int a_t = static_cast<int>(num_tokens), a_e = static_cast<int>(num_experts), a_k = static_cast<int>(top_k);
  int a_ng = static_cast<int>(n_group), a_tg = static_cast<int>(topk_group);
  float a_scale = static_cast<float>(routed_scaling_factor);
  int a_renorm = renormalize ? 1 : 0;
  void* args[] = {&a_logits, &a_bias, &a_ids, &a_weights, &a_counts, &a_t, &a_e,
                  &a_k,      &a_ng,   &a_tg,  &a_scale,   &a_renorm};
  // routing.cu's grouped kernel: per warp, E scores + one pad per 32, then n_group
  // group scores and flags; nothing when there is one group.
  const std::size_t words = static_cast<std::size_t>(num_experts + num_experts / 32 + 1 + 2 * n_group);
  const std::size_t smem = n_group > 1 ? sizeof(float) * kWarpsPerCta * words : 0;
  launch(op, Image::kRouting, name, dim3(warp_rows_grid(num_tokens)), dim3(kWarpsPerCta * 32), smem, stream, args);
}

void build_plan(ptr_t slot_expert, ptr_t slot_token, ptr_t expert_counts, ptr_t expert_offsets, ptr_t sorted_slot,
                ptr_t slot_position, ptr_t padded_offsets, ptr_t padded_slot, ptr_t block_expert, ptr_t token_slots,
                ptr_t token_fill, ptr_t scratch, std::int64_t scratch_words, std::int64_t num_slots,
                std::int64_t num_experts, std::int64_t num_tokens, std::int64_t max_slots_per_token,
                std::int64_t top_k, std::int64_t block_m, std::int64_t num_padded_rows, int device, ptr_t stream) {
  const char* op = "build_plan";
  check_range(op, "num_experts", num_experts, 1, kPlanMaxExperts);
  check_range(op, "num_slots", num_slots, 0, kInt32Max);
  check_range(op, "num_tokens", num_tokens, 0, kInt32Max);
  check_range(op, "max_slots_per_token", max_slots_per_token, 1, kInt32Max);
  check_range(op, "block_m", block_m, 1, 1 << 16);
  check_range(op, "top_k", top_k, 0, max_slots_per_token);
  if (top_k > 0 && num_slots != num_tokens * top_k) {
    arg_error(op, "num_slots: token-major slots need num_slots = num_tokens * top_k = " +
                      std::to_string(num_tokens * top_k) + ", got " + std::to_string(num_slots));
  }
  const std::int64_t padded = max_padded_rows(num_slots, num_experts, block_m);
  if (padded > kInt32Max) arg_error(op, "num_slots: padded rows " + std::to_string(padded) + " exceed int32");
  if (num_padded_rows != padded) {
    arg_error(op, "num_padded_rows: expected max_padded_rows(S, E, block_m) = " + std::to_string(padded) + ", got " +
                      std::to_string(num_padded_rows));
  }
  const ptr_t outputs[] = {expert_counts, expert_offsets, padded_offsets};
  for (ptr_t p : outputs) check_ptr(op, "expert_counts/expert_offsets/padded_offsets", p);
  if (num_slots > 0) {
    check_ptr(op, "slot_expert", slot_expert);
    check_ptr(op, "sorted_slot", sorted_slot);
    check_ptr(op, "slot_position", slot_position);
    check_ptr(op, "padded_slot", padded_slot);
    check_ptr(op, "block_expert", block_expert);
  }
  if (num_tokens > 0) check_ptr(op, "token_slots", token_slots);
  if (top_k == 0 && num_slots > 0) check_ptr(op, "slot_token", slot_token);
  if (top_k == 0 && num_tokens > 0) check_ptr(op, "token_fill", token_fill);
  if (num_slots > moe_plan::kPlanSingleMaxSlots) {
    build_plan_many(slot_expert, slot_token, expert_counts, expert_offsets, sorted_slot, slot_position,
                    padded_offsets, padded_slot, block_expert, token_slots, token_fill, scratch, scratch_words,
                    num_slots, num_experts, num_tokens, max_slots_per_token, top_k, block_m, num_padded_rows, device,
                    stream);
    return;
  }
  const std::int64_t nb = num_experts + 1;
  const std::int64_t words = static_cast<std::int64_t>(kPlanSmemBytes / sizeof(int)) - 64 - 2 * nb;
  const int nwarps = static_cast<int>(std::min<std::int64_t>(32, words / nb));
  if (nwarps < 1) arg_error(op, "num_experts: too many experts for the plan kernel's shared memory");
  const std::size_t smem = sizeof(int) * static_cast<std::size_t>(nwarps * nb + 2 * nb + 64);
  DeviceGuard guard(op, device);
  void* a[] = {reinterpret_cast<void*>(slot_expert),    reinterpret_cast<void*>(slot_token),
               reinterpret_cast<void*>(expert_counts),  reinterpret_cast<void*>(expert_offsets),
               reinterpret_cast<void*>(sorted_slot),    reinterpret_cast<void*>(slot_position),
               reinterpret_cast<void*>(padded_offsets), reinterpret_cast<void*>(padded_slot),
               reinterpret_cast<void*>(block_expert),   reinterpret_cast<void*>(token_slots),
               reinterpret_cast<void*>(token_fill)};
  int ints[] = {static_cast<int>(num_slots), static_cast<int>(num_experts),         static_cast<int>(num_tokens),
                static_cast<int>(max_slots_per_token), static_cast<int>(top_k), static_cast<int>(block_m),
                static_cast<int>(num_padded_rows)};
  void* args[] = {&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8], &a[9], &a[10],
                  &ints[0], &ints[1], &ints[2], &ints[3], &ints[4], &ints[5], &ints[6]};
  launch(op, Image::kPlan, "_plan_build_fwd_kernel", dim3(1), dim3(nwarps * 32), smem, stream, args);
}

std::int64_t plan_scratch_words(std::int64_t num_slots, std::int64_t num_experts) {
  if (num_slots <= moe_plan::kPlanSingleMaxSlots) return 0;
  std::int64_t rows = (num_slots + moe_plan::kPlanChunk - 1) / moe_plan::kPlanChunk, total = rows;
  while (rows > 1) {
    rows = (rows + moe_plan::kPlanScanRows - 1) / moe_plan::kPlanScanRows;
    total += rows;
  }
  return total * (num_experts + 1);
}

void permute_rows(ptr_t x, ptr_t slot_token, ptr_t row_slot, ptr_t out, std::int64_t num_rows, std::int64_t hidden,
                  int elem_size, std::int64_t num_slots, std::int64_t x_rows, ptr_t bad, int device, ptr_t stream) {
  const char* op = "permute_rows";
  check_range(op, "num_slots", num_slots, 0, kInt32Max);
  check_range(op, "x_rows", x_rows, 0, std::numeric_limits<std::int64_t>::max());
  if (elem_size != 2 && elem_size != 4) {
    arg_error(op, "elem_size: expected 2 or 4 bytes, got " + std::to_string(elem_size));
  }
  check_range(op, "num_rows", num_rows, 0, kInt32Max);
  check_range(op, "hidden", hidden, 0, std::numeric_limits<std::int64_t>::max() / 16);
  if (num_rows == 0 || hidden == 0) return;
  check_ptr(op, "x", x);
  check_ptr(op, "slot_token", slot_token);
  check_ptr(op, "row_slot", row_slot);
  check_ptr(op, "out", out);
  const std::int64_t row_bytes = hidden * elem_size;
  const bool vec = aligned16(x) && aligned16(out) && row_bytes % 16 == 0;
  const char* name = vec ? "_permute_rows_fwd_kernel_v16"
                         : (elem_size == 4 ? "_permute_rows_fwd_kernel_s4" : "_permute_rows_fwd_kernel_s2");
  void* a_x = reinterpret_cast<void*>(x);
  void* a_tok = reinterpret_cast<void*>(slot_token);
  void* a_row = reinterpret_cast<void*>(row_slot);
  void* a_out = reinterpret_cast<void*>(out);
  long long a_rows = num_rows, a_nvec = vec ? row_bytes / 16 : hidden, a_xrows = x_rows;
  int a_s = static_cast<int>(num_slots);
  void* a_bad = reinterpret_cast<void*>(bad);
  void* args[] = {&a_x, &a_tok, &a_row, &a_out, &a_rows, &a_nvec, &a_s, &a_xrows, &a_bad};
  DeviceGuard guard(op, device);
  launch(op, Image::kPermute, name, dim3(warp_rows_grid(num_rows)), dim3(kWarpsPerCta * 32), 0, stream, args);
}

void unpermute_rows(ptr_t y, ptr_t slot_row, ptr_t token_slots, ptr_t weights, ptr_t out, std::int64_t num_tokens,
                    std::int64_t max_slots, std::int64_t hidden, int dtype, std::int64_t num_slots,
                    std::int64_t y_rows, ptr_t bad, int device, ptr_t stream) {
  const char* op = "unpermute_rows";
  check_range(op, "num_slots", num_slots, 0, kInt32Max);
  check_range(op, "y_rows", y_rows, 0, std::numeric_limits<std::int64_t>::max());
  const char* tname = dtype_name(op, dtype);
  check_range(op, "num_tokens", num_tokens, 0, kInt32Max);
  check_range(op, "max_slots", max_slots, 1, kInt32Max);
  check_range(op, "hidden", hidden, 0, std::numeric_limits<std::int64_t>::max() / 16);
  if (num_tokens == 0 || hidden == 0) return;
  check_ptr(op, "token_slots", token_slots);
  check_ptr(op, "weights", weights);
  check_ptr(op, "y", y);
  check_ptr(op, "out", out);
  const int elem = dtype == 0 ? 4 : 2;
  const bool vec = aligned16(y) && aligned16(out) && (hidden * elem) % 16 == 0;
  char name[64];
  std::snprintf(name, sizeof(name), "_unpermute_rows_fwd_kernel_%s_v%d", tname, vec ? 16 / elem : 1);
  void* a_y = reinterpret_cast<void*>(y);
  void* a_row = reinterpret_cast<void*>(slot_row);
  void* a_ts = reinterpret_cast<void*>(token_slots);
  void* a_w = reinterpret_cast<void*>(weights);
  void* a_out = reinterpret_cast<void*>(out);
  long long a_t = num_tokens, a_h = hidden, a_yrows = y_rows;
  int a_k = static_cast<int>(max_slots), a_s = static_cast<int>(num_slots);
  void* a_bad = reinterpret_cast<void*>(bad);
  void* args[] = {&a_y, &a_row, &a_ts, &a_w, &a_out, &a_t, &a_k, &a_h, &a_s, &a_yrows, &a_bad};
  DeviceGuard guard(op, device);
  launch(op, Image::kPermute, name, dim3(warp_rows_grid(num_tokens)), dim3(kWarpsPerCta * 32), 0, stream, args);
}

}  // namespace moe_ext
