// NF4 small-batch GEMV / GEMM (M <= 8) with the LoRA term fused into the epilogue.
//
// Math. x: [M, K], W: NF4 [N, K] (format in nf4_format.h), A: [r, K], B: [N, r], s = scaling:
//     t[m, j] = s * sum_k x[m, k] * A[j, k]                          (lora_down_kernel, fp32)
//     y[m, n] = sum_k x[m, k] * W[n, k] + sum_j t[m, j] * B[n, j]    (nf4_gemv_lora_kernel)
// i.e. y = x W^T + s (x A^T) B^T. All sums are fp32; y is rounded to bf16/fp16 once at the end.
//
// Why two kernels: every output y[m, n] needs the whole row t[m, :], and t[m, j] is a reduction
// over all of K. Computing t inside each block would redo r*K*M multiply-adds per block; a grid-wide
// barrier would need a cooperative launch. A separate tiny kernel (r warps, reading A once: r*K*2
// bytes, ~1/64 of W's bytes at r=16) costs one extra launch and keeps the main kernel simple.
//
// Design of the main kernel. At M <= 8 the product is bound by reading W (K/2 bytes per row), so the
// kernel is organised around streaming the packed weights at full width:
// - A warp owns R consecutive output rows. Lane l reads 32-element chunks (16 bytes, one 128-bit
//   load per row) at k = l*32, l*32 + 1024, ...: the warp's loads for one row cover 512 contiguous
//   bytes, fully coalesced. The loads use the evict-first cache hint because each weight byte is
//   used exactly once, while x is reread by every warp and should stay in L1. The next chunk's loads
//   are issued before the current chunk's math, so 2R 128-bit loads per lane are in flight.
// - K % 32 == 0 makes every row start on a 16-byte boundary and puts each chunk inside a single
//   absmax block (its flat start is a multiple of 32 and blocksize a multiple of 32). The chunk's
//   products are summed unscaled and multiplied by the block's scale once: one multiply-add per
//   chunk and row instead of one multiply per weight. blocksize and nested_blocksize are powers of
//   two, so the block indices are shifts: the loop has no integer division.
// - Code lookup is a warp shuffle: lane l holds quant_map[l % 16] in a register and a code c is
//   resolved by reading lane c's register within the half-warp (width 16, which ignores the bits
//   above the code, so a code costs one shift and one SHFL). This keeps the table out of memory (no
//   bank conflicts, no local-memory spill of a dynamically indexed register array). A shuffle needs
//   every lane, so the K loop is warp-uniform; a lane past the end of a row redoes the row's last
//   chunk and drops the result.
// - Each looked-up weight is reused for all M rows of x, and each x value (converted to fp32 once
//   per 8 elements) for all R rows of W: R trades registers for fewer conversions of x.
// - Epilogue: each lane adds its strided part of t[m, :] . B[n, :] to its partial sum before the
//   warp reduction, so the LoRA term costs no extra reduction. After a butterfly reduction every
//   lane holds every sum, and the M*R stores are spread over lanes.
// Predicted from the sm_90 SASS (`qlora kernels inspect`, README): 4.6 instructions per weight at
// M = 1 with u8 absmax, 4.2 with fp32 absmax; M fused multiply-adds per weight more at larger M.
// Not measured on a GPU yet. Split-K (for N too small to fill the GPU) is not implemented.
#include <cstdint>

#include <cuda_runtime.h>

#include "half_types.cuh"
#include "nf4_format.h"
#include "qlora_kernels.h"

namespace qlora {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpsPerBlock * 32;
constexpr int kChunk = 32;        // elements per lane per 128-bit weight load
constexpr int kMaxM = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(kFullMask, v, offset);
    }
    return v;
}

// Eight consecutive bf16/fp16 values (one 128-bit load) -> fp32.
template <class T>
__device__ __forceinline__ void load8_as_float(const T* p, float out[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = HalfTraits<T>::unpack2(words[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// t[m, j] = scaling * sum_k x[m, k] A[j, k]; one warp per rank index j.
template <class T>
__global__ void __launch_bounds__(kThreadsPerBlock)
lora_down_kernel(const T* __restrict__ x,       // [M, K]
                 const T* __restrict__ lora_A,  // [r, K]
                 int M, int64_t K, int64_t r,
                 float scaling,
                 float* __restrict__ t) {       // [M, r] fp32
    const int lane = threadIdx.x & 31;
    const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
    if (j >= r) {
        return;  // the whole warp leaves together: j is warp-uniform
    }
    float acc[kMaxM] = {};
    for (int64_t k = lane * 8; k < K; k += 32 * 8) {
        float a[8];
        load8_as_float(lora_A + j * K + k, a);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
            if (m < M) {
                float xv[8];
                load8_as_float(x + m * K + k, xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    acc[m] = fmaf(xv[e], a[e], acc[m]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
        const float total = warp_sum(acc[m]);
        if (m < M && lane == m) {
            t[m * r + j] = scaling * total;
        }
    }
}

// NF4_CODE_VALUES[c] for the code c in bits 0..3 of `shifted_word`: lane l holds quant_map[l % 16] in
// `table_entry`, and c is read from lane c of the caller's half-warp (width 16), which ignores bits 4
// and up of the lane index, so a code costs one shift and one SHFL and needs no mask.
__device__ __forceinline__ float shuffle_code_value(float table_entry, uint32_t shifted_word) {
    return __shfl_sync(kFullMask, table_entry, static_cast<int>(shifted_word), 16);
}

// One chunk per row: the lane's 32 elements at k = base + 32 * lane (16 packed bytes, one 128-bit
// load) and their absmax, one per chunk. A lane past the end of a row reloads the row's last chunk
// (branch-free; the caller drops its result).
template <int R, bool kDoubleQuant>
__device__ __forceinline__ void load_chunk(const uint8_t* __restrict__ packed, const AbsmaxView& absmax,
                                           const int64_t (&row_start)[R], int blocksize_shift, int nested_shift,
                                           int64_t K, int64_t base, int lane, uint4 (&q)[R], float (&scale)[R]) {
    const int64_t k0 = min(base + lane * kChunk, K - kChunk);
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int64_t flat = row_start[i] + k0;
        const int64_t block = flat >> blocksize_shift;
        q[i] = __ldcs(reinterpret_cast<const uint4*>(packed + (flat >> 1)));
        scale[i] = kDoubleQuant ? decode_absmax_at(absmax, block, block >> nested_shift) : absmax.absmax_f32[block];
    }
}

// y = x W^T (+ t B^T); see the file comment. MT >= M rows of x (compile-time for register arrays),
// R rows of W per warp; kDoubleQuant: absmax is uint8 codes. blocksize and nested_blocksize are powers
// of two, passed as shifts: the loop has no integer division.
template <class T, int MT, int R, bool kDoubleQuant>
__global__ void __launch_bounds__(kThreadsPerBlock)
nf4_gemv_lora_kernel(const T* __restrict__ x,            // [M, K]
                     const uint8_t* __restrict__ packed,  // [N * K / 2] two codes per byte
                     AbsmaxView absmax,                   // per-block scales, see nf4_format.h
                     const float* __restrict__ quant_map, // [16] code -> value
                     int blocksize_shift,                 // log2(elements per absmax block)
                     int nested_shift,                    // log2(absmax blocks per nested block)
                     int M, int64_t N, int64_t K,
                     const float* __restrict__ t,         // [M, r] fp32 = s x A^T, or null
                     const T* __restrict__ lora_B,        // [N, r], or null
                     int64_t r,
                     T* __restrict__ y) {                 // [M, N]
    const int lane = threadIdx.x & 31;
    const int64_t row0 =
        (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * R;
    if (row0 >= N) {
        return;  // warp-uniform
    }
    // Rows past N (last warp) read row N-1 again and are not stored: keeps loads branch-free.
    int64_t rows[R];
    int64_t row_start[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        rows[i] = row0 + i < N ? row0 + i : N - 1;
        row_start[i] = rows[i] * K;
    }
    const float table_entry = quant_map[lane & 15];

    float acc[MT][R] = {};
    uint4 q[R];
    float scale[R];
    load_chunk<R, kDoubleQuant>(packed, absmax, row_start, blocksize_shift, nested_shift, K, 0, lane, q, scale);
    for (int64_t base = 0; base < K; base += 32 * kChunk) {
        // ---- the next chunk's loads go out before this chunk's math: two per row in flight ----
        uint4 q_next[R];
        float scale_next[R];
        if (base + 32 * kChunk < K) {  // warp-uniform
            load_chunk<R, kDoubleQuant>(packed, absmax, row_start, blocksize_shift, nested_shift, K,
                                        base + 32 * kChunk, lane, q_next, scale_next);
        }
        // a lane past the end of the row works on the row's last chunk again and drops the result
        const bool valid = base + lane * kChunk < K;
        const int64_t k0 = min(base + lane * kChunk, K - kChunk);

        // ---- unscaled products of the chunk, 8 elements at a time, against every row of x ----
        float part[MT][R] = {};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            float xv[MT][8];
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m < M) {
                    load8_as_float(x + m * K + k0 + 8 * w, xv[m]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        xv[m][e] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const uint32_t word = w == 0 ? q[i].x : w == 1 ? q[i].y : w == 2 ? q[i].z : q[i].w;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float value = shuffle_code_value(table_entry, word >> code_shift(e));
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        part[m][i] = fmaf(xv[m][e], value, part[m][i]);
                    }
                }
            }
        }
        // ---- the absmax once per chunk and row, not once per element ----
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const float chunk_scale = valid ? scale[i] : 0.0f;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                acc[m][i] = fmaf(chunk_scale, part[m][i], acc[m][i]);
            }
            q[i] = q_next[i];
            scale[i] = scale_next[i];
        }
    }
    // ---- epilogue: LoRA term, warp reduction, store ----
    if (lora_B != nullptr) {
        for (int64_t j = lane; j < r; j += 32) {
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const float b = HalfTraits<T>::to_float(lora_B[rows[i] * r + j]);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (m < M) {
                        acc[m][i] = fmaf(t[m * r + j], b, acc[m][i]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const float total = warp_sum(acc[m][i]);
            if (lane == (m * R + i) % 32 && m < M && row0 + i < N) {
                y[m * N + row0 + i] = HalfTraits<T>::from_float(total);
            }
        }
    }
}

template <class T, int MT, int R>
void launch_main(const void* x, const uint8_t* packed, AbsmaxView absmax, const float* quant_map,
                 int blocksize_shift, int nested_shift, int M, int64_t N, int64_t K, const float* t,
                 const void* lora_B, int64_t r, void* y, cudaStream_t stream) {
    const int64_t rows_per_block = static_cast<int64_t>(kWarpsPerBlock) * R;
    const dim3 grid(static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block));
    if (absmax.absmax_u8 != nullptr) {
        nf4_gemv_lora_kernel<T, MT, R, true><<<grid, kThreadsPerBlock, 0, stream>>>(
            static_cast<const T*>(x), packed, absmax, quant_map, blocksize_shift, nested_shift, M, N, K, t,
            static_cast<const T*>(lora_B), r, static_cast<T*>(y));
    } else {
        nf4_gemv_lora_kernel<T, MT, R, false><<<grid, kThreadsPerBlock, 0, stream>>>(
            static_cast<const T*>(x), packed, absmax, quant_map, blocksize_shift, nested_shift, M, N, K, t,
            static_cast<const T*>(lora_B), r, static_cast<T*>(y));
    }
}

template <class T>
cudaError_t launch_typed(const void* x, const uint8_t* packed, AbsmaxView absmax, const float* quant_map,
                         int blocksize_shift, int nested_shift, int M, int64_t N, int64_t K,
                         const void* lora_A, const void* lora_B, int64_t r, float scaling,
                         float* t, void* y, cudaStream_t stream) {
    const bool has_lora = lora_A != nullptr && lora_B != nullptr && r > 0;
    if (has_lora) {
        const dim3 grid(static_cast<unsigned>((r + kWarpsPerBlock - 1) / kWarpsPerBlock));
        lora_down_kernel<T><<<grid, kThreadsPerBlock, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(lora_A), M, K, r, scaling, t);
    } else {
        t = nullptr;
        lora_B = nullptr;
    }
    // R rows per warp share each conversion of x to fp32 (about 1/R of an instruction per weight at
    // M = 1) and put R 128-bit loads of W in flight per lane (2R with the prefetch). R = 4 up to
    // M = 4; at M > 4, R = 2 (R = 4 spills on sm_80).
    if (M == 1) {
        launch_main<T, 1, 4>(x, packed, absmax, quant_map, blocksize_shift, nested_shift, M, N, K, t, lora_B, r,
                             y, stream);
    } else if (M == 2) {
        launch_main<T, 2, 4>(x, packed, absmax, quant_map, blocksize_shift, nested_shift, M, N, K, t, lora_B, r,
                             y, stream);
    } else if (M <= 4) {
        launch_main<T, 4, 4>(x, packed, absmax, quant_map, blocksize_shift, nested_shift, M, N, K, t, lora_B, r,
                             y, stream);
    } else {
        launch_main<T, 8, 2>(x, packed, absmax, quant_map, blocksize_shift, nested_shift, M, N, K, t, lora_B, r,
                             y, stream);
    }
    return cudaGetLastError();
}

}  // namespace

namespace {

// log2(v) for a power of two v >= 1, else -1.
int power_of_two_shift(int64_t v) {
    if (v < 1 || (v & (v - 1)) != 0) {
        return -1;
    }
    int shift = 0;
    while ((int64_t{1} << shift) < v) {
        ++shift;
    }
    return shift;
}

}  // namespace

cudaError_t nf4_gemv_lora_launch(const void* x, const uint8_t* packed, AbsmaxView absmax,
                                 const float* quant_map, int64_t blocksize, int64_t M, int64_t N,
                                 int64_t K, const void* lora_A, const void* lora_B, int64_t r,
                                 float scaling, float* t_workspace, ScalarKind kind, void* y,
                                 cudaStream_t stream) {
    const int blocksize_shift = power_of_two_shift(blocksize);
    // unused without double quantization; any value keeps the kernel's arguments defined
    const int nested_shift = absmax.absmax_u8 != nullptr ? power_of_two_shift(absmax.nested_blocksize) : 0;
    if (M < 1 || M > kMaxM || N < 1 || K < kChunk || K % kChunk != 0 || blocksize % kChunk != 0 ||
        blocksize_shift < 0 || nested_shift < 0) {
        return cudaErrorInvalidValue;
    }
    if (kind == ScalarKind::kBFloat16) {
        return launch_typed<__nv_bfloat16>(x, packed, absmax, quant_map, blocksize_shift, nested_shift,
                                           static_cast<int>(M), N, K, lora_A, lora_B, r, scaling, t_workspace, y,
                                           stream);
    }
    return launch_typed<__half>(x, packed, absmax, quant_map, blocksize_shift, nested_shift, static_cast<int>(M),
                                N, K, lora_A, lora_B, r, scaling, t_workspace, y, stream);
}

}  // namespace qlora
