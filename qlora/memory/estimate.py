"""GPU memory estimate of one QLoRA training step, one row per component, in exact integers.

Notation (used in every formula below):
    h  hidden_size            i  intermediate_size        L  num_hidden_layers
    nh num_attention_heads    d  head_dim (h // nh unless the config says)
    hq = nh·d (query width)   hkv = num_key_value_heads·d (key/value width)
    V  vocab_size             s  seq_len    b  batch_size    N = s·b tokens
    r  LoRA rank              a  bytes of the compute dtype (2 for bf16, 4 for fp32)
    n  elements of one quantized weight (out·in)
    MoE layers (Mixtral, Qwen3-MoE): E experts, k of them per token, each expert an MLP of width
    im (moe_intermediate_size, else intermediate_size); the fused expert weights are quantized
    per expert (qlora.nn.experts), LoRA on them is PEFT's target_parameters layout.

Sources:
  [QLoRA]  Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §2-3: NF4 with
           blocksize 64, double quantization of the absmax to 8 bit with blocksize 256.
  [bnb]    bitsandbytes' 4-bit storage (``Params4bit`` / ``QuantState``, mirrored by qlora.quant.nf4):
           packed uint8 with two codes per byte, uint8 absmax codes, fp32 nested absmax, an fp32[16]
           quant_map, an fp32[256] nested_quant_map and an fp32 offset per tensor.
  [Korthikanti] Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
           Models", §4.1: count, per layer, the bytes of every tensor autograd keeps for backward.
           Their closed form sbh(34 + 5·nh·s/h) is for GPT (GeLU MLP of 4h, dropout, eager
           attention); ``layer_activation_bytes_per_token`` applies the same method to the Llama
           layer (RMSNorm, SwiGLU, rotary, SDPA/flash attention with no s×s tensor, no dropout),
           and the replay below keeps exactly those tensors: frozen linears save no input
           (PyTorch saves an operand only when the other one needs a gradient), and the SDPA
           output is already laid out as (b, s, nh, d), so o_proj reuses it.
  [ZeRO]   Rajbhandari et al. 2020, "ZeRO", §3.1: mixed-precision Adam keeps 2 + 2 + 12 = 16
           bytes per parameter (16-bit weights and grads, fp32 master weights, fp32 m and v).
  [paged]  qlora.optim.PagedAdamW: moments packed in pages of ``DEFAULT_PAGE_BYTES``, every
           parameter padded to 256-element blocks.
  [ckpt]   Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": checkpointing each
           layer keeps its input (a·h per token) and recomputes one layer at a time in backward.
  [FSDP2]  qlora.train.fsdp over G GPUs (torch's fully_shard, one unit per decoder layer plus the
           root): every parameter keeps ceil(dim0 / G) of its rows per GPU (an NF4 weight exactly
           1/G of its codes, absmax codes and nested scales; its 1,092 bytes of maps and offset on
           every GPU), and so do the LoRA grads and AdamW states. A unit is gathered whole while it
           runs; FSDP2 prefetches the next layer's all-gather and stages it in a flat buffer, and
           keeps the root unit (embeddings, final norm, lm_head) whole from the forward until its
           backward. Activations are per GPU: each GPU runs its own batch_size x seq_len.
  [replay] qlora.memory.activations: the forward and backward of a step written as the tensors
           they allocate and release, in order; its running total gives what is saved between
           the passes and the peak of each pass (checked against torch.profiler's allocation
           trace on CPU: tests/memory/test_profile.py).

The peak is that of the worst phase: each row says in which phases it is alive (forward,
backward, optimizer step), and the total on the GPU is the largest sum over one phase.

All byte counts are exact integers; the report prints GB = 10^9 bytes, the unit of the published
tables this module is compared against.
"""
import json
import os
from dataclasses import dataclass, field, replace

from qlora.memory.activations import Dims, step_memory
from qlora.model.presets import list_presets, load_preset
from qlora.ops.compact_norm import chunk_tokens as norm_chunk_tokens
from qlora.optim.pages import resident_pages
from qlora.optim.paged_adamw import DEFAULT_PAGE_BYTES, state_fields

GB = 10**9
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # fused, [E, out, in]
OPTIMIZERS = ("paged_adamw", "adamw", "paged_adamw_8bit")
BACKENDS = ("triton", "torch")
PHASES = ("forward", "backward", "optimizer")
PASSES = ("forward", "backward")   # alive from the forward through the backward

NF4_BLOCKSIZE = 64          # [QLoRA] §2 "we use a blocksize of 64 for W"
NESTED_BLOCKSIZE = 256      # [QLoRA] §3 "blocksize of 256 for c2" (the double quantization)
# [bnb] per-tensor constants: quant_map fp32[16] + nested_quant_map fp32[256] + offset fp32.
NF4_TENSOR_CONSTANT_BYTES = 16 * 4 + 256 * 4 + 4
# CUDA context + cuBLAS/cuDNN handles and workspaces: memory the device uses that PyTorch's
# allocator never sees. 512 MiB is the usual order on CUDA 12 with lazy module loading (it varies
# with driver and GPU by a few hundred MiB); `qlora memory profile` measures it on the spot as
# (total - free) - torch.cuda.memory_reserved().
CUDA_CONTEXT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Architecture:
    """The hyperparameters of a Llama-family decoder that memory depends on."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool   # Qwen2 always has q/k/v biases; Llama's attention_bias adds o_proj's too
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool = False         # Qwen3: RMSNorm (d) on every head's query and key
    num_experts: int = 0          # E; 0 for a dense model
    experts_per_token: int = 0    # k
    moe_intermediate_size: int = 0
    moe_layers: tuple = ()        # indices of the layers whose MLP is the MoE block
    router_renorm: bool = False   # top-k routing weights divided by their sum
    router_cast: bool = False     # routing weights cast to the model's dtype (Qwen3-MoE)

    @classmethod
    def from_config(cls, config: dict, source: str = "config") -> "Architecture":
        """Read a Hugging Face config dict; a missing key is an error naming ``source``."""
        def need(key):
            if key not in config:
                raise ValueError(f"{source}: missing key {key!r} (needed for the memory estimate)")
            return config[key]

        model_type = need("model_type")
        h, nh = int(need("hidden_size")), int(need("num_attention_heads"))
        attention_bias = bool(config.get("attention_bias", False))
        experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
        moe = {}
        if experts:
            if config.get("shared_expert_intermediate_size") or config.get("n_shared_experts"):
                raise ValueError(f"{source}: MoE with shared experts is not modeled (only routed experts, "
                                 f"as Mixtral and Qwen3-MoE)")
            # Qwen3-MoE: layer l is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th
            step, dense = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or [])
            layers = int(need("num_hidden_layers"))
            # transformers' routers: Mixtral always renormalizes the top-k weights and keeps them
            # fp32; Qwen3-MoE renormalizes if norm_topk_prob and casts them to the model's dtype
            mixtral = model_type == "mixtral"
            moe = dict(num_experts=experts, experts_per_token=int(need("num_experts_per_tok")),
                       router_renorm=mixtral or bool(config.get("norm_topk_prob", False)),
                       router_cast=not mixtral,
                       moe_intermediate_size=int(config.get("moe_intermediate_size") or need("intermediate_size")),
                       moe_layers=tuple(l for l in range(layers) if l not in dense and (l + 1) % step == 0))
        return cls(
            model_type=model_type, hidden_size=h, intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")), num_heads=nh,
            num_kv_heads=int(config.get("num_key_value_heads") or nh),
            head_dim=int(config.get("head_dim") or h // nh), vocab_size=int(need("vocab_size")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=model_type.startswith("qwen3"), **moe)

    def linear_shapes(self) -> dict:
        """{projection name: (in_features, out_features, has_bias)} of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, hq, self.qkv_bias), "k_proj": (h, hkv, self.qkv_bias),
                "v_proj": (h, hkv, self.qkv_bias), "o_proj": (hq, h, self.o_bias),
                "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias),
                "down_proj": (i, h, self.mlp_bias)}

    def layer_shapes(self, layer: int) -> dict:
        """The linear layers of decoder layer ``layer``: :meth:`linear_shapes`, with the MLP of an MoE
        layer replaced by its fused expert weights, {name: (in, out, False)} per expert."""
        shapes = self.linear_shapes()
        if layer not in self.moe_layers:
            return shapes
        shapes = {name: shape for name, shape in shapes.items() if name not in MLP_PROJECTIONS}
        h, im = self.hidden_size, self.moe_intermediate_size
        return {**shapes, "gate_up_proj": (h, 2 * im, False), "down_proj": (im, h, False)}

    def is_expert(self, layer: int, name: str) -> bool:
        return layer in self.moe_layers and name in EXPERT_WEIGHTS

    def copies(self, layer: int, name: str) -> int:
        """How many weights of that shape: E for fused expert weights (one NF4 tensor each), else 1."""
        return self.num_experts if self.is_expert(layer, name) else 1

    def adapted(self, layer: int, name: str, targets: tuple) -> bool:
        return name in (expert_targets(targets) if self.is_expert(layer, name) else targets)


def expert_targets(targets: tuple) -> set:
    """The fused expert weights LoRA adapts for projection targets: gate_up_proj if gate_proj or
    up_proj is targeted (PEFT adapts the fused tensor whole), down_proj if down_proj is."""
    return ({"gate_up_proj"} if {"gate_proj", "up_proj"} & set(targets) else set()) | \
        ({"down_proj"} if "down_proj" in targets else set())


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the model (elements, not bytes)."""

    quantized_linear: int   # decoder-layer projection weights: stored in NF4
    embedding: int
    lm_head: int            # 0 when tied to the embedding
    norms: int
    biases: int
    lora: int
    routers: int = 0        # MoE routers E·h per MoE layer: 16-bit, no LoRA (as PEFT's all-linear)

    @property
    def base_total(self) -> int:
        """Every parameter of the model without adapters (what transformers counts)."""
        return self.quantized_linear + self.embedding + self.lm_head + self.norms + self.biases + self.routers

    @property
    def unquantized(self) -> int:
        return self.embedding + self.lm_head + self.norms + self.biases + self.routers


@dataclass(frozen=True)
class TrainSetup:
    """What is trained and how: everything besides the architecture that memory depends on."""

    seq_len: int = 2048
    batch_size: int = 1
    rank: int = 16
    targets: tuple = ALL_LINEAR
    optimizer: str = "paged_adamw"
    grad_checkpointing: bool = True
    offload_checkpoints: bool = False
    chunked_loss: bool = False  # qlora.ops.losses: lm_head + cross-entropy chunk by chunk over tokens
    compute_bytes: int = 2   # bf16 activations and 16-bit base params
    lora_bytes: int = 4      # fp32 adapters; 2: 16-bit adapters with fp32 masters in the optimizer
    tiled_mlp: int = 0       # qlora.ops.tiled: tokens per chunk, 0: off
    tiled_qkv: int = 0       # input norm, q/k/v and RoPE tiled (qlora.model.activation_memory): tokens per chunk, 0: off
    compact_norms: bool = False       # qlora.ops.compact_norm
    embedding_on_host: bool = False   # qlora.model.host_embedding: the input embedding in host memory
    gpu_budget_bytes: int = None      # device bytes for the run: optimizer pages beyond it spill
    device: str = "cuda"     # "cpu": no CUDA context
    backend: str = ""        # linear layers: "triton" (fused kernels) or "torch"; "": by device
    cpu_threads: int = 1     # ATen threads (the CPU attention kernel's buffers), device "cpu"
    gpus: int = 1            # > 1: per-GPU memory under FSDP2 over this many GPUs [FSDP2]

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "rank", "gpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [t for t in self.targets if t not in ALL_LINEAR]
        if unknown or not self.targets:
            raise ValueError(f"targets {list(self.targets)}: each must be one of {list(ALL_LINEAR)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} must be one of {list(OPTIMIZERS)}")
        if self.gpus > 1 and self.optimizer != "adamw":
            raise ValueError(f"optimizer {self.optimizer!r} with gpus={self.gpus}: FSDP trains with adamw "
                             "(the paged optimizers keep state for whole tensors)")
        if self.offload_checkpoints and not self.grad_checkpointing:
            raise ValueError("offload_checkpoints needs grad_checkpointing (the offloaded tensors "
                             "are the checkpoints)")
        if self.lora_bytes < 4 and self.optimizer == "adamw":
            raise ValueError("16-bit LoRA weights (lora_bytes < 4) need a paged optimizer, which "
                             "keeps their fp32 masters; torch's AdamW would round every update")
        for name in ("tiled_mlp", "tiled_qkv"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 tokens (0: off), got {getattr(self, name)}")
        if self.backend not in ("",) + BACKENDS:
            raise ValueError(f"backend {self.backend!r} must be one of {list(BACKENDS)}")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def linear_backend(self) -> str:
        return self.backend or ("triton" if self.device == "cuda" else "torch")

    @property
    def master_weights(self) -> bool:
        """The optimizer keeps fp32 masters of 16-bit LoRA weights in its pages."""
        return self.lora_bytes < 4


def unavailable_options(arch: Architecture) -> set:
    """The TrainSetup memory options qlora cannot apply to this model: compact norms and the tiled
    q/k/v outside the model types qlora.model.patch supports, a tiled MLP where every layer's MLP
    is an MoE block (qlora.model.activation_memory tiles dense ``*MLP`` modules only)."""
    from qlora.model.patch import SUPPORTED

    out = set() if arch.model_type in SUPPORTED else {"compact_norms", "tiled_qkv"}
    return out | ({"tiled_mlp"} if len(arch.moe_layers) == arch.num_layers else set())


def parse_targets(text: str) -> tuple:
    """'all-linear' or a comma-separated list of projection names -> tuple of names."""
    if text == "all-linear":
        return ALL_LINEAR
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class Component:
    """One row of the estimate: bytes in one place, alive in the listed phases of the step."""

    name: str
    bytes: int
    device: str   # "gpu" (the compute device) or "host"
    formula: str
    phases: tuple = PHASES


@dataclass
class Estimate:
    architecture: Architecture
    setup: TrainSetup
    params: ParamCounts
    components: list = field(default_factory=list)

    def bytes_of(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def phase_bytes(self, phase: str, device: str = "gpu") -> int:
        return sum(c.bytes for c in self.components if c.device == device and phase in c.phases)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def gpu_bytes(self) -> int:
        """Peak device memory: the most that is alive at once, over the phases of a step."""
        return max(self.phase_bytes(phase) for phase in PHASES)

    @property
    def host_bytes(self) -> int:
        return max(self.phase_bytes(phase, "host") for phase in PHASES)

    @property
    def fits(self) -> bool:
        budget = self.setup.gpu_budget_bytes
        return budget is None or self.gpu_bytes <= budget


# ---- parameters --------------------------------------------------------------------------------
def count_params(arch: Architecture, setup: TrainSetup) -> ParamCounts:
    """Element counts. Per layer: the seven projections (an MoE layer: attention, E copies of the
    fused expert weights and an E·h router), their biases, two RMSNorm weights (h each) and, on
    Qwen3, the query and key norms (d each); plus the embedding V·h, the final norm h and lm_head
    V·h unless tied."""
    L, h, V = arch.num_layers, arch.hidden_size, arch.vocab_size
    weights = biases = lora = 0
    for layer in range(L):
        for name, (k, n, bias) in arch.layer_shapes(layer).items():
            copies = arch.copies(layer, name)
            weights += copies * k * n
            biases += n if bias else 0
            # LoRA on W [out, in]: A is [r, in], B is [out, r] -> r·(in + out) per adapted weight;
            # on E fused experts PEFT's A is [r·E, in], B [out, r·E] -> E·r·(in + out).
            lora += copies * setup.rank * (k + n) if arch.adapted(layer, name, setup.targets) else 0
    return ParamCounts(quantized_linear=weights, embedding=V * h,
                       lm_head=0 if arch.tie_word_embeddings else V * h,
                       norms=(2 * L + 1) * h + (2 * L * arch.head_dim if arch.qk_norm else 0),
                       biases=biases, lora=lora, routers=len(arch.moe_layers) * arch.num_experts * h)


def shard_numel(shape: tuple, gpus: int) -> int:
    """Elements of ``shape`` one GPU holds under FSDP2: ceil(dim0 / G) rows [FSDP2]."""
    rows = -(-shape[0] // gpus)
    rest = 1
    for d in shape[1:]:
        rest *= d
    return rows * rest


def nf4_bytes(n: int, double_quant: bool = True) -> tuple:
    """(codes, constants) bytes of one weight of n elements in [bnb]'s NF4 layout.

    codes:     ceil(n / 2) uint8, two 4-bit codes per byte                      -> 4 bits/param
    constants: double quant: ceil(n/64) uint8 absmax codes                      -> 8/64 bits/param
               + ceil(n/64/256) fp32 nested absmax                              -> 32/(64·256)
               + the per-tensor maps and offset (NF4_TENSOR_CONSTANT_BYTES)
               without: ceil(n/64) fp32 absmax + the fp32[16] quant_map.
    Total 4 + 8/64 + 32/16384 = 4.127 bits per parameter with double quantization [QLoRA] §3.
    """
    blocks = -(-n // NF4_BLOCKSIZE)
    codes = -(-n // 2)
    if not double_quant:
        return codes, 4 * blocks + 16 * 4
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return codes, blocks + 4 * nested_blocks + NF4_TENSOR_CONSTANT_BYTES


def lora_tensor_numels(arch: Architecture, setup: TrainSetup, layer: int = None) -> list:
    """Element count of every LoRA A [r, in] and B [out, r] matrix one GPU holds, layer by layer,
    in module order (all of each with one GPU; ceil(dim0 / G) rows of each under FSDP2); only
    decoder layer ``layer``'s when given."""
    numels = []
    for layer in range(arch.num_layers) if layer is None else (layer,):
        for name, (k, n, _) in arch.layer_shapes(layer).items():
            copies = arch.copies(layer, name)  # E fused experts: PEFT's A is [r·E, in], B [out, r·E]
            if arch.adapted(layer, name, setup.targets):
                numels += [shard_numel((copies * setup.rank, k), setup.gpus),
                           shard_numel((n, copies * setup.rank), setup.gpus)]
    return numels


def sixteen_bit_numel(arch: Architecture, params: ParamCounts, gpus: int) -> int:
    """Elements of the 16-bit parameters one GPU holds: embedding [V, h], lm_head [V, h] unless tied,
    2L + 1 norms [h], Qwen3's query and key norms [d], the projections' biases, MoE routers [E, h]."""
    if gpus == 1:
        return params.unquantized
    V, h, L, d = arch.vocab_size, arch.hidden_size, arch.num_layers, arch.head_dim
    embeddings = (1 if arch.tie_word_embeddings else 2) * shard_numel((V, h), gpus)
    biases = sum(shard_numel((n,), gpus) for layer in range(L)
                 for _, n, bias in arch.layer_shapes(layer).values() if bias)
    qk_norms = 2 * L * shard_numel((d,), gpus) if arch.qk_norm else 0
    routers = len(arch.moe_layers) * shard_numel((arch.num_experts, h), gpus)
    return embeddings + (2 * L + 1) * shard_numel((h,), gpus) + qk_norms + biases + routers


def fsdp_gathered_components(arch: Architecture, setup: TrainSetup) -> list:
    """[FSDP2] transients: gathered units and the unsharded LoRA grads before the reduce-scatter
    (of the largest layer: an MoE layer gathers all its experts)."""
    a, lb, h, V = setup.compute_bytes, setup.lora_bytes, arch.hidden_size, arch.vocab_size

    def whole(layer: int) -> tuple:
        """(NF4 + 16-bit + LoRA bytes, LoRA bytes) of decoder layer ``layer`` unsharded."""
        shapes = arch.layer_shapes(layer)
        nf4 = sum(arch.copies(layer, name) * sum(nf4_bytes(k * n)) for name, (k, n, _) in shapes.items())
        dense = a * (2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
                     + sum(n for _, n, bias in shapes.values() if bias)
                     + (arch.num_experts * h if layer in arch.moe_layers else 0))
        lora = lb * sum(arch.copies(layer, name) * setup.rank * (k + n) for name, (k, n, _) in shapes.items()
                        if arch.adapted(layer, name, setup.targets))
        return nf4 + dense + lora, lora

    layer, layer_lora = max(whole(layer) for layer in range(arch.num_layers))
    root = a * ((1 if arch.tie_word_embeddings else 2) * V * h + h)
    return [
        Component("gathered layers", 3 * layer + layer_lora, "gpu",
                  "3·(one layer whole: NF4 + norms + LoRA): running, prefetched, all-gather buffer; "
                  "+ its LoRA grads before the reduce-scatter", PASSES),
        Component("gathered root", root, "gpu", "a·(V·h embedding + V·h lm_head unless tied + h)",
                  PASSES),
    ]


def optimizer_pages(numels: list, optimizer: str, master_weights: bool = False) -> tuple:
    """(pages, bytes per page) of a [paged] optimizer over trainable tensors of these sizes.

    A 256-element block costs c bytes: the fields of qlora.optim.paged_adamw.state_fields, i.e.
    2·4·256 for fp32 m and v, or 2·256 + 2·4 for uint8 m, v codes and an fp32 absmax each
    (Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization"), plus 4·256 for fp32
    master weights. A page of P = DEFAULT_PAGE_BYTES holds E = floor(P / c)·256 elements; every
    tensor is padded to 256-element blocks and packed back to back, so
    pages = ceil(Σ ceil(numel/256)·256 / E) and a page is (E/256)·c bytes.
    """
    import torch

    from qlora.optim.quant8 import QUANT_BLOCK

    state_dtype = "8bit" if optimizer == "paged_adamw_8bit" else torch.float32
    block_cost = sum(f.dtype.itemsize * QUANT_BLOCK // f.granularity
                     for f in state_fields(state_dtype, master_weights))
    page_numel = DEFAULT_PAGE_BYTES // block_cost * QUANT_BLOCK
    padded = sum(-(-n // QUANT_BLOCK) * QUANT_BLOCK for n in numels)
    return -(-padded // page_numel), page_numel // QUANT_BLOCK * block_cost


def optimizer_state_bytes(numels: list, optimizer: str, master_weights: bool = False) -> int:
    """Bytes of AdamW's states for trainable tensors of the given sizes: torch.optim.AdamW keeps
    fp32 m and v (8 bytes per element); the paged optimizers, see optimizer_pages."""
    if optimizer == "adamw":
        return 8 * sum(numels)
    pages, page_bytes = optimizer_pages(numels, optimizer, master_weights)
    return pages * page_bytes


# ---- activations -------------------------------------------------------------------------------
def layer_activation_bytes_per_token(arch: Architecture, setup: TrainSetup, *,
                                     grad_into_layer: bool, trainable_base: bool = False,
                                     moe: bool = False) -> int:
    """Bytes per token autograd saves in one decoder layer [Korthikanti] applied to Llama; used
    for the full fine-tuning row of the comparison (the QLoRA estimate replays the step).

    grad_into_layer: the layer's input needs a gradient. trainable_base: every weight trains.
    Saved tensors, per token:
      attention block
        RMSNorm: fp32 copy of its input 4h + fp32 rsqrt 4          (only if its input needs grad;
                 plus a·h of the normalized input when the norm weight is trained)
        normalized input a·h, saved once for q/k/v                 (if a consumer is trained)
        LoRA A·x, a·r per adapted projection                       (dB needs it)
        SDPA: q a·hq, k and v a·hkv each, output a·hq (also o_proj's input), logsumexp 4·nh
      MLP block
        RMSNorm as above; normalized input a·h
        gate output a·i (SiLU's input), SiLU output a·i, up output a·i, their product a·i
        (down_proj's input); LoRA A·x a·r per adapted projection
      MoE block instead (``moe``; qlora.nn.experts.nf4_experts_forward, frozen router)
        RMSNorm and normalized input as above; router softmax output 4E (fp32), top-k indices 8k
        and values 4k (the renormalization divides by their sum)
        per routed pair, k per token: the gathered input a·h (if gate_up_proj is adapted), the
        MLP's 4·a·im as above, LoRA A·x a·r per adapted expert weight, the expert's output a·h and
        its routing weight 4 (their product's backward needs both)
    """
    a, r, h, i = setup.compute_bytes, setup.rank, arch.hidden_size, arch.intermediate_size
    hq, hkv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    adapted = set(setup.targets) if not trainable_base else set()

    def norm(grad_in):
        return (4 * h + 4 if grad_in else 0) + (a * h if trainable_base else 0)

    total = norm(grad_into_layer)
    qkv_trained = trainable_base or bool(adapted & {"q_proj", "k_proj", "v_proj"})
    if qkv_trained:
        total += a * h
    total += a * r * len(adapted & {"q_proj", "k_proj", "v_proj"})
    attention_grad = grad_into_layer or qkv_trained
    if attention_grad:
        total += a * hq + 2 * a * hkv + a * hq + 4 * arch.num_heads
    elif "o_proj" in adapted or trainable_base:
        total += a * hq   # only o_proj's input
    total += a * r * ("o_proj" in adapted)
    mlp_grad = attention_grad or "o_proj" in adapted or trainable_base
    if moe:
        k, im, experts = arch.experts_per_token, arch.moe_intermediate_size, expert_targets(setup.targets)
        per_pair = a * h * ("gate_up_proj" in experts) + 4 * a * im + a * r * len(experts) + a * h + 4
        return total + norm(mlp_grad) + a * h + 4 * arch.num_experts + 12 * k + k * per_pair
    total += norm(mlp_grad) + a * h + 4 * a * i
    total += a * r * len(adapted & set(MLP_PROJECTIONS))
    return total


def _chunk_tokens(vocab_size: int, compute_bytes: int) -> int:
    """Tokens per chunk of the chunked loss: qlora.kernels.cross_entropy.default_chunk_size."""
    import torch

    from qlora.kernels.cross_entropy import default_chunk_size

    dtype = {2: torch.bfloat16, 4: torch.float32}[compute_bytes]
    return default_chunk_size(vocab_size, dtype)


def dims(arch: Architecture, setup: TrainSetup) -> Dims:
    """The sizes the step replay [replay] works with."""
    a, backend = setup.compute_bytes, setup.linear_backend
    return Dims(tokens=setup.tokens, seq_len=setup.seq_len, batch=setup.batch_size, a=a,
                h=arch.hidden_size, i=arch.intermediate_size,
                hq=arch.num_heads * arch.head_dim, hkv=arch.num_kv_heads * arch.head_dim,
                heads=arch.num_heads, kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                vocab=arch.vocab_size, rank=setup.rank,
                adapted=frozenset(setup.targets) | expert_targets(setup.targets),
                backend=backend, device=setup.device, compact_norms=setup.compact_norms,
                tiled_mlp=setup.tiled_mlp, tiled_qkv=setup.tiled_qkv, norm_chunk=norm_chunk_tokens(arch.hidden_size),
                cpu_threads=setup.cpu_threads,
                # the fused path concatenates and scales the adapters per call; the torch path
                # casts them when their dtype is not the compute dtype
                lora_copies=backend == "triton" or setup.lora_bytes != a,
                experts=arch.num_experts, top_k=arch.experts_per_token, moe_i=arch.moe_intermediate_size,
                router_renorm=arch.router_renorm, router_cast=arch.router_cast, qk_norm=arch.qk_norm)


def activation_components(arch: Architecture, setup: TrainSetup) -> list:
    """The step's rows, from the replay [replay] of its forward and backward."""
    N, a, h = setup.tokens, setup.compute_bytes, arch.hidden_size
    # the LoRA grads one GPU keeps (its shards under [FSDP2]), one layer's worth at a time
    per_layer_lora = [sum(lora_tensor_numels(arch, setup, layer)) for layer in range(arch.num_layers)]
    chunk = _chunk_tokens(arch.vocab_size, a) if setup.chunked_loss else 0
    m = step_memory(dims(arch, setup), arch.num_layers, checkpointing=setup.grad_checkpointing,
                    offload=setup.offload_checkpoints,
                    loss="chunked" if setup.chunked_loss else "logits", loss_chunk=chunk,
                    lora_grad_bytes=[setup.lora_bytes * n for n in per_layer_lora],
                    moe_layers=frozenset(arch.moe_layers))
    if setup.grad_checkpointing:
        kept = "layer inputs N·a·h·L" + (" (offloaded)" if setup.offload_checkpoints else "")
    else:
        kept = "saved tensors of every layer [Korthikanti]"
    rows = [Component("activations", m.saved - m.loss_saved, "gpu",
                      f"{kept} + final norm + rotary cos/sin, kept for the backward", PASSES)]
    if setup.chunked_loss:
        rows.append(Component("loss (chunked)", m.loss_saved, "gpu",
                              "N·a·h: dL/dhidden, formed chunk by chunk in the forward", PASSES))
    else:
        rows.append(Component("logits and loss", m.loss_saved, "gpu",
                              "N·4V: the fp32 log-softmax the loss keeps", PASSES))
    if m.offloaded:
        rows.append(Component("offloaded checkpoints", m.offloaded, "host",
                              "N·a·h·L in pinned host memory", PASSES))
    where = f"logits chunk of {chunk} tokens" if setup.chunked_loss else "N·4V fp32 logits"
    rows.append(Component("forward transients", m.forward_peak - m.saved, "gpu",
                          f"the forward's peak over what it keeps: a layer's intermediates or "
                          f"the {where}", ("forward",)))
    rows.append(Component("lora grads", m.grads, "gpu", "same as the LoRA params",
                          ("backward", "optimizer")))
    if setup.grad_checkpointing:
        if m.checkpoint_in_flight:
            rows.append(Component("checkpoint in flight", m.checkpoint_in_flight, "gpu",
                                  "2·N·a·h: the layer's input, and the next one prefetched",
                                  ("backward",)))
        rows.append(Component("recomputed layer", m.recomputed_layer, "gpu",
                              "what one recomputed layer keeps for its backward", ("backward",)))
    rest = m.backward_peak - m.grads - m.checkpoint_in_flight - \
        (m.recomputed_layer if setup.grad_checkpointing else 0)
    rows.append(Component("backward transients", max(0, rest), "gpu",
                          "gradients and temporaries at the backward's peak", ("backward",)))
    return rows


# ---- the estimate ------------------------------------------------------------------------------
def estimate(config: dict, setup: TrainSetup, source: str = "config") -> Estimate:
    """QLoRA: NF4 base, 16-bit non-quantized params, LoRA adapters with AdamW."""
    arch = Architecture.from_config(config, source)
    params = count_params(arch, setup)
    codes = constants = largest = 0
    G = setup.gpus
    for layer in range(arch.num_layers):
        for name, (k, n, _) in arch.layer_shapes(layer).items():
            c, q = nf4_bytes(k * n)  # MoE experts: each expert its own NF4 tensor
            # [FSDP2]: 1/G of the codes and of the per-block scales; the per-tensor constants whole
            codes += arch.copies(layer, name) * (c // G)
            constants += arch.copies(layer, name) * ((q - NF4_TENSOR_CONSTANT_BYTES) // G
                                                     + NF4_TENSOR_CONSTANT_BYTES)
            largest = max(largest, k * n)
    a, lb = setup.compute_bytes, setup.lora_bytes
    lora_numels = lora_tensor_numels(arch, setup)
    per_gpu = "" if G == 1 else f", per GPU of {G} [FSDP2]"
    embedding = shard_numel((arch.vocab_size, arch.hidden_size), G)
    est = Estimate(arch, setup, params)
    est.components += [
        Component("nf4 base weights", codes, "gpu", "Σ ceil(n/2): 4 bits per weight [QLoRA]" + per_gpu),
        Component("nf4 quant constants", constants, "gpu",
                  "Σ ceil(n/64) + 4·ceil(n/16384) + 1092: double-quantized absmax [QLoRA][bnb]"
                  + per_gpu),
        Component("input embedding", a * embedding,
                  "host" if setup.embedding_on_host else "gpu",
                  "a·V·h" + (" in host memory, rows gathered per batch"
                             if setup.embedding_on_host else "") + per_gpu),
        Component("16-bit params", a * (sixteen_bit_numel(arch, params, G) - embedding), "gpu",
                  "a·(V·h lm_head unless tied + (2L+1)·h norms + biases + MoE routers)" + per_gpu),
        Component("lora params", lb * sum(lora_numels), "gpu",
                  "lora_bytes·Σ_layers r·(in+out) (E× on experts)" + per_gpu),
    ]
    if setup.device == "cuda" and setup.linear_backend == "triton":
        # qlora.ops.fused's dense path (dequantize W0 + cuBLAS, where the path table prefers it)
        # dequantizes into one buffer shared by all layers, kept once allocated; counted whether
        # or not a layer takes that path (the estimate does not know the GPU's path table)
        est.components.append(Component(
            "dequant scratch", a * largest, "gpu",
            "a·max(n·k): the dense path's dequantized W0 (one expert's in an MoE layer), one "
            "buffer for every layer"))
    est.components += activation_components(arch, setup)
    if G > 1:
        est.components += fsdp_gathered_components(arch, setup)
    if setup.device == "cuda":
        est.components.append(Component("cuda context", CUDA_CONTEXT_BYTES, "gpu",
                                        "CUDA context + library workspaces (constant)"))
    est.components += optimizer_components(est, lora_numels)
    return est


def optimizer_components(est: Estimate, numels: list) -> list:
    """The optimizer's states (and fp32 masters), placed as qlora.optim.pages places them: with a
    budget, the pages that do not fit beside everything else stay in host memory."""
    setup = est.setup
    what = "AdamW m and v" + (" and fp32 master weights" if setup.master_weights else "")
    if setup.optimizer == "adamw":
        return [Component("optimizer states", optimizer_state_bytes(numels, "adamw"), "gpu",
                          f"{what}: 8 bytes per element (torch.optim.AdamW)")]
    pages, page_bytes = optimizer_pages(numels, setup.optimizer, setup.master_weights)
    room = None if setup.gpu_budget_bytes is None else setup.gpu_budget_bytes - est.gpu_bytes
    resident = pages if room is None else resident_pages(pages, page_bytes, max(0, room))
    buffers = 2 if resident < pages else 0
    rows = [Component("optimizer states", (resident + buffers) * page_bytes, "gpu",
                      f"{what}: {resident} of {pages} pages of {page_bytes} bytes"
                      + (" + 2 streaming buffers" if buffers else "") + f" ({setup.optimizer})")]
    if resident < pages:
        rows.append(Component("optimizer states (host)", (pages - resident) * page_bytes, "host",
                              f"{what}: {pages - resident} pages in pinned host memory"))
    return rows


def optimizer_device_budget(est: Estimate) -> int:
    """Device bytes the optimizer may hold under the setup's budget: what PagedAdamW's
    gpu_budget_bytes should be for the run to place its pages as this estimate does."""
    others = max(sum(c.bytes for c in est.components if c.device == "gpu" and phase in c.phases
                     and c.name != "optimizer states") for phase in PHASES)
    return max(0, est.setup.gpu_budget_bytes - others)


def full_finetune_bytes(config: dict, setup: TrainSetup) -> int:
    """Full fine-tuning, 16-bit mixed precision AdamW, in closed form: 16 bytes per parameter
    [ZeRO]; the saved activations with every weight trained [Korthikanti] (with checkpointing:
    the layer inputs N·a·h·L and one recomputed layer); the final norm N·(4h+4); the logits
    N·(a·V + 4V upcast + 4V log_softmax + 8 labels); the backward's larger transient,
    N·max(8V, 3a·i + 2a·h); the CUDA context."""
    arch = Architecture.from_config(config)
    params = count_params(arch, setup).base_total
    N, a, h, V = setup.tokens, setup.compute_bytes, arch.hidden_size, arch.vocab_size
    layers = [layer_activation_bytes_per_token(arch, setup, grad_into_layer=True, trainable_base=True,
                                               moe=k in arch.moe_layers) for k in range(arch.num_layers)]
    saved = a * h * arch.num_layers + max(layers) if setup.grad_checkpointing else sum(layers)
    logits = a * V + (4 * V if a < 4 else 0) + 4 * V + 8
    transients = max(8 * V, 3 * a * arch.intermediate_size + 2 * a * h)
    context = CUDA_CONTEXT_BYTES if setup.device == "cuda" else 0
    return 16 * params + N * (saved + (4 * h + 4 + a * h) + logits + transients) + context


def lora16_bytes(config: dict, setup: TrainSetup) -> int:
    """16-bit LoRA: the QLoRA estimate with the NF4 rows replaced by a·(quantized params)."""
    est = estimate(config, setup)
    nf4 = est.bytes_of("nf4 base weights") + est.bytes_of("nf4 quant constants")
    return est.gpu_bytes - nf4 + setup.compute_bytes * est.params.quantized_linear


def comparison(config: dict, setup: TrainSetup) -> list:
    """Rows {method, with_checkpointing, without_checkpointing} in bytes, same seq/batch/rank, on
    one GPU."""
    # every state on the device: the methods compared by what they need, not by a placement
    one_gpu = replace(setup, gpus=1, gpu_budget_bytes=None)
    with_ckpt = replace(one_gpu, grad_checkpointing=True, offload_checkpoints=False)
    without = replace(one_gpu, grad_checkpointing=False, offload_checkpoints=False)
    return [
        {"method": "full fine-tune (16-bit AdamW)", "with_checkpointing": full_finetune_bytes(config, with_ckpt),
         "without_checkpointing": full_finetune_bytes(config, without)},
        {"method": "LoRA (16-bit base)", "with_checkpointing": lora16_bytes(config, with_ckpt),
         "without_checkpointing": lora16_bytes(config, without)},
        {"method": "QLoRA (NF4 base)", "with_checkpointing": estimate(config, with_ckpt).gpu_bytes,
         "without_checkpointing": estimate(config, without).gpu_bytes},
    ]


def largest_fit(config: dict, setup: TrainSetup, gpu_bytes: int) -> dict:
    """Largest seq_len at the setup's batch_size, and largest batch_size at its seq_len, whose
    estimate fits in ``gpu_bytes`` (0 when even 1 does not fit). The estimate grows monotonically
    with both, so a doubling search then bisection finds the boundary."""
    def fits(**change):
        return estimate(config, replace(setup, gpu_budget_bytes=gpu_bytes, **change)).fits

    def largest(name):
        if not fits(**{name: 1}):
            return 0
        lo, hi = 1, 2
        while fits(**{name: hi}):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(**{name: mid}) else (lo, mid)
        return lo

    max_seq = largest("seq_len")
    return {"max_seq_len": max_seq, "at_batch_size": setup.batch_size,
            "max_batch_size": largest("batch_size"), "at_seq_len": setup.seq_len,
            "max_tokens": max_seq * setup.batch_size}


def load_config(spec: str) -> tuple:
    """(config dict, source name) from a preset name, a config.json, or a checkpoint directory
    holding one. Errors name what was tried."""
    if spec in list_presets():
        return load_preset(spec), f"preset {spec}"
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(list_presets())}) nor "
                         f"a config.json nor a directory holding one")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config, path
