// NF4 -> bf16/fp16 dequantization into a caller-provided buffer.
//
// Math (format in nf4_format.h):  out[i] = quant_map[code_i] * absmax_fp32[i / blocksize].
//
// Design
// - One thread owns one chunk of 32 consecutive elements = 16 packed bytes, read with one 128-bit
//   load and written with four 128-bit stores (32 bf16 = 64 bytes). Consecutive threads own
//   consecutive chunks, so a warp reads 512 contiguous bytes and writes 2 KiB contiguous bytes:
//   every access is fully coalesced and the kernel is bound by DRAM bandwidth (5 bytes moved per
//   2 elements of bf16 output: 1 packed byte read, 4 bytes written).
// - A chunk starts at a multiple of 32, and blocksize is a multiple of 32, so the whole chunk shares
//   one absmax: it is decoded once per thread (double quantization: two table reads, mul, add).
// - The 16-entry code table lives in shared memory: 16 distinct floats sit in 16 distinct banks, so
//   a warp's lookups never conflict (equal codes are broadcast). Unlike the GEMV kernel, a thread
//   here may have no chunk (the tail), which rules out warp shuffles that need every lane.
// - The last chunk may be partial (numel % 32 != 0), and a caller's buffers may be views that are not
//   16-byte aligned; such chunks take a byte-by-byte path with the same arithmetic.
#include <cstdint>

#include <cuda_runtime.h>

#include "half_types.cuh"
#include "nf4_format.h"
#include "qlora_kernels.h"

namespace qlora {
namespace {

constexpr int kChunk = 32;            // elements per thread
constexpr int kThreadsPerBlock = 256;

template <class T>
__global__ void __launch_bounds__(kThreadsPerBlock)
nf4_dequantize_kernel(const uint8_t* __restrict__ packed,  // [(numel + 1) / 2] two codes per byte
                      AbsmaxView absmax,                     // per-block scales, see nf4_format.h
                      const float* __restrict__ quant_map,   // [16] code -> value in [-1, 1]
                      int64_t blocksize,                     // elements per absmax block
                      int64_t numel,                         // logical element count
                      bool vector_io,                        // packed and out are 16-byte aligned
                      T* __restrict__ out) {                 // [numel] output
    __shared__ float table[16];
    if (threadIdx.x < 16) {
        table[threadIdx.x] = quant_map[threadIdx.x];
    }
    __syncthreads();

    const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
    const int64_t first = chunk * kChunk;
    if (first >= numel) {
        return;
    }
    const float scale = decode_absmax(absmax, first / blocksize);
    auto lookup = [&](int code) { return table[code]; };

    if (vector_io && first + kChunk <= numel) {
        // ---- full, aligned chunk: one 128-bit load, 8 words x 8 elements, four 128-bit stores ----
        const uint4 q = *reinterpret_cast<const uint4*>(packed + first / 2);
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        uint4* dst = reinterpret_cast<uint4*>(out + first);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            float v[8];
            decode_word(words[w], scale, lookup, v);
            dst[w] = make_uint4(HalfTraits<T>::pack2(v[0], v[1]), HalfTraits<T>::pack2(v[2], v[3]),
                                HalfTraits<T>::pack2(v[4], v[5]), HalfTraits<T>::pack2(v[6], v[7]));
        }
        return;
    }
    // ---- partial or unaligned chunk: element by element ----
    const int64_t last = first + kChunk < numel ? first + kChunk : numel;
    for (int64_t i = first; i < last; ++i) {
        out[i] = HalfTraits<T>::from_float(table[code_at(packed, i)] * scale);
    }
}

}  // namespace

cudaError_t nf4_dequantize_launch(const uint8_t* packed, AbsmaxView absmax, const float* quant_map,
                                  int64_t blocksize, int64_t numel, ScalarKind kind, void* out,
                                  cudaStream_t stream) {
    if (numel <= 0) {
        return cudaSuccess;
    }
    if (blocksize <= 0 || blocksize % kChunk != 0) {
        return cudaErrorInvalidValue;
    }
    const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
    const int64_t n_blocks = (n_chunks + kThreadsPerBlock - 1) / kThreadsPerBlock;
    if (n_blocks > 0x7fffffff) {
        return cudaErrorInvalidConfiguration;
    }
    const bool vector_io = reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(n_blocks));
    if (kind == ScalarKind::kBFloat16) {
        nf4_dequantize_kernel<__nv_bfloat16><<<grid, kThreadsPerBlock, 0, stream>>>(
            packed, absmax, quant_map, blocksize, numel, vector_io, static_cast<__nv_bfloat16*>(out));
    } else {
        nf4_dequantize_kernel<__half><<<grid, kThreadsPerBlock, 0, stream>>>(
            packed, absmax, quant_map, blocksize, numel, vector_io, static_cast<__half*>(out));
    }
    return cudaGetLastError();
}

}  // namespace qlora
