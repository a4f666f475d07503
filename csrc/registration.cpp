// Operator registration for the fastvl CUDA extension, and the `fastvl._C` Python module.
//
// Importing fastvl._C runs the static registrars below: the schemas go into the `fastvl`
// namespace (TORCH_LIBRARY) and the CUDA kernels are attached to the CUDA dispatch key.
// Fake (meta) impls and autograd are registered from Python with torch.library, so none
// are registered here. Python code adding more ops to the `fastvl` namespace must use
// fragments (torch.library.custom_op / triton_op / Library("fastvl", "FRAGMENT")): this
// file owns the namespace's single TORCH_LIBRARY block.

#include <Python.h>

#include <torch/library.h>

#include "gather_tokens.h"
#include "unshuffle_with_mask_token.h"

TORCH_LIBRARY(fastvl, m) {
  m.def("gather_tokens_cuda(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_add_tokens_cuda(Tensor grad, Tensor index, int num_tokens) -> Tensor");
  m.def(
      "unshuffle_with_mask_token_fwd_cuda(Tensor x, Tensor ids_restore, Tensor mask_token, "
      "Tensor? pos_embed, int num_prefix_tokens) -> Tensor");
  m.def(
      "unshuffle_with_mask_token_bwd_cuda(Tensor grad_out, Tensor ids_restore, "
      "int num_prefix_tokens, int num_visible, bool compute_dpos, int batch_chunks) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvl, CUDA, m) {
  m.impl("gather_tokens_cuda", &fastvl::gather_tokens_cuda);
  m.impl("scatter_add_tokens_cuda", &fastvl::scatter_add_tokens_cuda);
  m.impl("unshuffle_with_mask_token_fwd_cuda", &fastvl::unshuffle_with_mask_token_fwd_cuda);
  m.impl("unshuffle_with_mask_token_bwd_cuda", &fastvl::unshuffle_with_mask_token_bwd_cuda);
}

// Build facts passed in by setup.py as comma-separated character codes (e.g. 56,46,48 for
// "8.0"): a string literal would need quoting that survives both the shell that ninja
// runs commands in and the list-based subprocess of the non-ninja build.
namespace {
#ifdef FASTVL_CUDA_ARCHS_CHARS
const char kCudaArchs[] = {FASTVL_CUDA_ARCHS_CHARS, '\0'};
#else
const char kCudaArchs[] = "unknown";
#endif
#ifdef FASTVL_CUDA_VERSION_CHARS
const char kCudaVersion[] = {FASTVL_CUDA_VERSION_CHARS, '\0'};
#else
const char kCudaVersion[] = "unknown";
#endif

PyModuleDef fastvl_c_module = {
    PyModuleDef_HEAD_INIT,
    "fastvl._C",
    "fastvl CUDA kernels. Importing this module registers the torch.ops.fastvl.*_cuda "
    "operators; cuda_archs is the TORCH_CUDA_ARCH_LIST it was compiled for and "
    "cuda_version the nvcc version that compiled it.",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastvl_c_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "cuda_archs", kCudaArchs) < 0 ||
      PyModule_AddStringConstant(module, "cuda_version", kCudaVersion) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
