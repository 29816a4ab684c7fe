"""The AdamW update on flat tensors: PyTorch ops on CPU, the fused Triton kernel on CUDA.

Both paths implement the same math (see ``qlora.kernels.adamw``); the PyTorch path follows
``torch.optim.AdamW``'s single-tensor implementation op for op, so on CPU fp32 it reproduces it.
"""
import torch

from qlora.optim.quant8 import dequantize_blockwise, quantize_blockwise


def adamw_scalars(*, lr, beta1, beta2, weight_decay, step):
    """Host-side float64 scalars of step ``step`` (>= 1), shared by every element."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return dict(decay=1 - lr * weight_decay, step_size=lr / bias_correction1,
                bias_correction2_sqrt=bias_correction2 ** 0.5)


def _adamw_math_(p, g, m, v, *, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    # p, g, m, v: [n] of one float dtype (fp32 here, fp64 in the tests' reference); in place.
    if decay != 1:
        p.mul_(decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def adamw_update_torch(param, grad, exp_avg, exp_avg_sq, **scalars):
    """In-place AdamW step with PyTorch ops. param, grad: [n] float; moments: fp32 [n]."""
    p = param if param.dtype == torch.float32 else param.float()
    _adamw_math_(p, grad.float(), exp_avg, exp_avg_sq, **scalars)
    if p is not param:
        param.copy_(p)


def adamw8bit_update_torch(param, grad, exp_avg_code, exp_avg_sq_code, exp_avg_absmax,
                           exp_avg_sq_absmax, exp_avg_map, exp_avg_sq_map, **scalars):
    """In-place AdamW step on blockwise 8-bit moments: dequantize, update in fp32, requantize."""
    p = param if param.dtype == torch.float32 else param.float()
    m = dequantize_blockwise(exp_avg_code, exp_avg_absmax, exp_avg_map)
    v = dequantize_blockwise(exp_avg_sq_code, exp_avg_sq_absmax, exp_avg_sq_map)
    _adamw_math_(p, grad.float(), m, v, **scalars)
    if p is not param:
        param.copy_(p)
    for code, absmax, value, qmap in ((exp_avg_code, exp_avg_absmax, m, exp_avg_map),
                                      (exp_avg_sq_code, exp_avg_sq_absmax, v, exp_avg_sq_map)):
        new_code, new_absmax = quantize_blockwise(value, qmap)
        code.copy_(new_code)
        absmax.copy_(new_absmax)


def adamw_update(param, grad, exp_avg, exp_avg_sq, **scalars):
    """fp32-state AdamW step on the device of ``param`` (Triton on CUDA, PyTorch elsewhere)."""
    if param.is_cuda:
        # Triton is a Linux-only dependency: import it only once a CUDA tensor needs it.
        from qlora.kernels.adamw import adamw_update as launch
        launch(param, grad, exp_avg, exp_avg_sq, **scalars)
    else:
        adamw_update_torch(param, grad, exp_avg, exp_avg_sq, **scalars)


def adamw8bit_update(param, grad, *states, **scalars):
    """8-bit-state AdamW step on the device of ``param`` (Triton on CUDA, PyTorch elsewhere)."""
    if param.is_cuda:
        from qlora.kernels.adamw import adamw8bit_update as launch
        launch(param, grad, *states, **scalars)
    else:
        adamw8bit_update_torch(param, grad, *states, **scalars)
