"""PagedAdamW: AdamW whose moments live in fixed-size pages that spill to host memory.

The moments of all trainable parameters are packed, in param-group order, into pages of
``page_bytes``. A parameter larger than a page spans several pages; small parameters share one.
Every piece (a *segment*) starts at a multiple of 256 elements, both inside its page and inside
its parameter, so the 256-element quantization blocks of the 8-bit states never straddle two
parameters and a parameter's state is the same whatever the page layout.

Each page is resident on the parameters' device or spilled to (pinned) host memory, as the
budget decides (see ``qlora.optim.pages``). ``step()`` walks the pages with the spilled ones
streamed through a double buffer, and updates each segment with one fused AdamW kernel launch
(PyTorch ops when the parameters are on the CPU).

With ``master_weights=True`` the pages also hold an fp32 copy of every parameter (a 16-bit
LoRA weight, say): the update is applied to that master and the parameter receives its rounding,
so updates smaller than the parameter's resolution accumulate in the master instead of being
rounded away (Micikevicius et al. 2018, "Mixed Precision Training", §3.1). The masters page in
and out with the moments.

``state_dict()`` holds, per parameter, ``step`` and the moments as CPU tensors: fp32
``exp_avg``/``exp_avg_sq`` shaped like the parameter (the layout of ``torch.optim.AdamW``), or
for 8-bit states the flat uint8 codes and fp32 block absmax of each moment; and with master
weights the fp32 ``master`` shaped like the parameter.
"""
from dataclasses import dataclass

import torch

from qlora.quant.dynamic_map import dynamic_map
from qlora.optim.pages import PagePool
from qlora.optim.quant8 import QUANT_BLOCK
from qlora.optim.update import adamw8bit_update, adamw_scalars, adamw_update

DEFAULT_PAGE_BYTES = 8 << 20


@dataclass(frozen=True)
class StateField:
    """One per-element state array: ``1`` entry per ``granularity`` parameter elements."""

    name: str
    dtype: torch.dtype
    granularity: int

    def length(self, numel: int) -> int:
        return -(-numel // self.granularity)


MASTER = StateField("master", torch.float32, 1)
FP32_FIELDS = (StateField("exp_avg", torch.float32, 1),
               StateField("exp_avg_sq", torch.float32, 1))
# fp32 absmax first so every field starts 4-byte aligned inside the page.
INT8_FIELDS = (StateField("exp_avg_absmax", torch.float32, QUANT_BLOCK),
               StateField("exp_avg_sq_absmax", torch.float32, QUANT_BLOCK),
               StateField("exp_avg_codes", torch.uint8, 1),
               StateField("exp_avg_sq_codes", torch.uint8, 1))


def state_fields(state_dtype, master_weights: bool) -> tuple:
    """The per-element fields of a page, fp32 ones first (so every field is 4-byte aligned)."""
    if state_dtype == "8bit":
        return INT8_FIELDS[:2] + ((MASTER,) if master_weights else ()) + INT8_FIELDS[2:]
    return FP32_FIELDS + ((MASTER,) if master_weights else ())


@dataclass(frozen=True)
class Segment:
    """Elements [param_offset, param_offset + numel) of parameter ``param_index`` live at
    element ``page_offset`` of page ``page``."""

    param_index: int
    param_offset: int
    page: int
    page_offset: int
    numel: int


class PageLayout:
    """Where every parameter's state lives: fields inside a page, segments across pages."""

    def __init__(self, numels, page_bytes: int, fields):
        self.fields = fields
        bytes_per_block = sum(f.dtype.itemsize * QUANT_BLOCK // f.granularity for f in fields)
        self.page_numel = page_bytes // bytes_per_block * QUANT_BLOCK
        if self.page_numel == 0:
            raise ValueError(f"PagedAdamW: page_bytes={page_bytes} is too small; a page must hold "
                             f"at least {bytes_per_block} bytes ({QUANT_BLOCK} elements)")
        self.page_bytes = self.page_numel // QUANT_BLOCK * bytes_per_block
        self.field_offsets = {}  # field name -> byte offset inside a page
        offset = 0
        for f in fields:
            self.field_offsets[f.name] = offset
            offset += f.length(self.page_numel) * f.dtype.itemsize

        self.param_segments = [[] for _ in numels]
        self.page_segments = [[]]
        fill = 0  # elements used in the last page, always a multiple of QUANT_BLOCK
        for index, numel in enumerate(numels):
            done = 0
            while done < numel:
                if fill == self.page_numel:
                    self.page_segments.append([])
                    fill = 0
                take = min(numel - done, self.page_numel - fill)
                seg = Segment(index, done, len(self.page_segments) - 1, fill, take)
                self.param_segments[index].append(seg)
                self.page_segments[-1].append(seg)
                done += take
                fill += -(-take // QUANT_BLOCK) * QUANT_BLOCK
        self.n_pages = len(self.page_segments) if fill else len(self.page_segments) - 1

    def views(self, page: torch.Tensor) -> dict:
        """Typed flat views of every field of a page (uint8 [page_bytes])."""
        out = {}
        for f in self.fields:
            start = self.field_offsets[f.name]
            stop = start + f.length(self.page_numel) * f.dtype.itemsize
            out[f.name] = page[start:stop].view(f.dtype)
        return out

    @staticmethod
    def page_slice(field: StateField, seg: Segment) -> slice:
        start = seg.page_offset // field.granularity
        return slice(start, start + field.length(seg.numel))

    @staticmethod
    def param_slice(field: StateField, seg: Segment) -> slice:
        start = seg.param_offset // field.granularity
        return slice(start, start + field.length(seg.numel))


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with paged, spillable moments.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        gpu_budget_bytes: device bytes the states may occupy. None: all resident; an int: pages
            beyond it spill to pinned host memory (the two-page double buffer counts against
            it); "auto": follow free device memory, leaving headroom (CUDA only).
        page_bytes: size of one page (rounded down to whole 256-element blocks).
        state_dtype: ``torch.float32`` or ``"8bit"`` (blockwise dynamic 8-bit moments).
        master_weights: keep an fp32 master of every parameter in the pages and update that
            (for parameters stored in 16 bits).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 gpu_budget_bytes=None, page_bytes=DEFAULT_PAGE_BYTES, state_dtype=torch.float32,
                 master_weights=False):
        if not 0.0 <= lr:
            raise ValueError(f"PagedAdamW: invalid lr {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"PagedAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"PagedAdamW: invalid betas {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"PagedAdamW: invalid weight_decay {weight_decay}")
        if state_dtype not in (torch.float32, "8bit"):
            raise ValueError(f"PagedAdamW: state_dtype must be torch.float32 or '8bit', "
                             f"got {state_dtype!r}")
        if gpu_budget_bytes is not None and gpu_budget_bytes != "auto" and (
                not isinstance(gpu_budget_bytes, int) or gpu_budget_bytes < 0):
            raise ValueError(f"PagedAdamW: gpu_budget_bytes must be None, 'auto' or an int >= 0, "
                             f"got {gpu_budget_bytes!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.gpu_budget_bytes = gpu_budget_bytes
        self.page_bytes = page_bytes
        self.state_dtype = state_dtype
        self.master_weights = bool(master_weights)
        self._fields = state_fields(state_dtype, self.master_weights)
        self._params = []  # trainable params the layout covers, in param-group order
        self._layout = None
        self._pool = None
        self._maps = None  # 8-bit: (signed map, unsigned map) on the params' device

    # ---- layout ----------------------------------------------------------------------------
    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _ensure_layout(self):
        """(Re)build the pages when the set of trainable params changed, keeping their state."""
        params = [p for p in self._all_params() if p.requires_grad]
        if self._layout is not None and len(params) == len(self._params) and all(
                a is b for a, b in zip(params, self._params)):
            return
        still_trainable = set(params)
        kept = {p: self._gather(p) for p in self._params
                if p in self.state and p in still_trainable}
        self._build(params)
        for p, fields in kept.items():
            self._scatter(p, fields)

    def _build(self, params):
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"PagedAdamW: all parameters must be on one device, got {devices}")
        for i, p in enumerate(params):
            if not p.dtype.is_floating_point or not p.is_contiguous():
                raise ValueError(f"PagedAdamW: trainable parameter {i} (shape {tuple(p.shape)}) "
                                 f"must be a contiguous floating-point tensor, got {p.dtype}")
        device = devices.pop() if devices else torch.device("cpu")
        self._params = params
        self._index = {p: i for i, p in enumerate(params)}
        self._layout = PageLayout([p.numel() for p in params], self.page_bytes, self._fields)
        self._pool = PagePool(self._layout.n_pages, self._layout.page_bytes, device,
                              self.gpu_budget_bytes)
        if self.master_weights:  # every master starts as its parameter
            for p in params:
                self._scatter(p, {MASTER.name: p.detach()})
        if self.state_dtype == "8bit":
            self._maps = (dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device))

    def _gather(self, p) -> dict:
        """CPU copies of every state field of ``p``, read from wherever its pages live."""
        self._pool.synchronize()
        out = {f.name: torch.empty(f.length(p.numel()), dtype=f.dtype) for f in self._fields}
        for seg in self._layout.param_segments[self._index[p]]:
            views = self._layout.views(self._pool.page(seg.page))
            for f in self._fields:
                src = views[f.name][PageLayout.page_slice(f, seg)]
                out[f.name][PageLayout.param_slice(f, seg)].copy_(src)
        shaped = {MASTER.name} | ({f.name for f in FP32_FIELDS}
                                  if self.state_dtype == torch.float32 else set())
        return {name: t.view(p.shape) if name in shaped else t for name, t in out.items()}

    def _scatter(self, p, fields: dict):
        """Write the given state fields of ``p`` (tensors of the right numel, on any device)
        into its pages."""
        self._pool.synchronize()
        fields = {name: t.reshape(-1) for name, t in fields.items()}
        for seg in self._layout.param_segments[self._index[p]]:
            views = self._layout.views(self._pool.page(seg.page))
            for f in self._fields:
                if f.name not in fields:
                    continue
                src = fields[f.name][PageLayout.param_slice(f, seg)]
                views[f.name][PageLayout.page_slice(f, seg)].copy_(src)

    # ---- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_layout()
        self._pool.begin_step()

        work = {}  # param index -> (flat param, flat grad, hyper-parameters of this step)
        for group in self.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                if p not in self._index:
                    raise RuntimeError(f"PagedAdamW: parameter of shape {tuple(p.shape)} has a "
                                       f"gradient but requires_grad=False")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                scalars = adamw_scalars(lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                        weight_decay=float(group["weight_decay"]),
                                        step=state["step"].item())
                scalars.update(beta1=beta1, beta2=beta2, eps=float(group["eps"]))
                work[self._index[p]] = (p.view(-1), p.grad.contiguous().view(-1), scalars)

        layout = self._layout
        pages = sorted({seg.page for i in work for seg in layout.param_segments[i]})

        def update_page(page_index, page):
            views = layout.views(page)
            for seg in layout.page_segments[page_index]:
                if seg.param_index not in work:
                    continue
                param, grad, scalars = work[seg.param_index]
                elems = slice(seg.param_offset, seg.param_offset + seg.numel)
                states = {f.name: views[f.name][PageLayout.page_slice(f, seg)] for f in self._fields}
                target, g = param[elems], grad[elems]
                if self.master_weights:  # update the fp32 master; the parameter gets its rounding
                    target, g = states[MASTER.name], g.float()
                if self.state_dtype == "8bit":
                    adamw8bit_update(target, g, states["exp_avg_codes"], states["exp_avg_sq_codes"],
                                     states["exp_avg_absmax"], states["exp_avg_sq_absmax"],
                                     *self._maps, **scalars)
                else:
                    adamw_update(target, g, states["exp_avg"], states["exp_avg_sq"], **scalars)
                if self.master_weights:
                    param[elems].copy_(target)

        self._pool.walk(pages, update_page)
        return loss

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self):
        """``torch.optim.Optimizer.state_dict()`` plus each parameter's moments (CPU tensors)."""
        sd = super().state_dict()
        params = self._all_params()
        state = {}
        for index, entry in sd["state"].items():
            # A fresh dict: super() returns self.state's own per-param dicts.
            state[index] = {key: value.clone() if torch.is_tensor(value) else value
                            for key, value in entry.items()}
            state[index].update(self._gather(params[index]))
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict):
        """Load a ``state_dict()`` of a PagedAdamW with the same ``state_dtype`` (fp32 states
        also load from ``torch.optim.AdamW``); pages are rebuilt and filled wherever they live."""
        params = self._all_params()
        names = {f.name for f in self._fields}
        required = names - {MASTER.name}  # a state without masters starts them from the params
        moments, stripped = {}, {}
        for index, entry in state_dict["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(f"PagedAdamW.load_state_dict: state key {index!r} is not a "
                                 f"parameter index in [0, {len(params)})")
            missing = required - entry.keys()
            if missing:
                raise ValueError(f"PagedAdamW.load_state_dict: state[{index}] lacks "
                                 f"{sorted(missing)} (state_dtype={self.state_dtype!r}); "
                                 f"it has {sorted(entry.keys())}")
            p = params[index]
            fields = {}
            for f in self._fields:
                if f.name not in entry:
                    continue
                value = entry[f.name]
                if value.numel() != f.length(p.numel()):
                    raise ValueError(f"PagedAdamW.load_state_dict: state[{index}][{f.name!r}] has "
                                     f"{value.numel()} elements, parameter {index} of shape "
                                     f"{tuple(p.shape)} needs {f.length(p.numel())}")
                if f.dtype == torch.uint8 and value.dtype != torch.uint8:
                    raise ValueError(f"PagedAdamW.load_state_dict: state[{index}][{f.name!r}] "
                                     f"must be uint8, got {value.dtype}")
                fields[f.name] = value.detach().to("cpu", f.dtype).reshape(-1)
            moments[index] = fields
            stripped[index] = {k: v for k, v in entry.items() if k not in names}
        super().load_state_dict({"state": stripped, "param_groups": state_dict["param_groups"]})
        for entry in self.state.values():
            # One CPU fp32 step counter per parameter, whatever device or type it was saved as.
            entry["step"] = torch.tensor(float(entry["step"]))
        self._build([p for p in params if p.requires_grad])
        for index, fields in moments.items():
            if params[index] in self._index:
                self._scatter(params[index], fields)

    def master_weights_cpu(self) -> dict:
        """{parameter: its fp32 master as a CPU tensor shaped like it}; empty without masters."""
        if not self.master_weights:
            return {}
        self._ensure_layout()
        return {p: self._gather(p)[MASTER.name] for p in self._params}

    # ---- accounting ------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """State bytes on the device and on the host, pages moved and seconds spent waiting for
        pages during the last ``step()`` (see ``PagePool.report``)."""
        if self._pool is None:
            self._ensure_layout()
        return self._pool.report()
