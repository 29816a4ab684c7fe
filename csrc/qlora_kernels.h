// Host-callable launchers of the CUDA kernels in csrc/*.cu.
//
// The .cu files include no torch header, so each compiles standalone with nvcc (the CPU CI compiles
// them; see tests/test_csrc_compile.py). The torch glue in torch_bindings.cpp validates tensors and
// calls these launchers with raw pointers. Launchers return the launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "nf4_format.h"

namespace qlora {

enum class ScalarKind { kBFloat16, kFloat16 };

// out[i] = quant_map[code_i] * absmax_fp32[i / blocksize] for i in [0, numel), rounded to `kind`.
// packed: [(numel + 1) / 2] uint8; quant_map: [16] fp32; out: [numel] of `kind`.
// Requires blocksize % 32 == 0 (bitsandbytes' NF4 block sizes are 64..4096).
cudaError_t nf4_dequantize_launch(const uint8_t* packed, AbsmaxView absmax, const float* quant_map,
                                  int64_t blocksize, int64_t numel, ScalarKind kind, void* out,
                                  cudaStream_t stream);

// y[m, n] = sum_k x[m, k] * W[n, k] + sum_j t[m, j] * B[n, j],  t = scaling * x @ A^T  (fp32),
// with W the NF4 weight [N, K]. x: [M, K], A: [r, K], B: [N, r], y: [M, N], all of `kind` and
// contiguous; `t_workspace` is fp32 [M, r]. A, B may be null (then r is ignored, no LoRA term).
// Requires 1 <= M <= 8, K % 32 == 0, a power-of-two blocksize >= 32 (and nested_blocksize with uint8
// absmax), and 16-byte aligned packed, x, A.
cudaError_t nf4_gemv_lora_launch(const void* x, const uint8_t* packed, AbsmaxView absmax,
                                 const float* quant_map, int64_t blocksize, int64_t M, int64_t N,
                                 int64_t K, const void* lora_A, const void* lora_B, int64_t r,
                                 float scaling, float* t_workspace, ScalarKind kind, void* y,
                                 cudaStream_t stream);

}  // namespace qlora
