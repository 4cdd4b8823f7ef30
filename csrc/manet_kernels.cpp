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

  // The fused stages (issue 16; definitions in manet_kernels/reference/stages.py): a pass
  // with the tiny work after it, one op each. Absent parameters' gradients are empty.
  m.def(
      "_mixed_attention_channel_attn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
      "-> (Tensor mc, Tensor avg, Tensor mx, Tensor im)");
  m.def(
      "_mixed_attention_spatial_attn(Tensor x, Tensor mc, Tensor conv_w, Tensor? conv_b, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, Tensor? bn_var, float eps, "
      "bool batch_norm) -> (Tensor ms, Tensor z, Tensor sa, Tensor sm, Tensor ic)");
  m.def(
      "_mixed_attention_spatial_norm(Tensor z, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "float? momentum, float eps) -> (Tensor ms, Tensor stats)");
  m.def(
      "_mixed_attention_spatial_norm_bwd(Tensor dms, Tensor? gms, Tensor ms, Tensor z, "
      "Tensor stats, Tensor? bn_weight, bool has_bias, float eps) -> (Tensor dz, "
      "Tensor dbn_weight, Tensor dbn_bias)");
  m.def(
      "_mixed_attention_spatial_attn_bwd(Tensor d, Tensor? gms, Tensor? ms, Tensor z, "
      "Tensor sa, Tensor sm, Tensor conv_w, bool has_conv_bias, Tensor? bn_weight, "
      "bool has_bn_bias, Tensor? bn_mean, Tensor? bn_var, float eps) -> (Tensor da_s, "
      "Tensor dm_s, Tensor dconv_w, Tensor dconv_b, Tensor dbn_weight, Tensor dbn_bias)");
  m.def(
      "_mixed_attention_channel_attn_bwd(Tensor x, Tensor da_s, Tensor dm_s, Tensor ic, "
      "Tensor dmc, Tensor? gmc, Tensor mc, Tensor avg, Tensor mx, Tensor w1, Tensor? b1, "
      "Tensor w2, bool has_b2) -> (Tensor d_avg, Tensor d_mx, Tensor dw1, Tensor db1, "
      "Tensor dw2, Tensor db2)");

  // BR-NPA (docs/design.md §3); definitions in manet_kernels/reference/passes.py.
  m.def("_brnpa_norms(Tensor x) -> Tensor");
  m.def("_brnpa_step(Tensor x, Tensor inv_nrm, Tensor idx) -> (Tensor s, Tensor sv)");
  m.def(
      "_brnpa_bwd_reduce(Tensor x, Tensor inv_nrm, Tensor dv, Tensor dmap) -> (Tensor dw, "
      "Tensor u, Tensor t)");
  m.def("_brnpa_bwd_dx(Tensor x, Tensor a, Tensor m, Tensor c) -> Tensor");

  // BR-NPA stages (issue 16; manet_kernels/reference/stages.py).
  m.def(
      "_brnpa_prepare(Tensor x, bool paper, float eps) -> (Tensor nrm, Tensor inv, Tensor score)");
  m.def(
      "_brnpa_part(Tensor x, Tensor inv, Tensor(a!) score, int j, bool paper, Tensor(b!) idx, "
      "Tensor(c!) s, Tensor(d!) total, Tensor(e!) vectors, Tensor(f!) maps) -> ()");
  m.def(
      "_brnpa_bwd_finish(Tensor x, Tensor dw, Tensor u, Tensor t, Tensor inv, Tensor nrm, "
      "Tensor idx, Tensor s, Tensor total, Tensor? gv) -> (Tensor a, Tensor m, Tensor c)");

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
  // aw_conv2d_fwd / _bwd with the second-generation forward and weight-gradient kernels
  // where they apply (CUDA only; behind CUDA_AW_V2_VERIFIED in manet_kernels/ops/aw_conv2d.py).
  m.def(
      "_aw_conv2d_fwd_v2(Tensor x, Tensor weight, Tensor scale, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "_aw_conv2d_bwd_v2(Tensor g, Tensor x, Tensor weight, Tensor scale, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor dx, Tensor dweight, "
      "Tensor dscale)");
}
