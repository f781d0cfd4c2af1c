// Loading the embedded device images and launching their kernels; see runtime.h.
//
// When the images load: lazily, at the first launch that needs one (or at
// load_images(), exposed as moe_kernels.backends.cuda.backend.load_kernels()). Loading is not
// allowed during CUDA-graph capture, so a first launch on a capturing stream raises a
// RuntimeError that says to run one forward pass (or load_kernels()) before capturing;
// once loaded, launches capture normally (kernels are handles of a context-independent
// library: each loads into a device's context at its first launch there).
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
  return err == cudaErrorNoDevice || err == cudaErrorInitializationError || err == cudaErrorInvalidDevice ||
         err == cudaErrorDevicesUnavailable;
}

bool capture_error(cudaError_t err) {
  return err == cudaErrorStreamCaptureUnsupported || err == cudaErrorStreamCaptureInvalidated ||
         err == cudaErrorStreamCaptureImplicit;
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

int driver_version_or_zero() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  return v;
}

// What to do about `err`, for the errors whose cause a user can fix ("" otherwise).
std::string hint(cudaError_t err) {
  const std::string runtime = version_string(CUDART_VERSION);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorCallRequiresNewerDriver ||
      err == cudaErrorUnsupportedPtxVersion) {
    const int driver = driver_version_or_zero();
    if (driver == 0) {
      return "; no NVIDIA driver is installed here (no libcuda.so.1): this op needs an NVIDIA GPU and its driver";
    }
    const std::string what = err == cudaErrorUnsupportedPtxVersion
                                 ? "cannot compile this build's PTX (from CUDA " + runtime + ")"
                                 : "is older than this build's static CUDA runtime " + runtime;
    return "; the NVIDIA driver (for CUDA " + version_string(driver) + ") " + what +
           ": update the driver to one for CUDA >= " + runtime + ", or install a moe_kernels build for CUDA <= " +
           version_string(driver);
  }
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidKernelImage) {
    int device = 0, major = 0, minor = 0;
    std::string gpu = "this GPU";
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess) {
      gpu = "this GPU (sm_" + std::to_string(major) + std::to_string(minor) + ")";
    }
#if defined(MOE_KERNELS_ARCHS) && defined(MOE_KERNELS_PTX)
    const std::string built = std::string(" (built for sm ") + MOE_KERNELS_ARCHS + ", PTX " + MOE_KERNELS_PTX + ")";
#else
    const std::string built;
#endif
    return "; this build holds no machine code or PTX that runs on " + gpu + built +
           ": rebuild with MOE_KERNELS_CUDA_ARCHS naming its architecture, or use backend='triton' or 'torch'";
  }
  if (capture_error(err)) {
    return "; a CUDA graph is being captured (or its capture was invalidated): moe_kernels loads its device "
           "images at the first call, which capture does not allow, so run one forward pass (or call "
           "moe_kernels.backends.cuda.backend.load_kernels()) before capturing";
  }
  if (no_device_error(err)) return "; no usable CUDA device here (this op needs an NVIDIA GPU and its driver)";
  return "";
}

// Whether `stream` (or, for the legacy stream, another one under global-mode capture)
// is being captured. Errors count as "no": the load then reports them.
bool capturing(std::uintptr_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &status);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return err == cudaErrorStreamCaptureImplicit;
  }
  return status != cudaStreamCaptureStatusNone;
}

// Call with loaded.mutex held.
void load_locked(const char* op, Image image, LoadedImage& loaded) {
  if (loaded.library != nullptr) return;
  const ImageBlob& blob = image_blob(image);
  // A failed load is not cached: the next call tries again.
  check_cuda(op, (std::string("loading the device image '") + blob.name + "'").c_str(),
             cudaLibraryLoadData(&loaded.library, blob.data, nullptr, nullptr, 0, nullptr, nullptr, 0));
}

cudaKernel_t get_kernel(const char* op, Image image, const char* name, std::uintptr_t stream) {
  LoadedImage& loaded = g_loaded[static_cast<int>(image)];
  std::lock_guard<std::mutex> lock(loaded.mutex);
  if (loaded.library == nullptr) {
    // Loading during capture is an unsafe call: it would fail and invalidate the
    // user's capture with an error that does not say why, so refuse it up front.
    if (capturing(stream)) {
      throw std::runtime_error(std::string("moe_kernels._C.") + op + ": the device image '" + image_blob(image).name +
                               "' is not loaded yet and the stream is capturing a CUDA graph, during which loading "
                               "is not allowed: run one forward pass (or call moe_kernels.backends.cuda.backend."
                               "load_kernels()) before capturing");
    }
    load_locked(op, image, loaded);
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
                    cudaGetErrorString(err) + ")" + hint(err);
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

void load_images(const char* op) {
  for (int i = 0; i < kNumImages; ++i) {
    LoadedImage& loaded = g_loaded[i];
    std::lock_guard<std::mutex> lock(loaded.mutex);
    load_locked(op, static_cast<Image>(i), loaded);
  }
}

bool images_loaded() {
  for (int i = 0; i < kNumImages; ++i) {
    LoadedImage& loaded = g_loaded[i];
    std::lock_guard<std::mutex> lock(loaded.mutex);
    if (loaded.library == nullptr) return false;
  }
  return true;
}

void launch(const char* op, Image image, const char* kernel, dim3 grid, dim3 block, std::size_t smem,
            std::uintptr_t stream, void** args) {
  cudaKernel_t handle = get_kernel(op, image, kernel, stream);
  // The runtime accepts a cudaKernel_t wherever it takes a kernel function pointer.
  check_cuda(op, (std::string("launching ") + kernel).c_str(),
             cudaLaunchKernel(reinterpret_cast<const void*>(handle), grid, block, args, smem,
                              reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace moe_ext
