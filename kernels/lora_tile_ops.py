"""Triton helpers shared by the NF4 + LoRA kernels: the tile MMA and the LoRA dropout mask."""
import triton
import triton.language as tl

from .configs import interpreting


def upcast_dot() -> bool:
    """Value of the kernels' UPCAST_DOT flag for this process.

    Triton's interpreter (3.9) multiplies bf16 tiles as their raw uint16 bit patterns, so under
    ``TRITON_INTERPRET=1`` the operands are widened to fp32 first. bf16/fp16 -> fp32 is exact and the
    GPU's bf16 MMA forms exact products with fp32 accumulation, so both give the same sums up to
    the accumulation order.
    """
    return interpreting()


@triton.jit
def mma(a, b, acc, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a [P, Q], b [Q, S] in bf16/fp16."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def dropout_keep(seed, p, rows, col0, K, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep-mask [BLOCK_ROWS, BLOCK_COLS] of inverted dropout on a row-major [M, K] activation,
    for rows ``rows`` and columns col0 .. col0 + BLOCK_COLS (col0 a multiple of 4).

    Element (m, k) is kept iff u >= p, where u is uniform output (k % 4) of Philox(seed,
    (m*K + k) // 4). One Philox evaluation serves 4 consecutive elements (K is a multiple of 4),
    which cuts the generator's cost and registers by 4x. The mask is a pure function of
    (seed, m, k), so forward and backward regenerate it with any tiling instead of storing it.
    """
    counter = rows.to(tl.int64)[:, None] * (K // 4) + (col0 // 4 + tl.arange(0, BLOCK_COLS // 4))[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    uniform = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_ROWS, BLOCK_COLS))
    return uniform >= p
