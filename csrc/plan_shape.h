// The launch shape of the many-CTA dispatch plan (plan.cu), shared by the kernels and
// the host launcher (ops.cpp) and exported by the module, so that
// moe_kernels/backends/cuda/plan.py's launch_shape (the Python mirror) can be checked
// against it.
#pragma once

namespace moe_plan {
constexpr int kPlanSingleMaxSlots = 4096;  // up to here: the one-CTA kernel (decode)
constexpr int kPlanChunk = 256;            // slots per chunk (hist and place CTAs)
constexpr int kPlanScanRows = 128;         // rows per scan group
constexpr int kPlanMaxLevels = 4;          // 2^31 slots: 2^23 chunks -> 2^16 -> 512 -> 4 -> 1
constexpr int kPlanRowThreads = 256;       // threads per CTA of the per-row/per-token kernels
constexpr int kPlanPlaceThreads = 128;     // threads loading a chunk's bucket starts
}  // namespace moe_plan
