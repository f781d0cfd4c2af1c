// pybind11 module moe_kernels._C: the ops of ops.h plus what the build holds.
//
// No torch headers: arguments are integers (device addresses, sizes, dtype codes,
// the stream handle), so one build serves every torch version. Launches release the
// GIL; errors come back as ValueError (bad arguments) or RuntimeError (CUDA), both
// naming the op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "ops.h"
#include "plan_shape.h"
#include "runtime.h"

#ifndef MOE_KERNELS_ARCHS
#error "MOE_KERNELS_ARCHS (the real architectures, ';'-separated) must be defined by the build"
#endif
#ifndef MOE_KERNELS_PTX
#define MOE_KERNELS_PTX ""
#endif
#ifndef MOE_KERNELS_DEVICE_COMPILER
#define MOE_KERNELS_DEVICE_COMPILER "unknown"
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= s.size()) {
    const std::size_t end = s.find_first_of(";,", start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["archs"] = split(MOE_KERNELS_ARCHS);
  info["ptx"] = split(MOE_KERNELS_PTX);
  info["device_compiler"] = std::string(MOE_KERNELS_DEVICE_COMPILER);
  info["cuda_runtime"] = std::string("static");
  py::dict images;
  for (int i = 0; i < moe_ext::kNumImages; ++i) {
    const moe_ext::ImageBlob& blob = moe_ext::image_blob(static_cast<moe_ext::Image>(i));
    images[blob.name] = blob.size;
  }
  info["images"] = images;
  return info;
}

std::string ptxas_log() {
  std::string out;
  for (int i = 0; i < moe_ext::kNumImages; ++i) out += moe_ext::image_blob(static_cast<moe_ext::Image>(i)).ptxas_log;
  return out;
}

// 0 when no driver is installed: never raises, so `moe-kernels info` can show it.
int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  cudaGetLastError();
  return v;
}

void load_images(int device) {
  moe_ext::DeviceGuard guard("load_images", device);
  moe_ext::load_images("load_images");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_kernels CUDA kernels (raw-pointer ABI, static CUDA runtime; see csrc/runtime.h)";
  using moe_ext::ptr_t;
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("route_softmax_topk", &moe_ext::route_softmax_topk, nogil, py::arg("logits"), py::arg("ids"),
        py::arg("weights"), py::arg("counts"), py::arg("num_tokens"), py::arg("num_experts"), py::arg("top_k"),
        py::arg("renormalize"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "Softmax top-k routing: logits [T, E] -> ids int32 [T, k], weights fp32 [T, k], counts int32 [E].");
  m.def("route_grouped_sigmoid_topk", &moe_ext::route_grouped_sigmoid_topk, nogil, py::arg("logits"),
        py::arg("bias"), py::arg("ids"), py::arg("weights"), py::arg("counts"), py::arg("num_tokens"),
        py::arg("num_experts"), py::arg("top_k"), py::arg("n_group"), py::arg("topk_group"),
        py::arg("routed_scaling_factor"), py::arg("renormalize"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), "DeepSeek-V3 routing: sigmoid, selection bias (fp32 [E] or 0), grouped top-k.");
  m.def("build_plan", &moe_ext::build_plan, nogil, py::arg("slot_expert"), py::arg("slot_token"),
        py::arg("expert_counts"), py::arg("expert_offsets"), py::arg("sorted_slot"), py::arg("slot_position"),
        py::arg("padded_offsets"), py::arg("padded_slot"), py::arg("block_expert"), py::arg("token_slots"),
        py::arg("token_fill"), py::arg("scratch"), py::arg("scratch_words"), py::arg("num_slots"), py::arg("num_experts"), py::arg("num_tokens"),
        py::arg("max_slots_per_token"), py::arg("top_k"), py::arg("block_m"), py::arg("num_padded_rows"),
        py::arg("device"), py::arg("stream"), "The DispatchPlan index tensors (top_k 0: not token-major); one CTA at decode sizes, many past them.");
  m.def("permute_rows", &moe_ext::permute_rows, nogil, py::arg("x"), py::arg("slot_token"), py::arg("row_slot"),
        py::arg("out"), py::arg("num_rows"), py::arg("hidden"), py::arg("elem_size"), py::arg("num_slots"),
        py::arg("x_rows"), py::arg("bad"), py::arg("device"), py::arg("stream"),
        "out[r] = x[slot_token[row_slot[r]]], zero where row_slot[r] < 0 (or out of range: then *bad = 1).");
  m.def("unpermute_rows", &moe_ext::unpermute_rows, nogil, py::arg("y"), py::arg("slot_row"),
        py::arg("token_slots"), py::arg("weights"), py::arg("out"), py::arg("num_tokens"), py::arg("max_slots"),
        py::arg("hidden"), py::arg("dtype"), py::arg("num_slots"), py::arg("y_rows"), py::arg("bad"),
        py::arg("device"), py::arg("stream"),
        "out[t] = sum_j w[s] * y[slot_row[s]] over s = token_slots[t, j] >= 0, fp32 accumulation, fixed order; "
        "out-of-range cells are skipped and set *bad = 1.");
  m.def("plan_scratch_words", &moe_ext::plan_scratch_words, py::arg("num_slots"), py::arg("num_experts"),
        "int32 words of scratch build_plan needs for these sizes.");
  m.def("max_padded_rows", &moe_ext::max_padded_rows, py::arg("num_slots"), py::arg("num_experts"),
        py::arg("block_m"));
  m.def("build_info", &build_info, "CUDA version, real archs, PTX archs and device compiler of this build.");
  m.def("ptxas_log", &ptxas_log, "The ptxas -v output of the build (registers, spills per kernel and arch).");
  m.def("load_images", &load_images, nogil, py::arg("device"),
        "Load every device image now (not allowed during CUDA-graph capture; launches load lazily otherwise).");
  m.def("images_loaded", &moe_ext::images_loaded, "Whether every device image is loaded.");
  m.def("driver_version", &driver_version, "The CUDA driver's version (e.g. 13000), 0 without a driver.");
  m.attr("ROUTE_MAX_EXPERTS") = moe_ext::kRouteMaxExperts;
  m.attr("ROUTE_MAX_TOP_K") = moe_ext::kRouteMaxTopK;
  m.attr("PLAN_MAX_EXPERTS") = moe_ext::kPlanMaxExperts;
  m.attr("PLAN_SINGLE_MAX_SLOTS") = moe_plan::kPlanSingleMaxSlots;
  m.attr("PLAN_CHUNK") = moe_plan::kPlanChunk;
  m.attr("PLAN_SCAN_ROWS") = moe_plan::kPlanScanRows;
}
