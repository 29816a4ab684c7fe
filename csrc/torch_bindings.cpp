// torch.library bindings of the csrc/ kernels: torch.ops.qlora.nf4_dequantize and
// torch.ops.qlora.nf4_gemv_lora (CUDA implementations; fake/meta implementations are registered in
// qlora/ops/cuda_ext.py). This file validates tensors and passes raw pointers to the launchers in
// qlora_kernels.h; all arithmetic lives in the .cu files.
//
// The NF4 weight travels as its NF4Tensor fields (qlora/quant/nf4.py). Double quantization is recognised
// by absmax's dtype: uint8 needs nested_absmax, nested_quant_map and offset; float32 needs none.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "qlora_kernels.h"

namespace qlora {
namespace {

void check_cuda_contiguous(const at::Tensor& t, const char* name, const at::Device& device) {
    TORCH_CHECK(t.is_cuda(), "qlora: ", name, " must be a CUDA tensor, got device ", t.device());
    TORCH_CHECK(t.device() == device, "qlora: ", name, " is on ", t.device(), " but packed is on ",
                device);
    TORCH_CHECK(t.is_contiguous(), "qlora: ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.scalar_type() == dtype, "qlora: ", name, " must be ", dtype, ", got ",
                t.scalar_type());
}

ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
    if (t.scalar_type() == at::kBFloat16) {
        return ScalarKind::kBFloat16;
    }
    TORCH_CHECK(t.scalar_type() == at::kHalf, "qlora: ", name,
                " must be bfloat16 or float16, got ", t.scalar_type());
    return ScalarKind::kFloat16;
}

// The absmax fields of an NF4Tensor as the kernels' AbsmaxView, after checking them against the
// number of blocks the weight needs.
AbsmaxView absmax_view(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_quant_map,
                       const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                       int64_t numel, int64_t blocksize, const at::Device& device) {
    TORCH_CHECK(blocksize > 0 && blocksize % 32 == 0,
                "qlora: blocksize must be a positive multiple of 32, got ", blocksize);
    check_cuda_contiguous(absmax, "absmax", device);
    const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
    TORCH_CHECK(absmax.numel() >= n_blocks, "qlora: absmax has ", absmax.numel(),
                " entries but the weight has ", n_blocks, " blocks of ", blocksize);
    AbsmaxView view{};
    if (absmax.scalar_type() == at::kFloat) {
        view.absmax_f32 = absmax.data_ptr<float>();
        return view;
    }
    TORCH_CHECK(absmax.scalar_type() == at::kByte,
                "qlora: absmax must be uint8 (double-quantized) or float32, got ",
                absmax.scalar_type());
    TORCH_CHECK(nested_absmax && nested_quant_map && offset,
                "qlora: uint8 absmax needs nested_absmax, nested_quant_map and offset");
    TORCH_CHECK(nested_blocksize > 0, "qlora: nested_blocksize must be positive, got ",
                nested_blocksize);
    check_cuda_contiguous(*nested_absmax, "nested_absmax", device);
    check_cuda_contiguous(*nested_quant_map, "nested_quant_map", device);
    check_cuda_contiguous(*offset, "offset", device);
    check_dtype(*nested_absmax, "nested_absmax", at::kFloat);
    check_dtype(*nested_quant_map, "nested_quant_map", at::kFloat);
    check_dtype(*offset, "offset", at::kFloat);
    TORCH_CHECK(nested_quant_map->numel() == 256, "qlora: nested_quant_map must have 256 entries, got ",
                nested_quant_map->numel());
    TORCH_CHECK(offset->numel() == 1, "qlora: offset must have one element, got ", offset->numel());
    const int64_t n_nested = (n_blocks + nested_blocksize - 1) / nested_blocksize;
    TORCH_CHECK(nested_absmax->numel() >= n_nested, "qlora: nested_absmax has ",
                nested_absmax->numel(), " entries but ", n_blocks, " blocks need ", n_nested);
    view.absmax_u8 = absmax.data_ptr<uint8_t>();
    view.nested_absmax = nested_absmax->data_ptr<float>();
    view.nested_quant_map = nested_quant_map->data_ptr<float>();
    view.offset = offset->data_ptr<float>();
    view.nested_blocksize = nested_blocksize;
    return view;
}

void check_quant_map(const at::Tensor& quant_map, const at::Device& device) {
    check_cuda_contiguous(quant_map, "quant_map", device);
    check_dtype(quant_map, "quant_map", at::kFloat);
    TORCH_CHECK(quant_map.numel() == 16, "qlora: quant_map must have 16 entries, got ",
                quant_map.numel());
}

void check_launch(cudaError_t err, const char* op) {
    TORCH_CHECK(err == cudaSuccess, "qlora: ", op, " launch failed: ", cudaGetErrorString(err));
}

void nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_quant_map,
                         const std::optional<at::Tensor>& offset, const at::Tensor& quant_map,
                         int64_t blocksize, int64_t nested_blocksize, at::Tensor& out) {
    const at::Device device = packed.device();
    check_cuda_contiguous(packed, "packed", device);
    check_dtype(packed, "packed", at::kByte);
    check_cuda_contiguous(out, "out", device);
    const ScalarKind kind = scalar_kind(out, "out");
    const int64_t numel = out.numel();
    TORCH_CHECK(packed.numel() >= (numel + 1) / 2, "qlora: packed has ", packed.numel(),
                " bytes but out has ", numel, " elements (needs ", (numel + 1) / 2, ")");
    check_quant_map(quant_map, device);
    const AbsmaxView view = absmax_view(absmax, nested_absmax, nested_quant_map, offset,
                                        nested_blocksize, numel, blocksize, device);
    const c10::cuda::CUDAGuard guard(device);
    check_launch(nf4_dequantize_launch(packed.data_ptr<uint8_t>(), view,
                                       quant_map.data_ptr<float>(), blocksize, numel, kind,
                                       out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "nf4_dequantize");
}

at::Tensor nf4_gemv_lora_cuda(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_quant_map,
                              const std::optional<at::Tensor>& offset, const at::Tensor& quant_map,
                              int64_t blocksize, int64_t nested_blocksize, int64_t N,
                              const std::optional<at::Tensor>& lora_A,
                              const std::optional<at::Tensor>& lora_B, double scaling) {
    const at::Device device = packed.device();
    check_cuda_contiguous(packed, "packed", device);
    check_dtype(packed, "packed", at::kByte);
    check_cuda_contiguous(x, "x", device);
    const ScalarKind kind = scalar_kind(x, "x");
    TORCH_CHECK(x.dim() == 2, "qlora: x must be 2-D [M, K], got shape ", x.sizes());
    const int64_t M = x.size(0);
    const int64_t K = x.size(1);
    TORCH_CHECK(M >= 1 && M <= 8, "qlora: nf4_gemv_lora handles 1 <= M <= 8 rows, got M = ", M);
    TORCH_CHECK(K >= 32 && K % 32 == 0, "qlora: nf4_gemv_lora needs K % 32 == 0, got K = ", K);
    TORCH_CHECK(N >= 1, "qlora: N must be positive, got ", N);
    TORCH_CHECK(packed.numel() == N * K / 2, "qlora: packed has ", packed.numel(),
                " bytes but an [", N, ", ", K, "] weight needs ", N * K / 2);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                "qlora: packed and x must be 16-byte aligned for 128-bit loads");
    TORCH_CHECK(blocksize > 0 && (blocksize & (blocksize - 1)) == 0,
                "qlora: nf4_gemv_lora needs a power-of-two blocksize, got ", blocksize);
    TORCH_CHECK(absmax.scalar_type() != at::kByte ||
                    (nested_blocksize > 0 && (nested_blocksize & (nested_blocksize - 1)) == 0),
                "qlora: nf4_gemv_lora needs a power-of-two nested_blocksize, got ", nested_blocksize);
    check_quant_map(quant_map, device);
    const AbsmaxView view = absmax_view(absmax, nested_absmax, nested_quant_map, offset,
                                        nested_blocksize, N * K, blocksize, device);
    TORCH_CHECK(lora_A.has_value() == lora_B.has_value(),
                "qlora: pass both lora_A and lora_B or neither");
    int64_t r = 0;
    if (lora_A) {
        check_cuda_contiguous(*lora_A, "lora_A", device);
        check_cuda_contiguous(*lora_B, "lora_B", device);
        check_dtype(*lora_A, "lora_A", x.scalar_type());
        check_dtype(*lora_B, "lora_B", x.scalar_type());
        TORCH_CHECK(lora_A->dim() == 2 && lora_A->size(1) == K, "qlora: lora_A must be [r, ", K,
                    "], got ", lora_A->sizes());
        r = lora_A->size(0);
        TORCH_CHECK(lora_B->dim() == 2 && lora_B->size(0) == N && lora_B->size(1) == r,
                    "qlora: lora_B must be [", N, ", ", r, "], got ", lora_B->sizes());
        TORCH_CHECK(reinterpret_cast<uintptr_t>(lora_A->data_ptr()) % 16 == 0,
                    "qlora: lora_A must be 16-byte aligned for 128-bit loads");
    }
    const c10::cuda::CUDAGuard guard(device);
    at::Tensor y = at::empty({M, N}, x.options());
    at::Tensor t = at::empty({M, r}, x.options().dtype(at::kFloat));
    check_launch(nf4_gemv_lora_launch(x.data_ptr(), packed.data_ptr<uint8_t>(), view,
                                      quant_map.data_ptr<float>(), blocksize, M, N, K,
                                      lora_A ? lora_A->data_ptr() : nullptr,
                                      lora_B ? lora_B->data_ptr() : nullptr, r,
                                      static_cast<float>(scaling), t.data_ptr<float>(), kind,
                                      y.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "nf4_gemv_lora");
    return y;
}

}  // namespace
}  // namespace qlora

// FRAGMENT, not TORCH_LIBRARY: other parts of qlora may define ops in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(qlora, m) {
    m.def(
        "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? nested_quant_map, Tensor? offset, Tensor quant_map, int blocksize, "
        "int nested_blocksize, Tensor(a!) out) -> ()");
    m.def(
        "nf4_gemv_lora(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? nested_quant_map, Tensor? offset, Tensor quant_map, int blocksize, "
        "int nested_blocksize, int N, Tensor? lora_A, Tensor? lora_B, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
    m.impl("nf4_dequantize", &qlora::nf4_dequantize_cuda);
    m.impl("nf4_gemv_lora", &qlora::nf4_gemv_lora_cuda);
}
