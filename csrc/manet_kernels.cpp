// The schemas of the private pass ops (manet_kernels::_<op>_<pass>, one fused pass each)
// and the Python module init. Kernels register their implementations per device in
// csrc/cpu and csrc/cuda. The public composite ops (manet_kernels::mixed_attention,
// brnpa, aw_conv2d, per_sample_conv2d and their _backward) are declared in Python by
// manet_kernels/ops/_boundary.py, which infers their schemas and registers their fakes
// and autograd; the host-only _cuda_launch_plan is declared in cpu/cuda_launch_plan.cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import manet_kernels._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(manet_kernels, m) {
  // Mixed attention (docs/design.md §1). x, g: (N,C,H,W), NCHW- or NHWC-contiguous.
  // Small tensors are contiguous in the accumulation dtype (float64 for double x,
  // float32 otherwise); index tensors are int32.
  m.def("_mixed_attention_channel_pool(Tensor x) -> (Tensor avg, Tensor mx, Tensor im)");
  m.def(
      "_mixed_attention_spatial_pool(Tensor x, Tensor mc) -> (Tensor sa, Tensor sm, "
      "Tensor ic)");
  m.def("_mixed_attention_apply(Tensor x, Tensor mc, Tensor ms) -> Tensor");
  m.def(
      "_mixed_attention_bwd_reduce(Tensor g, Tensor x, Tensor mc, Tensor ms) -> (Tensor dms, "
      "Tensor dmc)");
  m.def("_mixed_attention_bwd_channel(Tensor x, Tensor da_s, Tensor dm_s, Tensor ic) -> Tensor");
  m.def(
      "_mixed_attention_bwd_dx(Tensor g, Tensor mc, Tensor ms, Tensor da_s, Tensor dm_s, "
      "Tensor ic, Tensor d_avg, Tensor d_mx, Tensor im) -> Tensor");
  // The k x k conv (padding k//2) on the [mean, max] map, between F2 and F3, with CPU
  // and CUDA kernels. sa, sm, dz: (N, H, W) in the acc dtype.
  m.def(
      "_mixed_attention_spatial_conv(Tensor sa, Tensor sm, Tensor weight, Tensor? bias) -> "
      "Tensor");
  m.def(
      "_mixed_attention_spatial_conv_bwd(Tensor dz, Tensor sa, Tensor sm, Tensor weight, "
      "bool has_bias) -> (Tensor dsa, Tensor dsm, Tensor dweight, Tensor dbias)");

  // BR-NPA (docs/design.md §3); definitions in manet_kernels/reference/passes.py.
  m.def("_brnpa_norms(Tensor x) -> Tensor");
  m.def("_brnpa_step(Tensor x, Tensor inv_nrm, Tensor idx) -> (Tensor s, Tensor sv)");
  m.def(
      "_brnpa_bwd_reduce(Tensor x, Tensor inv_nrm, Tensor dv, Tensor dmap) -> (Tensor dw, "
      "Tensor u, Tensor t)");
  m.def("_brnpa_bwd_dx(Tensor x, Tensor a, Tensor m, Tensor c) -> Tensor");

  // AW-convolution (docs/design.md §2); definitions in manet_kernels/reference/passes.py.
  m.def(
      "_per_sample_conv2d_fwd(Tensor x, Tensor weights, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "_per_sample_conv2d_bwd(Tensor g, Tensor x, Tensor weights, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor dx, Tensor dweights)");
  m.def(
      "_aw_conv2d_fwd(Tensor x, Tensor weight, Tensor scale, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "_aw_conv2d_bwd(Tensor g, Tensor x, Tensor weight, Tensor scale, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor dx, Tensor dweight, "
      "Tensor dscale)");
}
