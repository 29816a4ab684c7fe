// bf16/fp16 conversions used by the kernels, behind one traits type so each kernel is written once.
// Device-only: included from .cu files.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora {

template <class T>
struct HalfTraits;

template <>
struct HalfTraits<__nv_bfloat16> {
    // Two fp32 values -> one 32-bit word holding two round-to-nearest-even bf16 (lo = a, hi = b).
    static __device__ __forceinline__ uint32_t pack2(float a, float b) {
        __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    // The two 16-bit halves of a word that was loaded from memory, lo = lower address.
    static __device__ __forceinline__ float2 unpack2(uint32_t w) {
        __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&w);
        return __bfloat1622float2(v);
    }
    static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct HalfTraits<__half> {
    static __device__ __forceinline__ uint32_t pack2(float a, float b) {
        __half2 v = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    static __device__ __forceinline__ float2 unpack2(uint32_t w) {
        __half2 v = *reinterpret_cast<__half2*>(&w);
        return __half22float2(v);
    }
    static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

}  // namespace qlora
