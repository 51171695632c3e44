// Python bindings of the CPU kernels (one extension per ISA; models/kernels/build.py).

#include <torch/extension.h>

namespace vlmcap {
torch::Tensor widening_linear(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias, int64_t N);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths, double scale);
}  // namespace vlmcap

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("widening_linear", &vlmcap::widening_linear,
          "fp32 x @ W^T + b with W packed in 16-column panels of fp32/bf16/fp16 (widened in registers)");
    m.def("decode_attention", &vlmcap::decode_attention,
          "one query token per row against its KV-cache prefix (fp32 or bf16)");
}
