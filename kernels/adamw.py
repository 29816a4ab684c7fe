"""Fused AdamW update: one pass over param, grad and both moments.

Math (decoupled weight decay, Loshchilov & Hutter; same order of operations as
``torch.optim.AdamW``), for step t >= 1 with hyper-parameters lr, beta1, beta2, eps, wd:

    p   <- p * (1 - lr * wd)
    m   <- lerp(m, g, 1 - beta1)                 = beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g * g
    p   <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The scalars that depend only on t (``decay = 1 - lr*wd``, ``step_size = lr / (1 - beta1^t)``,
``bias_correction2_sqrt = sqrt(1 - beta2^t)``), and ``1 - beta1``, ``1 - beta2``, are computed
once on the host in float64 and passed in, as PyTorch does, so both paths round them alike.
Everything else is computed in fp32; the parameter is stored back in its own dtype, the
moments stay fp32.

8-bit variant: the moments are stored as blockwise dynamic 8-bit codes (blocks of
``QUANT_BLOCK`` = 256 elements, one fp32 absmax per block, as in bitsandbytes' 8-bit Adam).
A block is dequantized (``m = m_map[code] * absmax``), updated exactly as above in fp32, and
re-quantized with the block's new absmax to the nearest code of the map.
"""
import torch
import triton
import triton.language as tl

QUANT_BLOCK = 256  # elements per absmax block of the 8-bit states (bitsandbytes' 8-bit Adam)
_FP32_BLOCK = 1024  # elements per program of the fp32 kernel


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's formula: the branch keeps the result exact at weight 0 and weight 1.
    if weight < 0.5:
        out = start + weight * (end - start)
    else:
        out = end - (end - start) * (1.0 - weight)
    return out


@triton.jit
def _adamw_math(p, g, m, v, decay, exp_avg_weight, beta2, exp_avg_sq_weight, eps, step_size,
                bias_correction2_sqrt):
    p = p * decay
    m = _lerp(m, g, exp_avg_weight)
    v = v * beta2 + exp_avg_sq_weight * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def adamw_update_kernel(
    param_ptr,  # [n] param, any float dtype, updated in place
    grad_ptr,  # [n] gradient, same dtype as param
    exp_avg_ptr,  # [n] fp32 first moment, updated in place
    exp_avg_sq_ptr,  # [n] fp32 second moment, updated in place
    n,  # number of elements
    decay,  # 1 - lr * weight_decay
    exp_avg_weight,  # 1 - beta1
    beta2,
    exp_avg_sq_weight,  # 1 - beta2
    eps,
    step_size,  # lr / (1 - beta1^t)
    bias_correction2_sqrt,  # sqrt(1 - beta2^t)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n

    # ---- load -------------------------------------------------------------------------
    p_raw = tl.load(param_ptr + offs, mask=mask)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask)

    # ---- update in fp32 ---------------------------------------------------------------
    p, m, v = _adamw_math(p_raw.to(tl.float32), g, m, v, decay, exp_avg_weight, beta2,
                          exp_avg_sq_weight, eps, step_size, bias_correction2_sqrt)

    # ---- store ------------------------------------------------------------------------
    tl.store(param_ptr + offs, p.to(p_raw.dtype), mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)


@triton.jit
def _quantize_nearest(x, map_ptr):
    # Nearest code of the sorted 256-entry map: binary search for the largest index with
    # map[lo] <= x, then pick lo or lo + 1, whichever value is closer (ties go to lo).
    lo = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        cand = lo + (128 >> i)
        lo = tl.where(tl.load(map_ptr + cand) <= x, cand, lo)
    hi = tl.minimum(lo + 1, 255)
    below = tl.load(map_ptr + lo)
    above = tl.load(map_ptr + hi)
    return tl.where(above - x < x - below, hi, lo).to(tl.uint8)


@triton.jit
def adamw8bit_update_kernel(
    param_ptr,  # [n] param, any float dtype, updated in place
    grad_ptr,  # [n] gradient, same dtype as param
    exp_avg_code_ptr,  # [n] uint8 codes into exp_avg_map_ptr
    exp_avg_sq_code_ptr,  # [n] uint8 codes into exp_avg_sq_map_ptr
    exp_avg_absmax_ptr,  # [cdiv(n, QBLOCK)] fp32 scale of each block of exp_avg
    exp_avg_sq_absmax_ptr,  # [cdiv(n, QBLOCK)] fp32 scale of each block of exp_avg_sq
    exp_avg_map_ptr,  # [256] fp32 sorted signed dynamic map
    exp_avg_sq_map_ptr,  # [256] fp32 sorted unsigned dynamic map
    n,
    decay,
    exp_avg_weight,
    beta2,
    exp_avg_sq_weight,
    eps,
    step_size,
    bias_correction2_sqrt,
    QBLOCK: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * QBLOCK + tl.arange(0, QBLOCK)
    mask = offs < n

    # ---- load and dequantize the block ------------------------------------------------
    p_raw = tl.load(param_ptr + offs, mask=mask)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m_code = tl.load(exp_avg_code_ptr + offs, mask=mask).to(tl.int32)
    v_code = tl.load(exp_avg_sq_code_ptr + offs, mask=mask).to(tl.int32)
    m = tl.load(exp_avg_map_ptr + m_code) * tl.load(exp_avg_absmax_ptr + block)
    v = tl.load(exp_avg_sq_map_ptr + v_code) * tl.load(exp_avg_sq_absmax_ptr + block)

    # ---- update in fp32 ---------------------------------------------------------------
    p, m, v = _adamw_math(p_raw.to(tl.float32), g, m, v, decay, exp_avg_weight, beta2,
                          exp_avg_sq_weight, eps, step_size, bias_correction2_sqrt)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)

    # ---- re-quantize with the block's new absmax --------------------------------------
    m_absmax = tl.max(tl.abs(m), axis=0)
    v_absmax = tl.max(v, axis=0)
    m_norm = tl.where(m_absmax > 0, tl.div_rn(m, tl.maximum(m_absmax, 1e-38)), 0.0)
    v_norm = tl.where(v_absmax > 0, tl.div_rn(v, tl.maximum(v_absmax, 1e-38)), 0.0)

    # ---- store ------------------------------------------------------------------------
    tl.store(param_ptr + offs, p.to(p_raw.dtype), mask=mask)
    tl.store(exp_avg_code_ptr + offs, _quantize_nearest(m_norm, exp_avg_map_ptr), mask=mask)
    tl.store(exp_avg_sq_code_ptr + offs, _quantize_nearest(v_norm, exp_avg_sq_map_ptr), mask=mask)
    tl.store(exp_avg_absmax_ptr + block, m_absmax)
    tl.store(exp_avg_sq_absmax_ptr + block, v_absmax)


def _check_flat(name, t, numel, device, dtype=None):
    if t.dim() != 1 or t.numel() != numel or not t.is_contiguous():
        raise ValueError(f"adamw: {name} must be a contiguous 1-D tensor of {numel} elements, "
                         f"got shape {tuple(t.shape)} (contiguous={t.is_contiguous()})")
    if t.device != device:
        raise ValueError(f"adamw: {name} is on {t.device}, expected {device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"adamw: {name} has dtype {t.dtype}, expected {dtype}")


def _check_param_grad(param, grad):
    _check_flat("param", param, param.numel(), param.device)
    _check_flat("grad", grad, param.numel(), param.device, param.dtype)
    if not param.dtype.is_floating_point:
        raise ValueError(f"adamw: param must be floating point, got {param.dtype}")


def adamw_update(param, grad, exp_avg, exp_avg_sq, *, decay, beta1, beta2, eps, step_size,
                 bias_correction2_sqrt):
    """In-place fused AdamW step on flat tensors.

    param, grad: [n] (same float dtype); exp_avg, exp_avg_sq: [n] fp32. Scalars as in the
    module docstring.
    """
    _check_param_grad(param, grad)
    n = param.numel()
    _check_flat("exp_avg", exp_avg, n, param.device, torch.float32)
    _check_flat("exp_avg_sq", exp_avg_sq, n, param.device, torch.float32)
    if n == 0:
        return
    grid = (triton.cdiv(n, _FP32_BLOCK),)
    adamw_update_kernel[grid](param, grad, exp_avg, exp_avg_sq, n, decay, 1.0 - beta1, beta2,
                              1.0 - beta2, eps, step_size, bias_correction2_sqrt, BLOCK=_FP32_BLOCK)


def adamw8bit_update(param, grad, exp_avg_code, exp_avg_sq_code, exp_avg_absmax,
                     exp_avg_sq_absmax, exp_avg_map, exp_avg_sq_map, *, decay, beta1, beta2, eps,
                     step_size, bias_correction2_sqrt):
    """In-place fused AdamW step with blockwise dynamic 8-bit moments.

    param, grad: [n]; codes: uint8 [n]; absmax: fp32 [cdiv(n, 256)], block b covering
    elements [256 b, 256 (b + 1)); maps: fp32 [256], sorted ascending.
    """
    _check_param_grad(param, grad)
    n = param.numel()
    n_blocks = triton.cdiv(n, QUANT_BLOCK)
    _check_flat("exp_avg_code", exp_avg_code, n, param.device, torch.uint8)
    _check_flat("exp_avg_sq_code", exp_avg_sq_code, n, param.device, torch.uint8)
    _check_flat("exp_avg_absmax", exp_avg_absmax, n_blocks, param.device, torch.float32)
    _check_flat("exp_avg_sq_absmax", exp_avg_sq_absmax, n_blocks, param.device, torch.float32)
    _check_flat("exp_avg_map", exp_avg_map, 256, param.device, torch.float32)
    _check_flat("exp_avg_sq_map", exp_avg_sq_map, 256, param.device, torch.float32)
    if n == 0:
        return
    adamw8bit_update_kernel[(n_blocks,)](
        param, grad, exp_avg_code, exp_avg_sq_code, exp_avg_absmax, exp_avg_sq_absmax,
        exp_avg_map, exp_avg_sq_map, n, decay, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        step_size, bias_correction2_sqrt, QBLOCK=QUANT_BLOCK)
