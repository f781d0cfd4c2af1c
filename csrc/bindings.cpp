// Python module moe_kernels._C: the ops of ops.h plus what the build holds.
//
// Written against CPython's limited API (Py_LIMITED_API = 3.10, set by setup.py), so
// one build, moe_kernels/_C.abi3.so, imports on every CPython >= 3.10: one wheel per
// CUDA version serves every Python and every torch. No torch headers: arguments are
// integers (device addresses, sizes, dtype codes, the stream handle). Launches release
// the GIL; errors come back as ValueError (bad arguments, std::invalid_argument) or
// RuntimeError (CUDA, std::runtime_error), both naming the op.
#ifndef Py_LIMITED_API
#error "build with -DPy_LIMITED_API=0x030A0000 (setup.py does): the module is an abi3 module"
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <exception>
#include <new>
#include <stdexcept>
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

namespace {

using moe_ext::ptr_t;
using i64 = long long;  // what PyArg's "L" writes

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

// "O&" converter for device addresses and stream handles: any object with __index__,
// in [0, 2**64); a negative value or a float is an error (as pybind11's uintptr_t was).
int to_ptr(PyObject* obj, void* out) {
  PyObject* index = PyNumber_Index(obj);
  if (index == nullptr) return 0;
  const unsigned long long value = PyLong_AsUnsignedLongLong(index);
  Py_DECREF(index);
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return 0;
  *static_cast<ptr_t*>(out) = static_cast<ptr_t>(value);
  return 1;
}

// Runs `body` (a C++ call that may throw) with the GIL released when `nogil`, and turns
// its exception into the Python one. Returns false with the Python error set.
template <class F>
bool call_cpp(F&& body, bool nogil) {
  std::string message;
  PyObject* type = nullptr;
  PyThreadState* saved = nogil ? PyEval_SaveThread() : nullptr;
  try {
    body();
  } catch (const std::invalid_argument& e) {
    type = PyExc_ValueError;
    message = e.what();
  } catch (const std::bad_alloc&) {
    type = PyExc_MemoryError;
    message = "moe_kernels._C: out of host memory";
  } catch (const std::exception& e) {
    type = PyExc_RuntimeError;
    message = e.what();
  } catch (...) {
    type = PyExc_RuntimeError;
    message = "moe_kernels._C: unknown C++ exception";
  }
  if (saved != nullptr) PyEval_RestoreThread(saved);
  if (type != nullptr) {
    PyErr_SetString(type, message.c_str());
    return false;
  }
  return true;
}

// ---- the ops -----------------------------------------------------------------------

PyObject* route_softmax_topk(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"logits", "ids", "weights", "counts", "num_tokens", "num_experts", "top_k",
                             "renormalize", "dtype", "device", "stream", nullptr};
  ptr_t logits, ids, weights, counts, stream;
  i64 num_tokens, num_experts, top_k;
  int renormalize, dtype, device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&LLLpiiO&:route_softmax_topk", const_cast<char**>(kw),
                                   to_ptr, &logits, to_ptr, &ids, to_ptr, &weights, to_ptr, &counts, &num_tokens,
                                   &num_experts, &top_k, &renormalize, &dtype, &device, to_ptr, &stream))
    return nullptr;
  if (!call_cpp([&] {
        moe_ext::route_softmax_topk(logits, ids, weights, counts, num_tokens, num_experts, top_k, renormalize != 0,
                                    dtype, device, stream);
      }, true))
    return nullptr;
  Py_RETURN_NONE;
}

PyObject* route_grouped_sigmoid_topk(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"logits", "bias", "ids", "weights", "counts", "num_tokens", "num_experts", "top_k",
                             "n_group", "topk_group", "routed_scaling_factor", "renormalize", "dtype", "device",
                             "stream", nullptr};
  ptr_t logits, bias, ids, weights, counts, stream;
  i64 num_tokens, num_experts, top_k, n_group, topk_group;
  double scale;
  int renormalize, dtype, device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&O&LLLLLdpiiO&:route_grouped_sigmoid_topk",
                                   const_cast<char**>(kw), to_ptr, &logits, to_ptr, &bias, to_ptr, &ids, to_ptr,
                                   &weights, to_ptr, &counts, &num_tokens, &num_experts, &top_k, &n_group,
                                   &topk_group, &scale, &renormalize, &dtype, &device, to_ptr, &stream))
    return nullptr;
  if (!call_cpp([&] {
        moe_ext::route_grouped_sigmoid_topk(logits, bias, ids, weights, counts, num_tokens, num_experts, top_k,
                                            n_group, topk_group, scale, renormalize != 0, dtype, device, stream);
      }, true))
    return nullptr;
  Py_RETURN_NONE;
}

PyObject* build_plan(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"slot_expert", "slot_token", "expert_counts", "expert_offsets", "sorted_slot",
                             "slot_position", "padded_offsets", "padded_slot", "block_expert", "token_slots",
                             "token_fill", "scratch", "scratch_words", "num_slots", "num_experts", "num_tokens",
                             "max_slots_per_token", "top_k", "block_m", "num_padded_rows", "device", "stream",
                             nullptr};
  ptr_t p[12], stream;
  i64 scratch_words, num_slots, num_experts, num_tokens, max_slots_per_token, top_k, block_m, num_padded_rows;
  int device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&O&O&O&O&O&O&O&O&LLLLLLLLiO&:build_plan",
                                   const_cast<char**>(kw), to_ptr, &p[0], to_ptr, &p[1], to_ptr, &p[2], to_ptr,
                                   &p[3], to_ptr, &p[4], to_ptr, &p[5], to_ptr, &p[6], to_ptr, &p[7], to_ptr, &p[8],
                                   to_ptr, &p[9], to_ptr, &p[10], to_ptr, &p[11], &scratch_words, &num_slots,
                                   &num_experts, &num_tokens, &max_slots_per_token, &top_k, &block_m,
                                   &num_padded_rows, &device, to_ptr, &stream))
    return nullptr;
  if (!call_cpp([&] {
        moe_ext::build_plan(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11],
                            scratch_words, num_slots, num_experts, num_tokens, max_slots_per_token, top_k, block_m,
                            num_padded_rows, device, stream);
      }, true))
    return nullptr;
  Py_RETURN_NONE;
}

PyObject* plan_scratch_words(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"num_slots", "num_experts", nullptr};
  i64 num_slots, num_experts;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LL:plan_scratch_words", const_cast<char**>(kw), &num_slots,
                                   &num_experts))
    return nullptr;
  std::int64_t words = 0;
  if (!call_cpp([&] { words = moe_ext::plan_scratch_words(num_slots, num_experts); }, false)) return nullptr;
  return PyLong_FromLongLong(words);
}

PyObject* permute_rows(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"x", "slot_token", "row_slot", "out", "num_rows", "hidden", "elem_size", "num_slots",
                             "x_rows", "bad", "device", "stream", nullptr};
  ptr_t x, slot_token, row_slot, out, bad, stream;
  i64 num_rows, hidden, num_slots, x_rows;
  int elem_size, device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&LLiLLO&iO&:permute_rows", const_cast<char**>(kw), to_ptr,
                                   &x, to_ptr, &slot_token, to_ptr, &row_slot, to_ptr, &out, &num_rows, &hidden,
                                   &elem_size, &num_slots, &x_rows, to_ptr, &bad, &device, to_ptr, &stream))
    return nullptr;
  if (!call_cpp([&] {
        moe_ext::permute_rows(x, slot_token, row_slot, out, num_rows, hidden, elem_size, num_slots, x_rows, bad,
                              device, stream);
      }, true))
    return nullptr;
  Py_RETURN_NONE;
}

PyObject* unpermute_rows(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"y", "slot_row", "token_slots", "weights", "out", "num_tokens", "max_slots", "hidden",
                             "dtype", "num_slots", "y_rows", "bad", "device", "stream", nullptr};
  ptr_t y, slot_row, token_slots, weights, out, bad, stream;
  i64 num_tokens, max_slots, hidden, num_slots, y_rows;
  int dtype, device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&O&O&O&LLLiLLO&iO&:unpermute_rows", const_cast<char**>(kw),
                                   to_ptr, &y, to_ptr, &slot_row, to_ptr, &token_slots, to_ptr, &weights, to_ptr,
                                   &out, &num_tokens, &max_slots, &hidden, &dtype, &num_slots, &y_rows, to_ptr, &bad,
                                   &device, to_ptr, &stream))
    return nullptr;
  if (!call_cpp([&] {
        moe_ext::unpermute_rows(y, slot_row, token_slots, weights, out, num_tokens, max_slots, hidden, dtype,
                                num_slots, y_rows, bad, device, stream);
      }, true))
    return nullptr;
  Py_RETURN_NONE;
}

PyObject* max_padded_rows(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"num_slots", "num_experts", "block_m", nullptr};
  i64 num_slots, num_experts, block_m;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLL:max_padded_rows", const_cast<char**>(kw), &num_slots,
                                   &num_experts, &block_m))
    return nullptr;
  std::int64_t rows = 0;
  if (!call_cpp([&] { rows = moe_ext::max_padded_rows(num_slots, num_experts, block_m); }, false)) return nullptr;
  return PyLong_FromLongLong(rows);
}

// ---- what the build holds ----------------------------------------------------------

// Sets d[key] = value and drops the reference to value; false (error set) on failure.
bool set_item(PyObject* d, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(d, key, value);
  Py_DECREF(value);
  return rc == 0;
}

PyObject* string_list(const std::string& s) {
  const std::vector<std::string> items = split(s);
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(items.size()));
  if (list == nullptr) return nullptr;
  for (std::size_t i = 0; i < items.size(); ++i) {
    PyObject* item = PyUnicode_FromString(items[i].c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SetItem(list, static_cast<Py_ssize_t>(i), item);  // steals item
  }
  return list;
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  const std::string cuda =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  PyObject* images = PyDict_New();
  bool ok = images != nullptr;
  for (int i = 0; ok && i < moe_ext::kNumImages; ++i) {
    const moe_ext::ImageBlob& blob = moe_ext::image_blob(static_cast<moe_ext::Image>(i));
    ok = set_item(images, blob.name, PyLong_FromSize_t(blob.size));
  }
  ok = ok && set_item(info, "cuda_version", PyUnicode_FromString(cuda.c_str())) &&
       set_item(info, "archs", string_list(MOE_KERNELS_ARCHS)) && set_item(info, "ptx", string_list(MOE_KERNELS_PTX)) &&
       set_item(info, "device_compiler", PyUnicode_FromString(MOE_KERNELS_DEVICE_COMPILER)) &&
       set_item(info, "cuda_runtime", PyUnicode_FromString("static")) &&
       set_item(info, "python_abi", PyUnicode_FromString("abi3 (CPython >= 3.10)"));
  if (ok) {
    ok = PyDict_SetItemString(info, "images", images) == 0;
  }
  Py_XDECREF(images);
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyObject* ptxas_log(PyObject*, PyObject*) {
  std::string out;
  for (int i = 0; i < moe_ext::kNumImages; ++i) out += moe_ext::image_blob(static_cast<moe_ext::Image>(i)).ptxas_log;
  return PyUnicode_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

// 0 when no driver is installed: never raises, so `moe-kernels info` can show it.
PyObject* driver_version(PyObject*, PyObject*) {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  cudaGetLastError();
  return PyLong_FromLong(v);
}

PyObject* load_images(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"device", nullptr};
  int device;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i:load_images", const_cast<char**>(kw), &device)) return nullptr;
  if (!call_cpp([&] {
        moe_ext::DeviceGuard guard("load_images", device);
        moe_ext::load_images("load_images");
      }, true))
    return nullptr;
  Py_RETURN_NONE;
}

PyObject* images_loaded(PyObject*, PyObject*) {
  bool loaded = false;
  if (!call_cpp([&] { loaded = moe_ext::images_loaded(); }, false)) return nullptr;
  return PyBool_FromLong(loaded ? 1 : 0);
}

#define MOE_KW(name) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(name)), METH_VARARGS | METH_KEYWORDS

PyMethodDef methods[] = {
    {"route_softmax_topk", MOE_KW(route_softmax_topk),
     "route_softmax_topk(logits, ids, weights, counts, num_tokens, num_experts, top_k, renormalize, dtype, device, "
     "stream)\n\nSoftmax top-k routing: logits [T, E] -> ids int32 [T, k], weights fp32 [T, k], counts int32 [E]."},
    {"route_grouped_sigmoid_topk", MOE_KW(route_grouped_sigmoid_topk),
     "route_grouped_sigmoid_topk(logits, bias, ids, weights, counts, num_tokens, num_experts, top_k, n_group, "
     "topk_group, routed_scaling_factor, renormalize, dtype, device, stream)\n\n"
     "DeepSeek-V3 routing: sigmoid, selection bias (fp32 [E] or 0), grouped top-k."},
    {"build_plan", MOE_KW(build_plan),
     "build_plan(slot_expert, slot_token, expert_counts, expert_offsets, sorted_slot, slot_position, "
     "padded_offsets, padded_slot, block_expert, token_slots, token_fill, scratch, scratch_words, num_slots, "
     "num_experts, num_tokens, max_slots_per_token, top_k, block_m, num_padded_rows, device, stream)\n\n"
     "The DispatchPlan index tensors (top_k 0: not token-major); one CTA at decode sizes, many past them."},
    {"plan_scratch_words", MOE_KW(plan_scratch_words),
     "plan_scratch_words(num_slots, num_experts)\n\nint32 words of scratch build_plan needs for these sizes."},
    {"permute_rows", MOE_KW(permute_rows),
     "permute_rows(x, slot_token, row_slot, out, num_rows, hidden, elem_size, num_slots, x_rows, bad, device, "
     "stream)\n\nout[r] = x[slot_token[row_slot[r]]], zero where row_slot[r] < 0 (or out of range: then *bad = 1)."},
    {"unpermute_rows", MOE_KW(unpermute_rows),
     "unpermute_rows(y, slot_row, token_slots, weights, out, num_tokens, max_slots, hidden, dtype, num_slots, "
     "y_rows, bad, device, stream)\n\nout[t] = sum_j w[s] * y[slot_row[s]] over s = token_slots[t, j] >= 0, fp32 "
     "accumulation, fixed order; out-of-range cells are skipped and set *bad = 1."},
    {"max_padded_rows", MOE_KW(max_padded_rows), "max_padded_rows(num_slots, num_experts, block_m)"},
    {"build_info", build_info, METH_NOARGS,
     "CUDA version, real archs, PTX archs, device compiler and Python ABI of this build."},
    {"ptxas_log", ptxas_log, METH_NOARGS, "The ptxas -v output of the build (registers, spills per kernel and arch)."},
    {"load_images", MOE_KW(load_images),
     "load_images(device)\n\nLoad every device image now (not allowed during CUDA-graph capture; launches load "
     "lazily otherwise)."},
    {"images_loaded", images_loaded, METH_NOARGS, "Whether every device image is loaded."},
    {"driver_version", driver_version, METH_NOARGS, "The CUDA driver's version (e.g. 13000), 0 without a driver."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "moe_kernels._C",
    "moe_kernels CUDA kernels (raw-pointer ABI, static CUDA runtime, CPython limited API; see csrc/runtime.h)",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "ROUTE_MAX_EXPERTS", moe_ext::kRouteMaxExperts) != 0 ||
      PyModule_AddIntConstant(m, "ROUTE_MAX_TOP_K", moe_ext::kRouteMaxTopK) != 0 ||
      PyModule_AddIntConstant(m, "PLAN_MAX_EXPERTS", moe_ext::kPlanMaxExperts) != 0 ||
      PyModule_AddIntConstant(m, "PLAN_SINGLE_MAX_SLOTS", moe_plan::kPlanSingleMaxSlots) != 0 ||
      PyModule_AddIntConstant(m, "PLAN_CHUNK", moe_plan::kPlanChunk) != 0 ||
      PyModule_AddIntConstant(m, "PLAN_SCAN_ROWS", moe_plan::kPlanScanRows) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
