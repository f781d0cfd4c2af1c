// Loading the embedded device images and launching their kernels; see runtime.h.
#include "runtime.h"

#include <mutex>
#include <string>
#include <unordered_map>

namespace moe_ext {
namespace {

struct LoadedImage {
  std::mutex mutex;
  cudaLibrary_t library = nullptr;  // never unloaded: it lives as long as the process
  std::unordered_map<std::string, cudaKernel_t> kernels;
};

LoadedImage g_loaded[kNumImages];

bool no_device_error(cudaError_t err) {
  return err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver || err == cudaErrorInitializationError ||
         err == cudaErrorInvalidDevice || err == cudaErrorDevicesUnavailable;
}

cudaKernel_t get_kernel(const char* op, Image image, const char* name) {
  LoadedImage& loaded = g_loaded[static_cast<int>(image)];
  std::lock_guard<std::mutex> lock(loaded.mutex);
  if (loaded.library == nullptr) {
    const ImageBlob& blob = image_blob(image);
    // A failed load is not cached: the next call tries again.
    check_cuda(op, "loading the device image", cudaLibraryLoadData(&loaded.library, blob.data, nullptr, nullptr, 0,
                                                                    nullptr, nullptr, 0));
  }
  auto it = loaded.kernels.find(name);
  if (it != loaded.kernels.end()) return it->second;
  cudaKernel_t kernel = nullptr;
  check_cuda(op, (std::string("finding kernel ") + name).c_str(), cudaLibraryGetKernel(&kernel, loaded.library, name));
  loaded.kernels.emplace(name, kernel);
  return kernel;
}

}  // namespace

void arg_error(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("moe_kernels._C.") + op + ": " + what);
}

void cuda_error(const char* op, const char* what, cudaError_t err) {
  std::string msg = std::string("moe_kernels._C.") + op + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  if (no_device_error(err)) msg += "; no usable CUDA device here (this op needs an NVIDIA GPU and its driver)";
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  throw std::runtime_error(msg);
}

DeviceGuard::DeviceGuard(const char* op, int device) {
  check_cuda(op, "cudaGetDevice", cudaGetDevice(&previous_));
  if (previous_ != device) {
    check_cuda(op, "cudaSetDevice", cudaSetDevice(device));
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) cudaSetDevice(previous_);
}

void launch(const char* op, Image image, const char* kernel, dim3 grid, dim3 block, std::size_t smem,
            std::uintptr_t stream, void** args) {
  cudaKernel_t handle = get_kernel(op, image, kernel);
  // The runtime accepts a cudaKernel_t wherever it takes a kernel function pointer.
  check_cuda(op, (std::string("launching ") + kernel).c_str(),
             cudaLaunchKernel(reinterpret_cast<const void*>(handle), grid, block, args, smem,
                              reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace moe_ext
