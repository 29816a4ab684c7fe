"""Gradient checkpointing of decoder layers, optionally offloading each layer's input to host.

Checkpointing keeps, per decoder layer, only the layer's input and recomputes the layer in the
backward pass. With offload, that input does not stay on the GPU either: the forward copies it
to a pinned host buffer on a side CUDA stream (the copy overlaps the next layers' compute), and
the backward of layer i brings layer i - 1's input back on the side stream while layer i
recomputes, so the copy is hidden behind compute. Saved activations on the GPU drop from
(layers x tokens x hidden) to about two layers' worth.

Use ``enable_checkpointing(model, offload=...)`` on a Hugging Face model. Without CUDA (the
layer input on CPU) the offloaded path degrades to plain non-reentrant checkpointing
(``torch.utils.checkpoint``): there is no device memory to save.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint


class PinnedBufferPool:
    """Reusable pinned host buffers, by (numel, dtype): pinning is slow, so buffers are kept
    across steps. A buffer goes back to the pool once its device-bound copy is queued; the next
    copy into it is queued on the same stream, so it cannot overtake the read."""

    def __init__(self):
        self._free = {}

    def acquire(self, numel, dtype):
        free = self._free.get((numel, dtype))
        if free:
            return free.pop()
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def release(self, buffer):
        self._free.setdefault((buffer.numel(), buffer.dtype), []).append(buffer)


class OffloadedInput:
    """One layer input, copied to host and brought back on demand.

    On CUDA the copies run on ``stream`` and are ordered against the compute stream with
    events. A CPU tensor is kept as a host copy taken synchronously (what the offloaded
    checkpoint function does when handed CPU tensors, e.g. in tests without a GPU).
    """

    def __init__(self, x, pool, stream):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.pool, self.stream = pool, stream
        self.on_device = None
        if not x.is_cuda:
            self.host = x.detach().clone()
            return
        self.host = pool.acquire(x.numel(), x.dtype)
        compute = torch.cuda.current_stream(x.device)
        stream.wait_stream(compute)  # x is complete before it is read
        with torch.cuda.stream(stream):
            self.host.copy_(x.detach().reshape(-1), non_blocking=True)
        x.record_stream(stream)  # x's memory is not reused before the copy has read it

    def prefetch(self):
        """Queue the copy back to the device (once); returns at once."""
        if self.on_device is not None or self.host is None:
            return
        if self.device.type != "cuda":
            self.on_device, self.host = self.host, None
            return
        compute = torch.cuda.current_stream(self.device)
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.stream.wait_stream(compute)  # the block buffer reuses is free on the compute stream
        with torch.cuda.stream(self.stream):
            buffer.view(-1).copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)
        buffer.record_stream(self.stream)
        self.pool.release(self.host)
        self.on_device, self.host = buffer, None

    def fetch(self):
        """The input on its device, ready for use on the current stream."""
        self.prefetch()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.on_device = self.on_device, None
        return x


class OffloadSchedule:
    """Per model: the side stream, the host buffer pool, and the latest offloaded input of each
    layer, so the backward of layer i can prefetch the input of layer i - 1."""

    def __init__(self):
        self.pool = PinnedBufferPool()
        self._streams = {}
        self.inputs = {}

    def offload(self, layer_index, x):
        stream = None
        if x.is_cuda:
            if x.device not in self._streams:
                self._streams[x.device] = torch.cuda.Stream(x.device)
            stream = self._streams[x.device]
        saved = OffloadedInput(x, self.pool, stream)
        self.inputs[layer_index] = saved
        return saved

    def prefetch(self, layer_index):
        saved = self.inputs.get(layer_index)
        if saved is not None:
            saved.prefetch()

    def done(self, layer_index, saved):
        if self.inputs.get(layer_index) is saved:
            del self.inputs[layer_index]


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class OffloadedCheckpointFunction(torch.autograd.Function):
    """y = run(x), keeping only x (offloaded) and recomputing run in the backward.

    The trainable parameters of the layer are passed as inputs so that gradients reach them
    even when x does not require grad (frozen embeddings under LoRA). RNG and autocast state
    are replayed, so dropout masks match between the forward and the recompute.
    """

    @staticmethod
    def forward(ctx, run, schedule, layer_index, x, *params):
        ctx.run, ctx.schedule, ctx.layer_index = run, schedule, layer_index
        ctx.x_requires_grad = x.requires_grad
        ctx.rng_state = _rng_state(x.device)
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        # queued before the layer runs, so the copy to host overlaps the layer's compute
        ctx.saved_input = schedule.offload(layer_index, x)
        with torch.no_grad():
            y = run(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"offloaded checkpoint: the layer must return one tensor, got "
                            f"{type(y).__name__}")
        ctx.save_for_backward(*params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x = ctx.saved_input.fetch()
        ctx.schedule.done(ctx.layer_index, ctx.saved_input)
        ctx.schedule.prefetch(ctx.layer_index - 1)  # overlaps the recompute below
        params = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.x_requires_grad)
        cpu_rng, cuda_rng = ctx.rng_state
        devices = [x.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            y = ctx.run(x)
        inputs = ([x] if ctx.x_requires_grad else []) + list(params)
        grads = list(torch.autograd.grad(y, inputs, grad_y, allow_unused=True))
        grad_x = grads.pop(0) if ctx.x_requires_grad else None
        return (None, None, None, grad_x, *grads)


def decoder_layers(model):
    """The decoder layers of a Hugging Face model: its GradientCheckpointingLayer modules."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed_forward(layer, layer_index, schedule):
    layer_forward = type(layer).forward.__get__(layer)

    @functools.wraps(layer_forward)
    def forward(hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return layer_forward(hidden_states, *args, **kwargs)
        # As transformers' own checkpointing does: a KV cache would be written twice (forward
        # and recompute) and would keep every layer's keys and values alive. Transformers 5
        # passes it as `cache`, 4.x as `past_key_values`.
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        def run(x):
            return layer_forward(x, *args, **kwargs)

        if schedule is not None and hidden_states.is_cuda:
            params = [p for p in layer.parameters() if p.requires_grad]
            return OffloadedCheckpointFunction.apply(run, schedule, layer_index, hidden_states,
                                                     *params)
        return checkpoint(run, hidden_states, use_reentrant=False)

    return forward


def enable_checkpointing(model, offload):
    """Checkpoint every decoder layer of ``model`` (offloading its input to host if ``offload``
    and the layer runs on CUDA). Returns the number of layers wrapped.

    Only active while gradients are enabled; evaluation runs the layers unchanged. Replaces
    transformers' own gradient checkpointing, which must be off.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"enable_checkpointing: {type(model).__name__} has no decoder layers "
                         f"(transformers GradientCheckpointingLayer modules)")
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            raise ValueError(f"enable_checkpointing: transformers' gradient checkpointing is on "
                             f"for {type(layer).__name__}; turn it off "
                             f"(model.gradient_checkpointing_disable()) and use this instead")
    schedule = OffloadSchedule() if offload else None
    for index, layer in enumerate(layers):
        layer.forward = _checkpointed_forward(layer, index, schedule)
    return len(layers)


def disable_checkpointing(model):
    """Undo ``enable_checkpointing``: the layers run their class forward again."""
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)
