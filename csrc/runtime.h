// Host side of the extension: the embedded device images, loading them, launching
// their kernels, and turning CUDA errors into Python exceptions that name the op.
//
// The device code is compiled separately (nvcc -fatbin, or NVRTC + ptxas + nvFatbin
// for toolchains without nvcc) and embedded in this module; kernels are launched
// through the CUDA runtime's library API (cudaLibraryLoadData, cudaLibraryGetKernel,
// cudaLaunchKernel) of the statically linked runtime. So the module links no torch
// and no shared CUDA library, imports without a GPU or driver, and every CUDA call
// happens on the first launch. The images load then (or at load_images()), which must
// not happen inside CUDA-graph capture: see runtime.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace moe_ext {

enum class Image : int { kRouting = 0, kPlan = 1, kPermute = 2 };
constexpr int kNumImages = 3;

struct ImageBlob {
  const char* name;
  const unsigned char* data;
  std::size_t size;
  const char* ptxas_log;  // NUL-terminated build log of this image's ptxas runs
};

const ImageBlob& image_blob(Image image);

// Bad arguments: pybind11 turns std::invalid_argument into ValueError.
[[noreturn]] void arg_error(const char* op, const std::string& what);

// A failed CUDA call: RuntimeError "moe_kernels._C.<op>: <what> failed: <name> (<text>)".
[[noreturn]] void cuda_error(const char* op, const char* what, cudaError_t err);

inline void check_cuda(const char* op, const char* what, cudaError_t err) {
  if (err != cudaSuccess) cuda_error(op, what, err);
}

// Makes `device` current for the scope and restores the previous device after, so a
// launch for a tensor on cuda:1 does not change the caller's current device; it restores
// only a device whose primary context is active, so a process that only uses cuda:N
// gets no context on GPU 0.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

// Load every embedded image now and make every kernel in it resident in the current
// device's context (outside CUDA-graph capture); idempotent. Call inside a DeviceGuard,
// once per device. Launches load what they need themselves, but refuse to do it (the
// image, or a kernel's first use on a device) while their stream is being captured.
void load_images(const char* op);
bool images_loaded();

// Launch `kernel` (an extern "C" name inside `image`) on the stream given as an
// integer handle. Call inside a DeviceGuard.
void launch(const char* op, Image image, const char* kernel, dim3 grid, dim3 block, std::size_t smem,
            std::uintptr_t stream, void** args);

}  // namespace moe_ext
