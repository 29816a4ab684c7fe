"""QLoRA linear layer on the Triton kernels: custom ops, autograd Function, per-shape path choice.

    Y = X W0^T + sum_a s_a * dropout_a(X) A_a^T B_a^T (+ bias)

Ladder (flash-attention style): kernels' launchers -> ``torch.library.custom_op`` forward and
backward ops (with ``register_fake``, so ``torch.compile`` traces the layer without graph breaks)
-> ``NF4LoRALinearFunction`` -> ``nf4_lora_linear_triton`` (what ``qlora.ops.functional``'s dispatcher
calls when the backend is "triton").

Adapters are concatenated along the rank axis (A_cat [R, K], B_s = [s_1 B_1 | ...] [N, R]) with
differentiable torch ops, so the Function sees one LoRA term and autograd routes dA_cat / dB_s back
to each adapter's A_a and B_a (including the factor s_a). Dropout seeds are drawn on the device
per forward, saved, and the masks are regenerated in backward.

Per-shape path (``choose_path``): of the split-K GEMV (M <= 16, no gradients), the fused kernels
and "dequantize W0 into a reused buffer + cuBLAS", the one with the lowest time for this GPU arch
and shape: measured where a GPU run filled the table, else predicted by the static speed model
(``qlora.ops.path_times``).
"""
import contextlib
import weakref

import torch

from qlora.kernels.configs import GEMV_MAX_M, current_arch
from qlora.kernels.dequant import NF4_CODE_VALUES, nf4_dequantize
from qlora.kernels.nf4_gemv import nf4_gemv_lora
from qlora.kernels.nf4_lora_linear import lora_a, lora_dropout, nf4_lora_linear_fwd
from qlora.kernels.nf4_lora_linear_bwd import nf4_lora_linear_bwd_dx
from qlora.ops.path_times import best_path

_pinned = None  # "fused" or "dense" inside pinned_path(), else None: the table decides


@contextlib.contextmanager
def pinned_path(path: str):
    """Within the block, take ``path`` instead of the path table's choice: "dense" for every
    M, or "fused" (with the GEMV kernel where it applies). Benchmarks use it so that each provider
    measures the path it names."""
    global _pinned
    if path not in ("fused", "dense"):
        raise ValueError(f"pinned_path: path must be 'fused' or 'dense', got {path!r}")
    previous, _pinned = _pinned, path
    try:
        yield
    finally:
        _pinned = previous


def choose_path(m: int, n: int, k: int, r: int, requires_grad: bool = False) -> str:
    """'gemv', 'fused' or 'dense' for X [m, k], W0 [n, k], LoRA rank r (0: none)."""
    if _pinned == "dense":
        return "dense"
    if _pinned == "fused":
        return "gemv" if m <= GEMV_MAX_M and not requires_grad else "fused"
    return best_path(current_arch(), m, n, k, r, training=requires_grad)


class _NF4Fields:
    """The NF4 fields the kernels read, rebuilt from a custom op's tensor arguments."""

    def __init__(self, packed, absmax, nested_absmax, nested_quant_map, offset, n, k, blocksize,
                 nested_blocksize):
        self.packed, self.absmax, self.offset = packed, absmax, offset
        self.nested_absmax, self.nested_quant_map = nested_absmax, nested_quant_map
        self.shape, self.blocksize, self.nested_blocksize = (n, k), blocksize, nested_blocksize


_dequant_buffers = {}  # (device, dtype) -> flat buffer shared by every layer's dense path


def dequant_buffer_bytes(device) -> int:
    """Bytes the dense path's shared dequantization buffers hold on ``device`` (the memory
    profile counts them)."""
    device = torch.device(device)
    return sum(b.numel() * b.element_size() for (d, _), b in _dequant_buffers.items()
               if torch.device(d).type == device.type)


def _dequant_buffer(numel: int, device, dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in _dequant_buffers or _dequant_buffers[key].numel() < numel:
        _dequant_buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return _dequant_buffers[key]


@torch.library.custom_op("qlora::nf4_lora_linear_fwd", mutates_args=())
def nf4_lora_linear_fwd_op(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor, offset: torch.Tensor, n: int, blocksize: int, nested_blocksize: int,
    bias: torch.Tensor | None, a_cat: torch.Tensor | None, b_scaled: torch.Tensor | None,
    rank_start: list[int], dropout_p: list[float], seeds: torch.Tensor, path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [M, N], S [M, R]) for a 2-D X [M, K]; S is [M, 0] without adapters."""
    m, k = x.shape
    weight = _NF4Fields(packed, absmax, nested_absmax, nested_quant_map, offset, n, k, blocksize, nested_blocksize)
    r = rank_start[-1] if a_cat is not None else 0
    s = torch.empty((m, r), dtype=x.dtype, device=x.device)
    for i, p in enumerate(dropout_p):
        lora_a(x, a_cat[rank_start[i]:rank_start[i + 1]], p, seeds[i:i + 1], s[:, rank_start[i]:rank_start[i + 1]])
    lora = (s, b_scaled) if r else (None, None)
    if path == "gemv":
        y = nf4_gemv_lora(x, weight, bias, *lora)
    elif path == "fused":
        y = nf4_lora_linear_fwd(x, weight, bias, *lora)
    elif r:
        w = nf4_dequantize(weight, _dequant_buffer(n * k, x.device, x.dtype))  # [N, K]
        # S B_s^T (+ bias) first, then the base GEMM accumulates into it (cuBLAS beta = 1). Bytes of Y
        # beyond the base GEMM's own write (2MN): 2MN written by the rank-R GEMM, 2MN read by the base
        # GEMM's epilogue, hidden under its math where it is compute-bound (large M). Adding S B_s^T
        # afterwards instead is a separate memory-bound pass reading and writing Y: 4MN.
        y = torch.mm(s, b_scaled.t()) if bias is None else torch.addmm(bias, s, b_scaled.t())  # [M, N]
        y.addmm_(x, w.t())
    else:
        y = torch.nn.functional.linear(x, nf4_dequantize(weight, _dequant_buffer(n * k, x.device, x.dtype)), bias)
    return y, s


@nf4_lora_linear_fwd_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_quant_map, offset, n, blocksize, nested_blocksize, bias, a_cat,
      b_scaled, rank_start, dropout_p, seeds, path):
    r = rank_start[-1] if a_cat is not None else 0
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], r))


@torch.library.custom_op("qlora::nf4_lora_linear_bwd", mutates_args=())
def nf4_lora_linear_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, s: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
    nested_absmax: torch.Tensor, nested_quant_map: torch.Tensor, offset: torch.Tensor, blocksize: int,
    nested_blocksize: int, a_cat: torch.Tensor | None, b_scaled: torch.Tensor | None, rank_start: list[int],
    dropout_p: list[float], seeds: torch.Tensor, path: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX [M, K], dA_cat [R, K], dB_s [N, R]); the LoRA grads are [0, K] / [N, 0] without adapters."""
    m, n = dy.shape
    k = x.shape[1]
    weight = _NF4Fields(packed, absmax, nested_absmax, nested_quant_map, offset, n, k, blocksize, nested_blocksize)
    dy = dy.contiguous()
    r = s.shape[1]
    if not r:
        g = None
        d_a = x.new_empty((0, k))
        d_b = x.new_empty((n, 0))
    else:
        g = dy @ b_scaled  # [M, R] = dY B_s
        d_b = dy.t() @ s  # [N, R] = dY^T S
        d_a = torch.empty_like(a_cat)
        for i, p in enumerate(dropout_p):
            ranks = slice(rank_start[i], rank_start[i + 1])
            x_d = lora_dropout(x, p, seeds[i:i + 1]) if p > 0.0 else x
            torch.mm(g[:, ranks].t(), x_d, out=d_a[ranks])  # dA_a = G_a^T X_d,a
    if path == "dense":
        w = nf4_dequantize(weight, _dequant_buffer(n * k, x.device, x.dtype))  # [N, K]
        # As in the forward: the LoRA term dX = sum_a mask_a (G_a A_a) first, then dY W0 accumulated
        # into it by cuBLAS (beta = 1, dX read in the compute-bound GEMM's epilogue), instead of a
        # separate pass reading and writing dX (4MK bytes) after the base GEMM.
        dx = None
        for i, p in enumerate(dropout_p if r else ()):
            ranks = slice(rank_start[i], rank_start[i + 1])
            g_a = g[:, ranks] @ a_cat[ranks]  # [M, K]
            term = lora_dropout(g_a, p, seeds[i:i + 1]) if p > 0.0 else g_a
            dx = term if dx is None else dx.add_(term)
        dx = dy @ w if dx is None else dx.addmm_(dy, w)
    else:
        meta = None
        if r:
            meta = (torch.tensor(rank_start, dtype=torch.int32).to(x.device, non_blocking=True),
                    torch.tensor(dropout_p, dtype=torch.float32).to(x.device, non_blocking=True),
                    seeds)
        dx = nf4_lora_linear_bwd_dx(dy, weight, g, a_cat if r else None, *(meta or (None, None, None)))
    return dx, d_a, d_b


@nf4_lora_linear_bwd_op.register_fake
def _(dy, x, s, packed, absmax, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize, a_cat,
      b_scaled, rank_start, dropout_p, seeds, path):
    r = s.shape[1]
    return x.new_empty(x.shape), x.new_empty((r, x.shape[1])), x.new_empty((dy.shape[1], r))


class NF4LoRALinearFunction(torch.autograd.Function):
    """Y = X W0^T + S B_s^T (+ bias), S = [dropout_a(X) A_a^T]_a; W0 frozen NF4 (never saved in 16 bit).

    Saves X, S [M, R], A_cat, B_s and the seeds; backward regenerates the dropout masks.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_cat, b_scaled, rank_start, dropout_p, seeds):
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        path = choose_path(x.shape[0], weight.shape[0], x.shape[1], a_cat.shape[0] if a_cat is not None else 0,
                           requires_grad=needs_grad)
        tensors = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_quant_map, weight.offset)
        y, s = nf4_lora_linear_fwd_op(x, *tensors, weight.shape[0], weight.blocksize, weight.nested_blocksize,
                                      bias, a_cat, b_scaled, list(rank_start), list(dropout_p), seeds, path)
        ctx.save_for_backward(x, s, a_cat, b_scaled, seeds, *tensors)
        ctx.meta = (weight.blocksize, weight.nested_blocksize, list(rank_start), list(dropout_p),
                    "dense" if path == "dense" else "fused", bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, s, a_cat, b_scaled, seeds, *tensors = ctx.saved_tensors
        blocksize, nested_blocksize, rank_start, dropout_p, path, has_bias = ctx.meta
        dx, d_a, d_b = nf4_lora_linear_bwd_op(dy, x, s, *tensors, blocksize, nested_blocksize, a_cat, b_scaled,
                                              rank_start, dropout_p, seeds, path)
        d_bias = dy.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        has_lora = a_cat is not None
        return (dx, None, d_bias, d_a if has_lora else None, d_b if has_lora else None, None, None, None)


_code_book_checked = {}  # id(quant_map) -> weakref to it, for quant_maps already compared


def _check_code_book(weight):
    """The kernels hard-code the NF4 code book; refuse any other quant_map (checked once per tensor,
    since the comparison copies it to the host)."""
    quant_map = weight.quant_map
    seen = _code_book_checked.get(id(quant_map))
    if seen is not None and seen() is quant_map:
        return
    expected = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
    if quant_map.numel() != 16 or not torch.equal(quant_map.detach().float().cpu().flatten(), expected):
        raise ValueError("Triton NF4 kernels need the standard NF4 quant_map (bitsandbytes' NF4 table); "
                         f"this weight has {quant_map.flatten().tolist()}")
    _code_book_checked[id(quant_map)] = weakref.ref(quant_map)


def nf4_lora_linear_triton(x: torch.Tensor, weight, bias, adapters) -> torch.Tensor:
    """Y = X W0^T + sum_a s_a dropout_a(X) A_a^T B_a^T (+ bias) on the Triton kernels.

    x: [..., K] bf16/fp16; weight: NF4Tensor [N, K]; bias: [N] or None; adapters: sequence of
    objects with A [r, K], B [N, r], scaling (float) and dropout (probability; pass 0 in eval).
    """
    _check_code_book(weight)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)  # [M, K]
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if adapters:
        a_cat = torch.cat([a.A for a in adapters], dim=0).to(x.dtype)  # [R, K]
        b_scaled = torch.cat([a.B * a.scaling for a in adapters], dim=1).to(x.dtype)  # [N, R]
        rank_start = [0]
        for a in adapters:
            rank_start.append(rank_start[-1] + a.A.shape[0])
        dropout_p = [float(a.dropout) for a in adapters]
        seeds = torch.randint(0, 2**62, (len(adapters),), dtype=torch.int64, device=x.device)
    else:
        a_cat = b_scaled = None
        rank_start, dropout_p = [0], []
        seeds = torch.empty(0, dtype=torch.int64, device=x.device)
    y = NF4LoRALinearFunction.apply(x2d, weight, bias, a_cat, b_scaled, tuple(rank_start), tuple(dropout_p), seeds)
    return y.reshape(*lead, n)  # [..., N]
