"""RMSNorm (Llama), forward and backward.

Math, per row x of length H, weight w [H], eps > 0:

    r  = 1 / sqrt(mean(x^2) + eps)            (fp32, saved for the backward: one float per row)
    xn = x * r
    y  = w * xn

Backward, with g = dL/dy and dxn = g * w:

    dL/dx = r * (dxn - xn * mean(dxn * xn))
    dL/dw = sum over rows of g * xn           (only when the weight is trained)

Everything is computed in fp32 and rounded once, when y is stored in the output dtype: the
promotion of the input and weight dtypes, as in Hugging Face's
``weight * (x.float() * r).to(input_dtype)`` (which also rounds xn to the input dtype first).
"""
import torch
import triton
import triton.language as tl

_BWD_ROWS_PER_PROGRAM = 16  # rows one backward program reduces into its dW partial


def _num_warps(block_h):
    """4 warps up to rows of 4096, 32 above. Compiled for sm_80 and sm_90 with `qlora kernels
    inspect`, which reads the cubin Triton 3.9 launches (2026-11-29): at 8192 the backward spills
    at 8 warps (4 bytes without dW, sm_80) and at 16 warps (4 bytes without dW, 28 with dW, sm_90:
    the 128-register cap of a 512-thread block); 32 warps (64 registers) spill in neither."""
    return 4 if block_h <= 4096 else 32


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr,  # [rows, H] input, rows at stride x_row_stride, unit stride along H
    w_ptr,  # [H] weight
    y_ptr,  # [rows, H] out, contiguous
    rstd_ptr,  # [rows] out: fp32 r of each row
    x_row_stride,
    H,  # row length
    eps,
    BLOCK_H: tl.constexpr,  # next power of two >= H
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H

    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    # ---- normalise --------------------------------------------------------------------
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    xn = x * rstd

    # ---- scale and store --------------------------------------------------------------
    tl.store(y_ptr + row * H + cols, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def rms_norm_bwd_kernel(
    grad_out_ptr,  # [rows, H] dL/dy, contiguous
    x_ptr,  # [rows, H] saved input, rows at stride x_row_stride
    w_ptr,  # [H] weight
    rstd_ptr,  # [rows] saved fp32 r
    grad_x_ptr,  # [rows, H] out: dL/dx, contiguous, dtype of x
    grad_w_partial_ptr,  # [programs, H] out: fp32 dL/dw of this program's rows (if COMPUTE_DW)
    x_row_stride,
    rows,
    H,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)

    for i in range(ROWS_PER_PROGRAM):
        row = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        row_mask = cols < tl.where(row < rows, H, 0)  # the whole row masked past the end

        # ---- load one row -------------------------------------------------------------
        g = tl.load(grad_out_ptr + row * H + cols, mask=row_mask, other=0.0).to(tl.float32)
        x_raw = tl.load(x_ptr + row * x_row_stride + cols, mask=row_mask, other=0.0)
        x = x_raw.to(tl.float32)
        # rows past the end (last program) read a valid rstd and are masked at the store
        rstd = tl.load(rstd_ptr + tl.minimum(row, rows - 1))

        # ---- dL/dx --------------------------------------------------------------------
        xn = x * rstd
        dxn = g * w
        dx = rstd * (dxn - xn * (tl.sum(dxn * xn, axis=0) / H))
        tl.store(grad_x_ptr + row * H + cols, dx.to(x_raw.dtype), mask=row_mask)

        # ---- dL/dw ---------------------------------------------------------------------
        if COMPUTE_DW:
            dw += g * xn

    if COMPUTE_DW:
        tl.store(grad_w_partial_ptr + pid * H + cols, dw, mask=mask)


def _rows_view(x, H):
    """x [..., H] as [rows, H] with unit stride along H (a copy only when needed)."""
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def rms_norm_forward(x, weight, eps):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim.

    x: [..., H] float; weight: [H]. Returns (y [..., H] in promote(x.dtype, weight.dtype),
    rstd fp32 [rows]) where rows = x.numel() // H.
    """
    H = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != H:
        raise ValueError(f"rms_norm_forward: weight must have shape [{H}] (x's last dim), got "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm_forward: weight on {weight.device}, x on {x.device}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"rms_norm_forward: x must be floating point, got {x.dtype}")
    x2 = _rows_view(x, H)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block_h = triton.next_power_of_2(H)
        rms_norm_fwd_kernel[(rows,)](x2, weight.contiguous(), y, rstd, x2.stride(0), H, eps,
                                     BLOCK_H=block_h, num_warps=_num_warps(block_h))
    return y, rstd


def rms_norm_backward(grad_out, x, weight, rstd, compute_grad_weight):
    """(dL/dx [..., H] in x.dtype, dL/dw [H] in weight.dtype or None).

    grad_out: [..., H] (shape of x); rstd: fp32 [rows] from rms_norm_forward. dL/dw is
    computed only when compute_grad_weight (the weight is trained); a frozen norm costs only dX.
    """
    H = x.shape[-1]
    if grad_out.shape != x.shape:
        raise ValueError(f"rms_norm_backward: grad_out {tuple(grad_out.shape)} does not match x "
                         f"{tuple(x.shape)}")
    x2 = _rows_view(x, H)
    rows = x2.shape[0]
    if rstd.shape != (rows,):
        raise ValueError(f"rms_norm_backward: rstd must have shape [{rows}], got "
                         f"{tuple(rstd.shape)}")
    grad_out = grad_out.reshape(rows, H).contiguous()
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(rows, _BWD_ROWS_PER_PROGRAM)
    partial = torch.empty((programs, H) if compute_grad_weight else (1,), dtype=torch.float32,
                          device=x.device)
    if rows:
        block_h = triton.next_power_of_2(H)
        rms_norm_bwd_kernel[(programs,)](
            grad_out, x2, weight.contiguous(), rstd, grad_x, partial, x2.stride(0), rows, H,
            ROWS_PER_PROGRAM=_BWD_ROWS_PER_PROGRAM, BLOCK_H=block_h,
            COMPUTE_DW=compute_grad_weight, num_warps=_num_warps(block_h))
    if not compute_grad_weight:
        return grad_x, None
    grad_w = partial.sum(0) if rows else torch.zeros(H, dtype=torch.float32, device=x.device)
    return grad_x, grad_w.to(weight.dtype)


def _aot_specs():
    specs = []
    for dt in ("bf16", "fp16"):
        for hidden in (4096, 8192):
            block = triton.next_power_of_2(hidden)
            specs.append({
                "kernel": rms_norm_fwd_kernel,
                "signature": {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}",
                              "rstd_ptr": "*fp32", "x_row_stride": "i32", "H": "i32",
                              "eps": "fp32", "BLOCK_H": "constexpr"},
                "constexprs": {"BLOCK_H": block}, "options": {"num_warps": _num_warps(block)}})
            for compute_dw in (False, True):
                specs.append({
                    "kernel": rms_norm_bwd_kernel,
                    "signature": {"grad_out_ptr": f"*{dt}", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}",
                                  "rstd_ptr": "*fp32", "grad_x_ptr": f"*{dt}",
                                  "grad_w_partial_ptr": "*fp32", "x_row_stride": "i32",
                                  "rows": "i32", "H": "i32", "ROWS_PER_PROGRAM": "constexpr",
                                  "BLOCK_H": "constexpr", "COMPUTE_DW": "constexpr"},
                    "constexprs": {"ROWS_PER_PROGRAM": _BWD_ROWS_PER_PROGRAM, "BLOCK_H": block,
                                   "COMPUTE_DW": compute_dw},
                    "options": {"num_warps": _num_warps(block)}})
    return specs


# Ahead-of-time compile specs (see kernels/swiglu.py): Llama hidden sizes 4096 and 8192.
AOT_SPECS = _aot_specs()
