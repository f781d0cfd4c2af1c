// Loading the embedded device images and launching their kernels; see runtime.h.
//
// When the images load: lazily, at the first launch that needs one (or at
// load_images(), exposed as moe_kernels.backends.cuda.load_kernels()). Kernels are
// handles of a context-independent library, and each one loads into a device's context
// separately, at its first use there. Neither kind of load is allowed during CUDA-graph
// capture, so:
//   * load_images(device) loads every library, enumerates every kernel in it and makes
//     each resident in that device's context (cudaFuncGetAttributes loads it);
//   * a launch of a kernel not yet resident on the current device, on a capturing
//     stream, raises a RuntimeError that says to call load_kernels() (or run one
//     forward pass of each variant) before capturing, instead of invalidating the
//     capture. Once resident, launches capture normally.
#include "runtime.h"

#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moe_ext {
namespace {

struct LoadedImage {
  std::mutex mutex;
  cudaLibrary_t library = nullptr;  // never unloaded: it lives as long as the process
  std::unordered_map<std::string, cudaKernel_t> kernels;
  std::set<std::pair<int, std::string>> resident;  // (device, kernel) loaded into that device's context
  std::set<int> all_resident;                      // devices where load_images made every kernel resident
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

std::string capture_refusal(const char* op, const std::string& what) {
  return std::string("moe_kernels._C.") + op + ": " + what +
         " is not loaded yet and the stream is capturing a CUDA graph, during which loading is not allowed: "
         "call moe_kernels.backends.cuda.load_kernels() (for each device) before capturing";
}

// Load `kernel` into the current device's context (call with loaded.mutex held).
bool is_resident(const LoadedImage& loaded, int device, const std::string& name) {
  return loaded.all_resident.count(device) != 0 || loaded.resident.count({device, name}) != 0;
}

void make_resident(const char* op, LoadedImage& loaded, int device, const std::string& name, cudaKernel_t kernel) {
  if (is_resident(loaded, device, name)) return;
  cudaFuncAttributes attr;
  check_cuda(op, ("loading kernel " + name).c_str(),
             cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)));
  loaded.resident.insert({device, name});
}

cudaKernel_t get_kernel(const char* op, Image image, const char* name, std::uintptr_t stream) {
  LoadedImage& loaded = g_loaded[static_cast<int>(image)];
  std::lock_guard<std::mutex> lock(loaded.mutex);
  int device = 0;
  check_cuda(op, "cudaGetDevice", cudaGetDevice(&device));
  if (loaded.library == nullptr || !is_resident(loaded, device, name)) {
    // Loading during capture is an unsafe call: it would fail and invalidate the
    // user's capture with an error that does not say why, so refuse it up front.
    if (capturing(stream)) {
      const std::string what = loaded.library == nullptr
                                   ? std::string("the device image '") + image_blob(image).name + "'"
                                   : std::string("kernel ") + name + " (on device " + std::to_string(device) + ")";
      throw std::runtime_error(capture_refusal(op, what));
    }
    load_locked(op, image, loaded);
  }
  cudaKernel_t kernel = nullptr;
  auto it = loaded.kernels.find(name);
  if (it != loaded.kernels.end()) {
    kernel = it->second;
  } else {
    check_cuda(op, (std::string("finding kernel ") + name).c_str(),
               cudaLibraryGetKernel(&kernel, loaded.library, name));
    loaded.kernels.emplace(name, kernel);
  }
  make_resident(op, loaded, device, name, kernel);
  return kernel;
}

// Whether the primary context of `device` is active (torch's guard asks the same before
// restoring a device): cuDevicePrimaryCtxGetState through the driver entry point, as
// this module links no driver library. Unknown counts as "not active".
bool primary_context_active(int device) {
  using GetState = int (*)(int, unsigned int*, int*);
  using DeviceGet = int (*)(int*, int);
  static GetState get_state = nullptr;
  static DeviceGet device_get = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, 12000, cudaEnableDefault, &found) ==
            cudaSuccess && found == cudaDriverEntryPointSuccess) {
      get_state = reinterpret_cast<GetState>(fn);
    }
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuDeviceGet", &fn, 12000, cudaEnableDefault, &found) == cudaSuccess &&
        found == cudaDriverEntryPointSuccess) {
      device_get = reinterpret_cast<DeviceGet>(fn);
    }
    cudaGetLastError();
  });
  if (get_state == nullptr || device_get == nullptr) return false;
  int handle = 0;
  if (device_get(&handle, device) != 0) return false;
  unsigned int flags = 0;
  int active = 0;
  return get_state(handle, &flags, &active) == 0 && active != 0;
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
  // cudaSetDevice creates the device's primary context: restoring a device the caller
  // never used (cudaGetDevice says 0 in a process that only uses cuda:N) would create
  // one on GPU 0, so restore only a device whose context is already active.
  if (changed_ && primary_context_active(previous_)) cudaSetDevice(previous_);
}

void load_images(const char* op) {
  int device = 0;
  check_cuda(op, "cudaGetDevice", cudaGetDevice(&device));
  for (int i = 0; i < kNumImages; ++i) {
    LoadedImage& loaded = g_loaded[i];
    std::lock_guard<std::mutex> lock(loaded.mutex);
    load_locked(op, static_cast<Image>(i), loaded);
    unsigned int count = 0;
    check_cuda(op, "cudaLibraryGetKernelCount", cudaLibraryGetKernelCount(&count, loaded.library));
    std::vector<cudaKernel_t> kernels(count);
    if (count > 0) {
      check_cuda(op, "cudaLibraryEnumerateKernels", cudaLibraryEnumerateKernels(kernels.data(), count, loaded.library));
    }
    for (cudaKernel_t kernel : kernels) {  // cudaFuncGetAttributes loads it into this device's context
      cudaFuncAttributes attr;
      check_cuda(op, "loading every kernel", cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)));
    }
    loaded.all_resident.insert(device);
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
