"""Activation memory of one training step, found by replaying what the step allocates and frees.

The saved-tensor count of Korthikanti et al. 2022 (§4.1) gives what autograd keeps between the
passes; the peak of a pass also holds what exists only briefly (a layer's intermediates under
checkpointing, the gradients being formed, a norm's fp32 copies). Both come from one model: the
forward of a Llama decoder layer (Hugging Face's LlamaDecoderLayer with LoRA projections, and
this package's options) and its backward are written below as the sequence of tensors they
allocate and release, in program order, and a ``Tape`` adds up the bytes alive and keeps the
maximum. Tensors are named only for the reader; sizes are bytes for all N tokens.

What the replay follows, per op (checked op by op against the allocation trace of
``torch.profiler`` on CPU, see tests/memory/test_profile.py):
  linear, "torch" backend (qlora.ops.functional): the LoRA term s·B(A·x) (A·x, a·r, saved),
        then W0 dequantized and W0·x accumulated into it in place; backward: the base input
        gradient, d(A·x), the LoRA input gradient and their sum.
  linear, "triton" backend (qlora.ops.fused): S = A·x (saved) and the output in one launch;
        backward: G = dY·B (a·r) and dX in one launch.
  RMSNorm, Hugging Face: fp32 copy of x (saved), its square, x·r (fp32), the cast, the output.
        Compact (qlora.ops.compact_norm): the output, then per chunk of C tokens the fp32 copy,
        its square, x·r and the cast; saves x itself and r.
  Qwen3's query and key norms: as Hugging Face's RMSNorm above, over each head.
  rotary (apply_rotary_pos_emb): q·cos, -x2, cat, ·sin, the sum, for q and for k.
  tiled q/k/v (qlora.model.activation_memory.enable_tiled_qkv): the input norm (Hugging Face's),
        q, k, their rotary, v on C tokens, written into the three outputs (allocated after the
        first chunk); saves the layer input only. Backward: the input gradient, then per chunk
        the same forward under autograd and its backward (v, the rotaries, k, q, the norm).
  attention (SDPA): the output and the fp32 logsumexp (saved); the kernel's workspace (CPU:
        ATen's flash kernel's per-thread buffers; CUDA: FlashAttention-2, whose backward keeps
        an fp32 dQ accumulator and, for grouped heads, dK and dV expanded to all heads,
        flash-attention csrc/flash_attn/flash_api.cpp ``mha_bwd``).
  MLP: gate, SiLU, up, their product, down; tiled (qlora.ops.tiled): the output, then
        per chunk of C tokens the same intermediates; saves its input only.
  MoE block (transformers' Mixtral / Qwen3-MoE router, qlora.nn.experts.nf4_experts_forward):
        the router's 16-bit logits, their fp32 softmax (saved), top-k values and indices (saved),
        the renormalization by their sum (in place: autograd keeps the values before it and the
        sum); an fp32 accumulator, then per expert its token and slot indices (saved), the
        gathered rows, the expert's gate_up / SiLU·up / down on them, its routing weight and the
        fp32 weighted output added into the accumulator (index_add_ saves it; the product saves
        both factors: gradients reach the hidden states through the routing weights too, the
        router being frozen); the cast of the sum. The normalized input itself is not saved (the experts keep gathered
        copies). The replay routes every token to the same k experts, so each expert has N rows:
        the saved bytes are those of any routing (k·N rows in all), the transients those of an
        expert that receives every token, the most one can.
  the step: the decoder holds the embedding's output until it returns; checkpointed layers
        keep their input (or send it to the host) and are recomputed one at a time in the
        backward, the next checkpoint streaming in meanwhile; autograd releases an incoming
        gradient once its last consumer has run, and a saved tensor once its node has.
Not replayed: the matrix multiplications' own scratch (cuBLAS' workspace is allocated once;
oneDNN's on CPU is 40-200 KB per thread and call), and the caching allocator's rounding and
fragmentation on CUDA (the estimate counts allocated bytes, not reserved ones).
"""
from dataclasses import dataclass, replace

# Bytes per thread, besides kv rows·head_dim·a, that ATen's CPU flash-attention backward
# allocates for its block GEMMs (measured with torch.profiler, torch 2.13 on x86).
CPU_FLASH_GEMM_SCRATCH = 164992
MLP = ("gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")
EXPERTS = ("gate_up_proj", "down_proj")   # an MoE layer's fused expert weights


class Tape:
    """Bytes alive through a sequence of allocations and releases, and the most at any point."""

    def __init__(self):
        self.live = {}
        self.total = 0
        self.peak = 0

    def new(self, name: str, nbytes: int) -> None:
        if name in self.live:
            raise ValueError(f"Tape: {name!r} is already alive")
        self.live[name] = nbytes
        self.total += nbytes
        self.peak = max(self.peak, self.total)

    def drop(self, *names: str) -> None:
        for name in names:
            self.total -= self.live.pop(name)

    def has(self, name: str) -> bool:
        return name in self.live

    def rename(self, old: str, new: str) -> None:
        """The tensor ``old`` goes on under the name ``new`` (a result computed in place)."""
        self.live[new] = self.live.pop(old)

    def reset_peak(self) -> None:
        self.peak = self.total


@dataclass(frozen=True)
class Dims:
    """Sizes of one step: tokens, the layer's widths, and how it is computed."""

    tokens: int            # N = seq_len · batch
    seq_len: int
    batch: int
    a: int                 # bytes per element of the compute dtype
    h: int
    i: int
    hq: int                # num_heads · head_dim
    hkv: int               # num_kv_heads · head_dim
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rank: int
    adapted: frozenset     # projection names with LoRA
    backend: str           # "torch" or "triton"
    device: str            # "cpu" or "cuda"
    compact_norms: bool
    tiled_mlp: int         # chunk tokens, 0: off
    tiled_qkv: int         # chunk tokens of the input norm, q/k/v and rotary, 0: off
    norm_chunk: int        # tokens per chunk of the compact norm
    cpu_threads: int       # ATen's thread count (the CPU attention kernel's buffers)
    lora_copies: bool      # the adapters are cast/concatenated per call (bytes a·r·(in+out))
    experts: int = 0       # E, MoE layers only
    top_k: int = 0         # k routed experts per token
    moe_i: int = 0         # an expert's intermediate width
    router_renorm: bool = False   # the top-k weights divided by their sum (Mixtral; Qwen3's norm_topk_prob)
    router_cast: bool = False     # the routing weights cast to the compute dtype (Qwen3-MoE; Mixtral keeps fp32)
    qk_norm: bool = False         # Qwen3: RMSNorm on every head of the query and the key

    def lora_copy(self, k: int, n: int) -> int:
        return self.a * self.rank * (k + n) if self.lora_copies else 0


# ---- linear layers -------------------------------------------------------------------------------
def _dequantize(t: Tape, name: str, k: int, n: int, a: int) -> None:
    """qlora.quant.nf4's dequantize of an [n, k] weight, leaving the dense f"{name}.w" (a·n·k):
    the packed bytes as int32 indices (2 bytes per weight) and the gathered int64 value pairs (4
    bytes per weight, then the fp32 values themselves), cast to the compute dtype."""
    t.new(f"{name}.index", 2 * n * k)
    t.new(f"{name}.pairs", 4 * n * k)
    t.drop(f"{name}.index")
    if a < 4:
        t.new(f"{name}.w", a * n * k)
        t.drop(f"{name}.pairs")
    else:
        t.rename(f"{name}.pairs", f"{name}.w")


def linear_forward(t: Tape, d: Dims, name: str, k: int, n: int, rows: int, grad: bool) -> None:
    """out = W0·x (+ s·B(A·x)) on ``rows`` tokens, input alive; leaves f"{name}.out" and, when
    ``grad`` and adapted, the saved f"{name}.ax" (and the adapter copies)."""
    adapted = name.rsplit(".", 1)[-1] in d.adapted
    a, r = d.a, d.rank
    if d.backend == "triton":
        if adapted:
            t.new(f"{name}.ax", a * r * rows)
            t.new(f"{name}.copies", d.lora_copy(k, n))
        t.new(f"{name}.out", a * n * rows)
        if adapted and not grad:
            t.drop(f"{name}.ax", f"{name}.copies")
        return
    if not adapted:
        _dequantize(t, name, k, n, a)
        t.new(f"{name}.out", a * n * rows)       # W0·x
        t.drop(f"{name}.w")
        return
    # qlora.ops.functional.nf4_lora_linear: the LoRA term first (addmm with beta = 0 into a new
    # tensor, its empty first argument allocated too), then W0·x accumulated into it in place
    t.new(f"{name}.copies", d.lora_copy(k, n))
    t.new(f"{name}.ax", a * r * rows)
    t.new(f"{name}.empty", a * n * rows)
    t.new(f"{name}.out", a * n * rows)
    t.drop(f"{name}.empty")
    if not grad:
        t.drop(f"{name}.ax")
    _dequantize(t, name, k, n, a)
    t.drop(f"{name}.w")
    if not grad:
        t.drop(f"{name}.copies")


def linear_backward(t: Tape, d: Dims, name: str, k: int, n: int, rows: int, dy: str,
                    last_use=()) -> None:
    """From the gradient ``dy`` (released once used) to f"{name}.dx"; releases the saved A·x and
    copies, and the tensors in ``last_use`` (inputs this layer was the last to hold)."""
    adapted = name.rsplit(".", 1)[-1] in d.adapted
    a, r = d.a, d.rank
    if d.backend == "triton":
        if adapted:
            t.new(f"{name}.g", a * r * rows)
        t.new(f"{name}.dx", a * k * rows)
        if adapted:
            t.drop(f"{name}.g", f"{name}.ax", f"{name}.copies")
        t.drop(dy, *last_use)
        return
    if not adapted:
        _dequantize(t, name, k, n, a)
        t.new(f"{name}.dx", a * k * rows)
        t.drop(f"{name}.w", dy, *last_use)
        return
    _dequantize(t, name, k, n, a)               # the base GEMM's backward first
    t.new(f"{name}.dx_base", a * k * rows)
    t.drop(f"{name}.w")
    t.new(f"{name}.dax_mm", a * r * rows)       # addmm's backward: dY·B, then times s
    t.new(f"{name}.dax", a * r * rows)
    t.drop(f"{name}.dax_mm", dy, f"{name}.ax")
    t.new(f"{name}.dx_lora", a * k * rows)
    t.drop(f"{name}.dax", *last_use)
    t.new(f"{name}.dx", a * k * rows)           # autograd sums the two input gradients
    t.drop(f"{name}.dx_base", f"{name}.dx_lora", f"{name}.copies")


# ---- RMSNorm -------------------------------------------------------------------------------------
def norm_forward(t: Tape, d: Dims, name: str, grad: bool, width: int = 0, groups: int = 1,
                 compact: bool = None) -> None:
    """f"{name}.out" (a·h) from the input; when ``grad``, the saved tensors stay (HF: the fp32
    copy and r; compact: r, the input being kept by the caller's name). Qwen3's query and key
    norms: ``width`` elements per token in ``groups`` heads, never compact."""
    a, h, N = d.a, width or d.h, d.tokens
    if d.compact_norms if compact is None else compact:
        c = min(N, d.norm_chunk)
        t.new(f"{name}.out", a * h * N)
        t.new(f"{name}.rstd", 4 * N)
        t.new(f"{name}.xf", 4 * h * c if a < 4 else 0)
        t.new(f"{name}.sq", 4 * h * c)
        t.drop(f"{name}.sq")
        t.new(f"{name}.xr", 4 * h * c)
        t.new(f"{name}.cast", a * h * c if a < 4 else 0)
        t.drop(f"{name}.cast", f"{name}.xr", f"{name}.xf")
        if not grad:
            t.drop(f"{name}.rstd")
        return
    t.new(f"{name}.xf", 4 * h * N if a < 4 else 0)
    t.new(f"{name}.sq", 4 * h * N)
    t.drop(f"{name}.sq")
    t.new(f"{name}.rstd", 4 * N * groups)
    t.new(f"{name}.xr", 4 * h * N)
    if not grad:
        t.drop(f"{name}.xf")
    t.new(f"{name}.cast", a * h * N if a < 4 else 0)
    t.new(f"{name}.out", a * h * N)
    t.drop(f"{name}.cast", f"{name}.xr")
    if not grad:
        t.drop(f"{name}.rstd")


def norm_backward(t: Tape, d: Dims, name: str, dy: str, width: int = 0, compact: bool = None) -> None:
    """From the gradient ``dy`` (released once used) to f"{name}.dx" (a·h, or a·width); releases
    what the forward saved."""
    a, h, N = d.a, width or d.h, d.tokens
    if d.compact_norms if compact is None else compact:
        c = min(N, d.norm_chunk)
        t.new(f"{name}.dx", a * h * N)
        t.new(f"{name}.x_hat", 4 * h * c)
        t.new(f"{name}.dyw", a * h * c if a < 4 else 0)
        t.new(f"{name}.g", 4 * h * c)
        t.drop(f"{name}.dyw")
        t.new(f"{name}.gx", 4 * h * c)
        t.drop(f"{name}.gx", f"{name}.g", f"{name}.x_hat", f"{name}.rstd", dy)
        return
    # weight·cast(x·r): d(cast) = dY·w; ToCopy to fp32; x·r: dx1 = d·r and d·x for dr; mean of
    # squares: its expanded gradient, then PowBackward's x², 2x·g and their product; the two fp32
    # parts are summed in place; ToCopy back to the input dtype.
    cast = a < 4
    t.new(f"{name}.dcast", a * h * N)
    t.drop(dy)
    t.new(f"{name}.dxr", 4 * h * N if cast else 0)
    t.drop(f"{name}.dcast")
    t.new(f"{name}.dx1", 4 * h * N)
    t.new(f"{name}.dr_terms", 4 * h * N)
    t.drop(f"{name}.dr_terms", f"{name}.dxr")
    t.new(f"{name}.dmean", 4 * h * N)
    t.new(f"{name}.pow1", 4 * h * N)
    t.new(f"{name}.pow2", 4 * h * N)
    t.new(f"{name}.dpow", 4 * h * N)
    t.drop(f"{name}.pow1", f"{name}.pow2", f"{name}.dmean", f"{name}.dpow", f"{name}.rstd")
    if cast:
        t.new(f"{name}.dx", a * h * N)
        t.drop(f"{name}.dx1")
    else:
        t.rename(f"{name}.dx1", f"{name}.dx")
    t.drop(f"{name}.xf")


def norm_keeps_input(d: Dims) -> bool:
    """Whether a norm recorded for backward holds on to its input tensor itself (compact norms;
    Hugging Face's when the input is already fp32, as its upcast is then the input)."""
    return d.compact_norms or d.a == 4


def layer_keeps_input(d: Dims, x_grad: bool) -> bool:
    """Whether a decoder layer recorded for backward holds on to its input tensor: the tiled
    q/k/v saves it whenever it records (the input or a q/k/v adapter needs a gradient), else
    the input norm may (``norm_keeps_input``)."""
    if d.tiled_qkv:
        return x_grad or bool(d.adapted & set(QKV))
    return x_grad and norm_keeps_input(d)


# ---- attention -----------------------------------------------------------------------------------
def _flash_cpu_splits(d: Dims) -> tuple:
    """(q rows, kv rows) per block of ATen's CPU flash attention kernel."""
    s = d.seq_len
    q_split = 256 if s >= 768 else 64 if s >= 192 else 32
    return min(q_split, s), min(512, s)


def attention_workspace_forward(d: Dims) -> int:
    """Bytes the attention kernel allocates and frees inside its forward."""
    if d.device != "cpu":
        return 0  # FlashAttention-2 forward: output and logsumexp only
    qs, kvs = _flash_cpu_splits(d)
    per_thread = 4 * (qs * kvs + 2 * qs + qs * d.head_dim) + (d.a * qs * kvs if d.a < 4 else 0)
    return d.cpu_threads * per_thread


def sdpa_forward(t: Tape, d: Dims, name: str, grad: bool) -> None:
    """out (a·hq) and the fp32 logsumexp from q, k, v (alive)."""
    N = d.tokens
    t.new(f"{name}.out", d.a * d.hq * N)
    t.new(f"{name}.lse", 4 * d.heads * N)
    t.new(f"{name}.workspace", attention_workspace_forward(d))
    t.drop(f"{name}.workspace")
    if not grad:
        t.drop(f"{name}.lse")


def sdpa_backward(t: Tape, d: Dims, name: str) -> None:
    """dq, dk, dv from dOut (alive); releases the logsumexp."""
    a, N = d.a, d.tokens
    t.new(f"{name}.dq", a * d.hq * N)
    t.new(f"{name}.dk", a * d.hkv * N)
    t.new(f"{name}.dv", a * d.hkv * N)
    if d.device == "cpu":
        # per thread: fp32 scores and their gradient for one block, their 16-bit copies, and the
        # block GEMMs' scratch (measured: 164992 + kv rows·head_dim·a bytes, torch 2.13 on x86)
        qs, kvs = _flash_cpu_splits(d)
        t.new(f"{name}.workspace", d.cpu_threads * 2 * qs * kvs * (4 + (a if a < 4 else 0)))
        t.new(f"{name}.gemm_scratch", d.cpu_threads * (CPU_FLASH_GEMM_SCRATCH + kvs * d.head_dim * a))
        t.drop(f"{name}.gemm_scratch", f"{name}.workspace")
    else:
        # FlashAttention-2 mha_bwd: fp32 softmax_d [b, heads, s] and dq_accum [b, s, heads, d]
        # (seq rounded to 128), and for grouped heads dk, dv expanded to every head then summed.
        rounded = -(-d.seq_len // 128) * 128 * d.batch
        t.new(f"{name}.softmax_d", 4 * d.heads * rounded)
        t.new(f"{name}.dq_accum", 4 * d.hq * rounded)
        if d.kv_heads != d.heads:
            t.new(f"{name}.dk_expanded", a * d.hq * N)
            t.new(f"{name}.dv_expanded", a * d.hq * N)
            t.drop(f"{name}.dk_expanded", f"{name}.dv_expanded")
        t.drop(f"{name}.softmax_d", f"{name}.dq_accum")
    t.drop(f"{name}.lse")


def rope_forward(t: Tape, d: Dims, name: str, width: int) -> None:
    """Hugging Face's x·cos + rotate_half(x)·sin: leaves f"{name}.out" (the input stays the
    caller's)."""
    w = d.a * width * d.tokens
    t.new(f"{name}.cos", w)
    t.new(f"{name}.neg", w // 2)
    t.new(f"{name}.cat", w)
    t.drop(f"{name}.neg")
    t.new(f"{name}.sin", w)
    t.drop(f"{name}.cat")
    t.new(f"{name}.out", w)
    t.drop(f"{name}.cos", f"{name}.sin")


def rope_backward(t: Tape, d: Dims, name: str, width: int, dy: str, relayout: bool = True) -> None:
    """From the gradient ``dy`` (released once used) to f"{name}.dx" in the projection's
    layout (``relayout``: [b, heads, s, d] back to [b, s, heads·d], a copy; else a view)."""
    w = d.a * width * d.tokens
    t.new(f"{name}.drot", w)
    t.new(f"{name}.dneg", w // 2)
    t.new(f"{name}.dslice1", w)
    t.drop(f"{name}.dneg")
    t.new(f"{name}.dslice2", w)
    t.drop(f"{name}.dslice2", f"{name}.drot")   # summed into dslice1
    t.new(f"{name}.dcos", w)
    t.drop(f"{name}.dcos", dy)
    if relayout:
        t.new(f"{name}.dx", w)
        t.drop(f"{name}.dslice1")
    else:
        t.rename(f"{name}.dslice1", f"{name}.dx")


# ---- tiled q/k/v ---------------------------------------------------------------------------------
def _qkv_chunk_forward(t: Tape, d: Dims, name: str, rows: int, grad: bool, x_grad: bool) -> None:
    """The input norm, q, k, their rotary and v on ``rows`` tokens: leaves f"{name}.q",
    f"{name}.k" (rotated) and f"{name}.v" and, when ``grad``, what their backward needs
    (``x_grad``: the chunk's input needs a gradient)."""
    dc = replace(d, tokens=rows)
    norm_forward(t, dc, f"{name}.ln1", grad and x_grad, compact=False)
    for proj, width in (("q_proj", d.hq), ("k_proj", d.hkv)):
        linear_forward(t, d, f"{name}.{proj}", d.h, width, rows, grad and (x_grad or proj in d.adapted))
    rope_forward(t, dc, f"{name}.qrope", d.hq)
    rope_forward(t, dc, f"{name}.krope", d.hkv)
    t.drop(f"{name}.q_proj.out", f"{name}.k_proj.out")
    t.rename(f"{name}.qrope.out", f"{name}.q")
    t.rename(f"{name}.krope.out", f"{name}.k")
    v_grad = grad and (x_grad or "v_proj" in d.adapted)
    linear_forward(t, d, f"{name}.v_proj", d.h, d.hkv, rows, v_grad)
    t.rename(f"{name}.v_proj.out", f"{name}.v")
    if not (grad and d.adapted & set(QKV)):   # LoRA's dA needs the normalized rows
        t.drop(f"{name}.ln1.out")


def qkv_forward(t: Tape, d: Dims, L: str) -> None:
    """The tiled q/k/v of layer L: leaves f"{L}.qrope.out", f"{L}.krope.out", f"{L}.v_proj.out"
    for all N tokens; the chunks keep nothing."""
    N, a = d.tokens, d.a
    c = min(N, d.tiled_qkv)
    name = f"{L}.qkv"
    _qkv_chunk_forward(t, d, name, c, grad=False, x_grad=False)
    for full, width in (("qrope.out", d.hq), ("krope.out", d.hkv), ("v_proj.out", d.hkv)):
        t.new(f"{L}.{full}", a * width * N)
    t.drop(f"{name}.q", f"{name}.k", f"{name}.v")
    if N > c:  # the other chunks: the same, written into the outputs
        _qkv_chunk_forward(t, d, name, c, grad=False, x_grad=False)
        t.drop(f"{name}.q", f"{name}.k", f"{name}.v")


def qkv_backward(t: Tape, d: Dims, L: str, x_grad: bool) -> None:
    """From the attention's dq, dk, dv (released here) to f"{L}.qkv.dx" (when ``x_grad``): per
    chunk the forward again under autograd, then its backward (autograd's order: v, the rotary
    of k, of q, then k, q and the norm)."""
    N, a, h = d.tokens, d.a, d.h
    c = min(N, d.tiled_qkv)
    name = f"{L}.qkv.chunk"
    dc = replace(d, tokens=c)
    if x_grad:
        t.new(f"{L}.qkv.dx", a * h * N)
    for g in ("dq", "dk", "dv"):
        t.new(f"{name}.{g}", 0)  # rows of the incoming gradients
    _qkv_chunk_forward(t, d, name, c, grad=True, x_grad=x_grad)
    normed = (f"{name}.ln1.out",) if t.has(f"{name}.ln1.out") else ()
    linear_backward(t, d, f"{name}.v_proj", h, d.hkv, c, f"{name}.dv")
    t.drop(f"{name}.v")
    rope_backward(t, dc, f"{name}.krope", d.hkv, f"{name}.dk", relayout=False)
    rope_backward(t, dc, f"{name}.qrope", d.hq, f"{name}.dq", relayout=False)
    t.drop(f"{name}.q", f"{name}.k")
    linear_backward(t, d, f"{name}.k_proj", h, d.hkv, c, f"{name}.krope.dx")
    t.new(f"{name}.dsum", a * h * c)
    t.drop(f"{name}.v_proj.dx", f"{name}.k_proj.dx")
    linear_backward(t, d, f"{name}.q_proj", h, d.hq, c, f"{name}.qrope.dx", last_use=normed)
    t.new(f"{name}.dnormed", a * h * c)
    t.drop(f"{name}.dsum", f"{name}.q_proj.dx")
    if x_grad:
        norm_backward(t, dc, f"{name}.ln1", f"{name}.dnormed", compact=False)
        t.drop(f"{name}.ln1.dx")   # written into the input gradient
    else:
        t.drop(f"{name}.dnormed")
    t.drop(f"{L}.sdpa.dq", f"{L}.sdpa.dk", f"{L}.sdpa.dv")


# ---- MLP -----------------------------------------------------------------------------------------
def _mlp_forward(t: Tape, d: Dims, name: str, rows: int, grad: bool) -> None:
    """down(silu(gate(x)) · up(x)) on ``rows`` tokens; leaves f"{name}.down.out" (a·h), and when
    ``grad`` what backward needs (gate, SiLU output, up, their product, the A·x)."""
    a, h, i = d.a, d.h, d.i
    linear_forward(t, d, f"{name}.gate_proj", h, i, rows, grad)
    t.new(f"{name}.act", a * i * rows)
    if not grad:
        t.drop(f"{name}.gate_proj.out")
    linear_forward(t, d, f"{name}.up_proj", h, i, rows, grad)
    t.new(f"{name}.prod", a * i * rows)
    if not grad:
        t.drop(f"{name}.act", f"{name}.up_proj.out")
    linear_forward(t, d, f"{name}.down_proj", i, h, rows, grad)
    if not grad:
        t.drop(f"{name}.prod")


def _mlp_backward(t: Tape, d: Dims, name: str, rows: int, x: str, dy: str) -> None:
    """From the gradient ``dy`` of its output to f"{name}.dx" (a·h); releases the MLP's saved
    tensors and its input ``x`` (held by the gate and up projections)."""
    a, h, i = d.a, d.h, d.i
    linear_backward(t, d, f"{name}.down_proj", i, h, rows, dy, last_use=(f"{name}.prod",))
    t.new(f"{name}.dact", a * i * rows)
    t.new(f"{name}.dup", a * i * rows)
    t.drop(f"{name}.down_proj.dx", f"{name}.act", f"{name}.up_proj.out")
    linear_backward(t, d, f"{name}.up_proj", h, i, rows, f"{name}.dup")
    t.new(f"{name}.dgate", a * i * rows)
    t.drop(f"{name}.dact", f"{name}.gate_proj.out")
    linear_backward(t, d, f"{name}.gate_proj", h, i, rows, f"{name}.dgate", last_use=(x,))
    t.new(f"{name}.dx", a * h * rows)
    t.drop(f"{name}.up_proj.dx", f"{name}.gate_proj.dx")


def mlp_forward(t: Tape, d: Dims, name: str, grad: bool) -> None:
    """The MLP of a layer on its input f"{name}.x" (alive): leaves f"{name}.out"; tiled, it runs
    chunk by chunk and keeps only its input for backward."""
    N, a, h = d.tokens, d.a, d.h
    if not d.tiled_mlp:
        _mlp_forward(t, d, name, N, grad)
        t.rename(f"{name}.down_proj.out", f"{name}.out")
        return
    c = min(N, d.tiled_mlp)
    _mlp_forward(t, d, f"{name}.chunk", c, grad=False)
    t.new(f"{name}.out", a * h * N)
    t.drop(f"{name}.chunk.down_proj.out")
    if N > c:  # the other chunks: the same, written into the output
        _mlp_forward(t, d, f"{name}.chunk", c, grad=False)
        t.drop(f"{name}.chunk.down_proj.out")


def mlp_backward(t: Tape, d: Dims, name: str, dy: str) -> None:
    """From the gradient ``dy`` of its output (not released: the residual branch holds it too)
    to f"{name}.dx"; releases f"{name}.x" where the MLP held it."""
    N, a, h = d.tokens, d.a, d.h
    t.new(f"{name}.dy", 0)  # the same tensor as dy, for the MLP's nodes
    if not d.tiled_mlp:
        _mlp_backward(t, d, name, N, f"{name}.x", f"{name}.dy")
        return
    c = min(N, d.tiled_mlp)
    t.new(f"{name}.dx", a * h * N)
    t.new(f"{name}.chunk.x", 0)  # a view of the input
    t.new(f"{name}.chunk.dy", 0)
    _mlp_forward(t, d, f"{name}.chunk", c, grad=True)
    t.drop(f"{name}.chunk.down_proj.out")
    _mlp_backward(t, d, f"{name}.chunk", c, f"{name}.chunk.x", f"{name}.chunk.dy")
    t.drop(f"{name}.chunk.dx", f"{name}.x", f"{name}.dy")


# ---- MoE block -----------------------------------------------------------------------------------
def moe_forward(t: Tape, d: Dims, name: str, grad: bool) -> None:
    """The sparse MoE block on f"{name}.x" (alive, released here: nothing saves it): leaves
    f"{name}.out" and, when ``grad``, what backward needs. See the module docstring."""
    N, a, h, E, k, im = d.tokens, d.a, d.h, d.experts, d.top_k, d.moe_i
    wb = a if d.router_cast else 4       # bytes of a routing weight
    t.new(f"{name}.logits", a * E * N)
    t.new(f"{name}.logits32", 4 * E * N)   # Mixtral's .float(), Qwen3's softmax(dtype=float)
    t.new(f"{name}.probs", 4 * E * N)
    t.drop(f"{name}.logits32")
    t.new(f"{name}.values", 4 * k * N)
    t.new(f"{name}.index", 8 * k * N)
    t.drop(f"{name}.logits")             # the block discards the gate's logits
    if d.router_renorm:
        t.new(f"{name}.sum", 4 * N)
        t.new(f"{name}.values_before", 4 * k * N)
    if d.router_cast:
        t.new(f"{name}.weights", a * k * N)
        t.drop(f"{name}.values")
    else:
        t.rename(f"{name}.values", f"{name}.weights")
    t.new(f"{name}.acc", 4 * h * N)
    for e in range(k):
        ex = f"{name}.e{e}"
        t.new(f"{ex}.where", 16 * N)     # int64 token and slot of each routed row
        t.new(f"{ex}.x", a * h * N)
        linear_forward(t, d, f"{ex}.gate_up_proj", h, 2 * im, N, grad)
        if not (grad and "gate_up_proj" in d.adapted):   # only LoRA's dA needs the rows
            t.drop(f"{ex}.x")
        t.new(f"{ex}.act", a * im * N)   # SiLU of the gate half; the up half is a view
        t.new(f"{ex}.prod", a * im * N)
        if not grad:
            t.drop(f"{ex}.act", f"{ex}.gate_up_proj.out")
        linear_forward(t, d, f"{ex}.down_proj", im, h, N, grad)
        if not grad:
            t.drop(f"{ex}.prod")
        t.new(f"{ex}.w", wb * N)         # weights[token, slot]
        if d.router_cast:                # 16-bit product, then .float()
            t.new(f"{ex}.yw", a * h * N)
            t.new(f"{ex}.yw32", 4 * h * N)
            t.drop(f"{ex}.yw")
        else:                            # bf16 · fp32 promotes
            t.new(f"{ex}.yw32", 4 * h * N)
        # index_add_ into the accumulator, which saves its source (the shape of its gradient)
        if not grad:
            t.drop(f"{ex}.yw32", f"{ex}.where", f"{ex}.w", f"{ex}.down_proj.out")
    t.new(f"{name}.out", a * h * N)
    t.drop(f"{name}.acc", f"{name}.weights", f"{name}.x")
    if not grad:
        t.drop(f"{name}.probs", f"{name}.index")
        if d.router_renorm:
            t.drop(f"{name}.sum", f"{name}.values_before")


def _accumulate(t: Tape, into: str, new: str) -> None:
    """Autograd's gradient buffer: the first contribution becomes it, later ones are added in
    place and released."""
    if t.has(into):
        t.drop(new)
    else:
        t.rename(new, into)


def moe_backward(t: Tape, d: Dims, name: str, dy: str) -> None:
    """From the gradient ``dy`` of the block's output (not released: the residual branch holds it
    too) to f"{name}.dx"; releases the block's saved tensors."""
    N, a, h, E, k, im = d.tokens, d.a, d.h, d.experts, d.top_k, d.moe_i
    wb = a if d.router_cast else 4
    t.new(f"{name}.dacc", 4 * h * N)     # the cast's backward
    for e in reversed(range(k)):
        ex = f"{name}.e{e}"
        t.new(f"{ex}.dyw32", 4 * h * N)  # index_add_'s backward: the expert's rows
        t.drop(f"{ex}.yw32")
        g = f"{ex}.dyw32"
        if d.router_cast:
            t.new(f"{ex}.dyw", a * h * N)
            t.drop(g)
            g = f"{ex}.dyw"
        # the product's backward: g·w into the output's dtype, Σ_h g·y for the weight
        t.new(f"{ex}.gw", wb * h * N)
        if not d.router_cast:
            t.new(f"{ex}.dy", a * h * N)
            t.drop(f"{ex}.gw")
        else:
            t.rename(f"{ex}.gw", f"{ex}.dy")
        t.new(f"{ex}.gy", wb * h * N)
        t.new(f"{ex}.dw", wb * N)
        t.drop(f"{ex}.gy", g, f"{ex}.down_proj.out", f"{ex}.w")
        t.new(f"{ex}.dweights", wb * k * N)   # the gather's backward: zeros [N, k], rows put in
        t.drop(f"{ex}.dw")
        _accumulate(t, f"{name}.dweights", f"{ex}.dweights")
        linear_backward(t, d, f"{ex}.down_proj", im, h, N, f"{ex}.dy", last_use=(f"{ex}.prod",))
        t.new(f"{ex}.dact", a * im * N)
        t.new(f"{ex}.dup", a * im * N)
        t.drop(f"{ex}.down_proj.dx", f"{ex}.act")
        t.new(f"{ex}.dgate", a * im * N)
        t.drop(f"{ex}.dact")
        t.new(f"{ex}.dgate_up", 2 * a * im * N)   # chunk's backward: the halves joined
        t.drop(f"{ex}.dgate", f"{ex}.dup", f"{ex}.gate_up_proj.out")
        held = (f"{ex}.x",) if t.has(f"{ex}.x") else ()
        linear_backward(t, d, f"{ex}.gate_up_proj", h, 2 * im, N, f"{ex}.dgate_up", last_use=held)
        t.new(f"{ex}.dx", a * h * N)     # the row gather's backward: zeros [N, h], rows put in
        t.drop(f"{ex}.gate_up_proj.dx", f"{ex}.where")
        _accumulate(t, f"{name}.dx", f"{ex}.dx")
    t.drop(f"{name}.dacc")
    dv = f"{name}.dweights"
    if d.router_cast:                    # back through the cast to fp32
        t.new(f"{name}.dvalues_cast", 4 * k * N)
        t.drop(dv)
        dv = f"{name}.dvalues_cast"
    if d.router_renorm:                  # d/sum, and −Σ d·values/sum² through the sum
        t.new(f"{name}.dvalues", 4 * k * N)
        t.new(f"{name}.dsum_terms", 4 * k * N)
        t.new(f"{name}.dsum", 4 * N)
        t.drop(f"{name}.dsum_terms", dv, f"{name}.values_before", f"{name}.sum")
        t.drop(f"{name}.dsum")           # expanded and added into dvalues in place
        dv = f"{name}.dvalues"
    t.new(f"{name}.dprobs", 4 * E * N)   # top-k's backward: zeros [N, E], values put in
    t.drop(dv, f"{name}.index")
    t.new(f"{name}.dlogits32", 4 * E * N)
    t.drop(f"{name}.dprobs", f"{name}.probs")
    t.new(f"{name}.dlogits", a * E * N if a < 4 else 0)
    t.drop(f"{name}.dlogits32")
    t.new(f"{name}.drouter", a * h * N)  # through the frozen router weight
    t.drop(f"{name}.dlogits")
    _accumulate(t, f"{name}.dx", f"{name}.drouter")


# ---- a decoder layer -----------------------------------------------------------------------------
def _qkv_forward(t: Tape, d: Dims, L: str, grad: bool, x_grad: bool, attention_grad: bool) -> None:
    """The input norm, q/k/v projections and rotary of layer L, untiled: leaves
    f"{L}.qrope.out", f"{L}.krope.out", f"{L}.v_proj.out" and what their backward needs."""
    h = d.h
    norm_forward(t, d, f"{L}.ln1", grad and x_grad)
    x_in = f"{L}.ln1.out"
    for proj, width in (("q_proj", d.hq), ("k_proj", d.hkv), ("v_proj", d.hkv)):
        linear_forward(t, d, f"{L}.{proj}", h, width, d.tokens, grad and (x_grad or proj in d.adapted))
    if not (grad and d.adapted & set(QKV)):
        t.drop(x_in)
    rope_in = (f"{L}.q_proj.out", f"{L}.k_proj.out")
    if d.qk_norm:  # Qwen3: RMSNorm over each head of the query and the key, before the rotary
        for proj, width, heads in (("q_proj", d.hq, d.heads), ("k_proj", d.hkv, d.kv_heads)):
            norm_forward(t, d, f"{L}.{proj}.norm", attention_grad, width, heads, compact=False)
            if not (attention_grad and d.a == 4):   # in fp32 the norm saves its input itself
                t.drop(f"{L}.{proj}.out")
        rope_in = (f"{L}.q_proj.norm.out", f"{L}.k_proj.norm.out")
    rope_forward(t, d, f"{L}.qrope", d.hq)
    rope_forward(t, d, f"{L}.krope", d.hkv)
    t.drop(*rope_in)


def layer_forward(t: Tape, d: Dims, L: str, grad: bool, x_grad: bool, moe: bool = False) -> None:
    """LlamaDecoderLayer on f"{L}.x" (alive, the caller's): leaves f"{L}.out" and, when ``grad``,
    everything its backward needs. ``x_grad``: the input requires a gradient. ``moe``: the MLP
    is the sparse MoE block."""
    a, h, N = d.a, d.h, d.tokens
    qkv_trained = bool(d.adapted & set(QKV))
    attention_grad = grad and (x_grad or qkv_trained)
    if d.tiled_qkv:
        qkv_forward(t, d, L)
    else:
        _qkv_forward(t, d, L, grad, x_grad, attention_grad)
    sdpa_forward(t, d, f"{L}.sdpa", attention_grad)
    if not attention_grad:
        t.drop(f"{L}.qrope.out", f"{L}.krope.out", f"{L}.v_proj.out")
    o_grad = grad and (attention_grad or "o_proj" in d.adapted)
    linear_forward(t, d, f"{L}.o_proj", d.hq, h, N, o_grad)
    if not (attention_grad or (o_grad and "o_proj" in d.adapted)):
        t.drop(f"{L}.sdpa.out")
    t.new(f"{L}.h1", a * h * N)
    t.drop(f"{L}.o_proj.out")
    mlp_grad = grad and (attention_grad or o_grad)
    norm_forward(t, d, f"{L}.ln2", mlp_grad)
    t.rename(f"{L}.ln2.out", f"{L}.mlp.x")
    mlp_trained = bool(d.adapted & set(MLP + EXPERTS))
    if moe:
        moe_forward(t, d, f"{L}.mlp", grad and (mlp_grad or mlp_trained))
    else:
        mlp_forward(t, d, f"{L}.mlp", grad and (mlp_grad or mlp_trained))
        if not (grad and (mlp_grad or mlp_trained)):
            t.drop(f"{L}.mlp.x")
    t.new(f"{L}.out", a * h * N)
    t.drop(f"{L}.mlp.out")
    if not (mlp_grad and norm_keeps_input(d)):
        t.drop(f"{L}.h1")


def layer_backward(t: Tape, d: Dims, L: str, x_grad: bool, moe: bool = False) -> None:
    """From f"{L}.dout" (alive) to f"{L}.dx" (when ``x_grad``); releases every tensor the
    forward saved, and the incoming gradient."""
    a, h, N = d.a, d.h, d.tokens
    (moe_backward if moe else mlp_backward)(t, d, f"{L}.mlp", f"{L}.dout")
    norm_backward(t, d, f"{L}.ln2", f"{L}.mlp.dx")
    t.new(f"{L}.dh1", a * h * N)                   # dout + the MLP branch's gradient
    t.drop(f"{L}.ln2.dx", f"{L}.dout")
    if t.has(f"{L}.h1"):
        t.drop(f"{L}.h1")
    o_inputs = () if t.has(f"{L}.sdpa.lse") else (f"{L}.sdpa.out",)
    t.new(f"{L}.o_proj.dy", 0)  # dh1, which the residual branch holds too
    linear_backward(t, d, f"{L}.o_proj", d.hq, h, N, f"{L}.o_proj.dy", last_use=o_inputs)
    if t.has(f"{L}.sdpa.lse"):
        sdpa_backward(t, d, f"{L}.sdpa")
        t.drop(f"{L}.o_proj.dx", f"{L}.sdpa.out", f"{L}.qrope.out", f"{L}.krope.out",
               f"{L}.v_proj.out")
        if d.tiled_qkv:
            qkv_backward(t, d, L, x_grad)
            if x_grad:
                t.new(f"{L}.dx", a * h * N)        # dh1 + the attention branch's gradient
                t.drop(f"{L}.qkv.dx")
            t.drop(f"{L}.dh1")
            return
        rope_backward(t, d, f"{L}.krope", d.hkv, f"{L}.sdpa.dk")
        rope_backward(t, d, f"{L}.qrope", d.hq, f"{L}.sdpa.dq")
        dk, dq = f"{L}.krope.dx", f"{L}.qrope.dx"
        if d.qk_norm:
            for proj, width in (("k_proj", d.hkv), ("q_proj", d.hq)):
                norm_backward(t, d, f"{L}.{proj}.norm", f"{L}.{proj[0]}rope.dx", width, compact=False)
                if t.has(f"{L}.{proj}.out"):
                    t.drop(f"{L}.{proj}.out")
            dk, dq = f"{L}.k_proj.norm.dx", f"{L}.q_proj.norm.dx"
        normed = f"{L}.ln1.out"
        held = [p for p in ("v_proj", "k_proj", "q_proj") if p in d.adapted]
        grads = []
        for proj, dy, width in (("v_proj", f"{L}.sdpa.dv", d.hkv), ("k_proj", dk, d.hkv),
                                ("q_proj", dq, d.hq)):
            last = (normed,) if held and proj == held[-1] and t.has(normed) else ()
            linear_backward(t, d, f"{L}.{proj}", h, width, N, dy, last_use=last)
            grads.append(f"{L}.{proj}.dx")
            if len(grads) == 2:                    # autograd sums the branches as they arrive
                t.new(f"{L}.dsum", a * h * N)
                t.drop(*grads)
                t.rename(f"{L}.dsum", f"{L}.dnormed")
                grads = [f"{L}.dnormed"]
        if x_grad:
            norm_backward(t, d, f"{L}.ln1", f"{L}.dnormed")
            t.new(f"{L}.dx", a * h * N)            # dh1 + the attention branch's gradient
            t.drop(f"{L}.ln1.dx", f"{L}.dh1")
        else:
            t.drop(f"{L}.dnormed", f"{L}.dh1")
    else:
        t.drop(f"{L}.o_proj.dx", f"{L}.dh1")


# ---- the step ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepMemory:
    """Bytes of activations over one step (device unless said), all for N tokens."""

    saved: int               # alive from the end of the forward to the start of the backward
    loss_saved: int          # the part of ``saved`` the loss keeps
    forward_peak: int        # most alive during the forward, over its start
    backward_peak: int       # most alive during the backward, over its start (LoRA grads included)
    offloaded: int           # checkpoints in host memory
    recomputed_layer: int    # what one recomputed layer keeps for its backward (checkpointing)
    checkpoint_in_flight: int  # offloaded checkpoints back on the device during the backward
    grads: int               # LoRA gradients (their dtype), formed during the backward


def _rotary(t: Tape, d: Dims) -> None:
    """LlamaRotaryEmbedding: fp32 frequencies, cos and sin, scaled, cast: leaves cos and sin."""
    s, hd, a = d.seq_len, d.head_dim, d.a
    t.new("rot.freqs", 2 * hd * s)
    t.new("rot.emb", 4 * hd * s)
    for f in ("cos", "sin"):
        t.new(f"rot.{f}_raw", 4 * hd * s)
        t.new(f"rot.{f}32", 4 * hd * s)
        t.drop(f"rot.{f}_raw")
    for f in ("cos", "sin"):
        if a < 4:
            t.new(f"rot.{f}", a * hd * s)
            t.drop(f"rot.{f}32")
        else:
            t.rename(f"rot.{f}32", f"rot.{f}")
    t.drop("rot.emb", "rot.freqs")


def _loss_forward(t: Tape, d: Dims, loss: str, chunk: int) -> None:
    """The loss on the final hidden states "final.out" (released here): what stays is saved."""
    a, h, V, N = d.a, d.h, d.vocab, d.tokens
    if loss == "chunked":
        t.new("loss.d_hidden", a * h * N)
        t.new("loss.rows", 4 * N)
        t.new("loss.labels_ok", N)
        t.drop("loss.labels_ok")
        c = min(N, chunk)
        t.new("loss.logits", a * V * c)
        t.new("loss.chunk_rows", 4 * c)
        t.drop("loss.logits", "loss.chunk_rows", "loss.rows", "final.out")
        return
    # the training loop's LossModule on the torch backend: the logits, their fp32 upcast (the
    # 16-bit logits go), log_softmax (saved); the labels are the batch's, already shifted
    t.new("loss.logits", a * V * N)
    if a < 4:
        t.new("loss.upcast", 4 * V * N)
        t.drop("loss.logits")
        t.rename("loss.upcast", "loss.logits")
    t.new("loss.log_softmax", 4 * V * N)
    t.drop("loss.logits", "final.out")


def _loss_backward(t: Tape, d: Dims, loss: str) -> None:
    """From the loss to "final.dout" (a·h)."""
    a, h, V, N = d.a, d.h, d.vocab, d.tokens
    if loss == "chunked":
        t.new("final.dout", a * h * N)
        t.drop("loss.d_hidden")
        return
    t.new("loss.dnll", 4 * V * N)
    t.new("loss.dlsm", 4 * V * N)
    t.drop("loss.dnll", "loss.log_softmax")
    t.new("loss.dlogits", a * V * N if a < 4 else 0)
    t.drop("loss.dlsm")
    t.new("final.dout", a * h * N)
    t.drop("loss.dlogits")


def step_memory(d: Dims, layers: int, *, checkpointing: bool, offload: bool, loss: str,
                loss_chunk: int, lora_grad_bytes: list, moe_layers=frozenset()) -> StepMemory:
    """Replay the forward and backward of a step; see the module docstring. lora_grad_bytes:
    the LoRA gradients of each layer; moe_layers: the indices of the layers whose MLP is the
    sparse MoE block."""
    a, h, N = d.a, d.h, d.tokens
    t = Tape()
    offloaded = 0
    t.new("0.x", a * h * N)                  # the embedding's output
    _rotary(t, d)
    # The decoder's forward holds the embedding's output (its `inputs_embeds`) until it returns.
    t.rename("0.x", "embeds")
    t.new("0.x", 0)
    for k in range(layers):
        L = str(k)
        if checkpointing:
            layer_forward(t, d, L, grad=False, x_grad=False, moe=k in moe_layers)
            if offload:
                offloaded += a * h * N
                t.drop(f"{L}.x")
            t.rename(f"{L}.out", f"{k + 1}.x")
            continue
        layer_forward(t, d, L, grad=True, x_grad=k > 0, moe=k in moe_layers)
        if not layer_keeps_input(d, x_grad=k > 0):
            t.drop(f"{L}.x")
        t.rename(f"{L}.out", f"{k + 1}.x")
    last = f"{layers}.x"
    norm_forward(t, d, "final", grad=True)
    if not norm_keeps_input(d):
        t.drop(last)
    if t.has("0.x") and not offload:    # layer 0's checkpoint: the embedding's output itself
        t.drop("0.x")
        t.rename("embeds", "0.x")
    else:
        t.drop("embeds")
    _loss_forward(t, d, loss, loss_chunk)
    saved, forward_peak = t.total, t.peak
    loss_saved = sum(n for name, n in t.live.items() if name.startswith("loss."))

    t.reset_peak()
    start = t.total
    _loss_backward(t, d, loss)
    norm_backward(t, d, "final", "final.dout")
    if t.has(last):
        t.drop(last)
    t.rename("final.dx", f"{layers - 1}.dout")
    recomputed = in_flight = 0
    for k in reversed(range(layers)):
        L = str(k)
        if checkpointing:
            if offload:
                if not t.has(f"{L}.x"):
                    t.new(f"{L}.x", a * h * N)
                if k > 0:  # the previous layer's checkpoint streams in during this recompute
                    t.new(f"{k - 1}.x", a * h * N)
                in_flight = max(in_flight, (2 if k > 0 else 1) * a * h * N)
            before = t.total
            layer_forward(t, d, L, grad=True, x_grad=k > 0, moe=k in moe_layers)
            t.drop(f"{L}.out")
            recomputed = max(recomputed, t.total - before)
        layer_backward(t, d, L, x_grad=k > 0, moe=k in moe_layers)
        if t.has(f"{L}.x"):
            t.drop(f"{L}.x")
        t.new(f"grads.{L}", lora_grad_bytes[k])
        if k > 0:
            t.rename(f"{L}.dx", f"{k - 1}.dout")
    backward_peak = t.peak - start
    t.drop(*[n for n in list(t.live) if n.startswith("rot.")])
    return StepMemory(saved=saved, loss_saved=loss_saved, forward_peak=forward_peak,
                      backward_peak=backward_peak, offloaded=offloaded,
                      recomputed_layer=recomputed, checkpoint_in_flight=in_flight,
                      grads=sum(lora_grad_bytes))
