// NF4 storage format helpers shared by the CUDA kernels and the host-side test harness.
//
// The format is exactly bitsandbytes' NF4 with optional double quantization (see qlora/quant/nf4.py):
//   packed  uint8, two 4-bit codes per byte over the row-major flat index i; element 2j sits in
//           the HIGH nibble of byte j and element 2j+1 in the LOW nibble.
//   absmax  per block of `blocksize` consecutive flat elements. Double-quantized (QLoRA's default):
//               absmax_fp32[b] = nested_quant_map[absmax_u8[b]] * nested_absmax[b / nested_blocksize]
//                                + offset
//           evaluated as a rounded fp32 multiply followed by a rounded fp32 add, the order in which
//           bitsandbytes evaluates it (dequantize_blockwise, then `absmax += offset`). Without
//           double quantization absmax is already fp32.
//   value   w[i] = quant_map[code_i] * absmax_fp32[i / blocksize], one fp32 rounding, then one
//           rounding to the output dtype.
//
// Everything here is a pure function with no CUDA or torch dependency, so that `g++` can compile it
// for the host harness in tests/test_csrc_compile.py and check it against qlora.quant.nf4 and
// bitsandbytes: the code that decodes the format on the GPU is the code that the CPU test runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora {

// Multiply and add with one rounding each. nvcc contracts `a * b + c` into an FMA (one rounding),
// which would differ from bitsandbytes' absmax in the last bit; the intrinsics forbid contraction.
QLORA_HD float mul_then_add_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(__fmul_rn(a, b), c);
#else
    // Host x86-64 builds without -mfma/-ffp-contract=fast cannot contract; the harness is built so.
    float product = a * b;
    return product + c;
#endif
}

// Where the per-block scales live. Exactly one of `absmax_u8` (double-quantized) and `absmax_f32`
// is non-null; the nested fields are used only with `absmax_u8`.
struct AbsmaxView {
    const uint8_t* absmax_u8;         // [n_blocks] codes into nested_quant_map
    const float* absmax_f32;          // [n_blocks] plain fp32 scales
    const float* nested_absmax;       // [ceil(n_blocks / nested_blocksize)]
    const float* nested_quant_map;    // [256] bitsandbytes' signed dynamic map
    const float* offset;              // [1] mean subtracted before the nested quantization
    int64_t nested_blocksize;         // 256 in bitsandbytes
};

// The fp32 scale of block `block`, whose nested block is `nested_block` (= block / nested_blocksize;
// a caller in a loop passes a shift instead of paying for a 64-bit division). Pointer loads go through
// plain dereferences so the same code runs on the host; on the device these tables are small and
// read-only, so they stay in L1.
QLORA_HD float decode_absmax_at(const AbsmaxView& view, int64_t block, int64_t nested_block) {
    if (view.absmax_u8 == nullptr) {
        return view.absmax_f32[block];
    }
    return mul_then_add_rn(view.nested_quant_map[view.absmax_u8[block]], view.nested_absmax[nested_block],
                           view.offset[0]);
}

QLORA_HD float decode_absmax(const AbsmaxView& view, int64_t block) {
    // nested_blocksize is 0 without double quantization
    return decode_absmax_at(view, block, view.absmax_u8 != nullptr ? block / view.nested_blocksize : 0);
}

// The 4-bit code of flat element i, read byte by byte (any alignment, any i).
QLORA_HD int code_at(const uint8_t* packed, int64_t i) {
    const uint8_t byte = packed[i >> 1];
    return (i & 1) ? (byte & 0xF) : (byte >> 4);
}

// Where element e (0..7) of the 8 elements packed in a 32-bit word sits, for a word that was loaded
// from memory as part of a 128-bit load. The word is little-endian: memory byte j of the word is bits
// [8j, 8j+8), and holds elements 2j (high nibble) and 2j+1 (low nibble). Hence element e lives at
// bit 8*(e/2) + 4*(1 - e%2).
QLORA_HD int code_shift(int e) {
    return 8 * (e >> 1) + 4 * (1 - (e & 1));
}

// The 4-bit code of element e of a packed word.
QLORA_HD int code_in_word(uint32_t word, int e) {
    return (word >> code_shift(e)) & 0xF;
}

// Decode the 8 elements of one packed word into fp32: out[e] = lookup(code_e) * scale.
// `lookup` maps a code to its quant_map value; the GPU passes a warp-shuffle lookup and the host
// harness an array lookup, so both run this same unpacking code.
template <class Lookup>
QLORA_HD void decode_word(uint32_t word, float scale, Lookup lookup, float out[8]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < 8; ++e) {
        out[e] = lookup(code_in_word(word, e)) * scale;
    }
}

}  // namespace qlora
