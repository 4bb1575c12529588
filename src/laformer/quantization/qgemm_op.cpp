// The C kernel (qgemm.c) as the CPU implementation of the PyTorch operator laformer::qgemm.
//
// Registered in C++ so that a call costs a dispatcher hop (~4 us) instead of the Python custom op plus ctypes
// (~20 us): a SmolLM2 decode step makes 121 of them. The schema and the shape function ("fake") are defined in
// kernels.py; this file only supplies the kernel. Includes are kept to the few headers needed, so the build takes
// seconds rather than the minute that <torch/extension.h> costs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" {
#include "qgemm.c"
}

namespace {

at::Tensor qgemm(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales,
                 const std::optional<at::Tensor> &mins, int64_t bits, int64_t group_size) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "qgemm: x must be (M, K) float32");
    TORCH_CHECK(bits == 4 || bits == 8, "qgemm: bits must be 4 or 8");
    TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kHalf,
                "qgemm: qweight and float16 scales must be contiguous");
    TORCH_CHECK(!mins.has_value() || (mins->is_contiguous() && mins->scalar_type() == at::kHalf),
                "qgemm: mins must be contiguous float16");
    const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const half *min_ptr = mins.has_value() ? static_cast<const half *>(mins->const_data_ptr()) : nullptr;
    const Qgemm call = {x.const_data_ptr<float>(), qweight.const_data_ptr(),
                        static_cast<const half *>(scales.const_data_ptr()), min_ptr, y.mutable_data_ptr<float>(),
                        bits, M, N, K, group_size, at::get_num_threads(), /*int8_activations=*/0};
    const int status = laformer_qgemm(&call);
    TORCH_CHECK(status == 0, "qgemm: out of memory for the quantized activations");
    return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(laformer, CPU, m) { m.impl("qgemm", &qgemm); }
