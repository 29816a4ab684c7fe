"""The input embedding in host memory: each batch's rows are gathered on the CPU and copied over.

    move_embedding_to_host(model)      # -> bytes the device no longer holds

The embedding of a 128k-token vocabulary at hidden size 4096 is 1 GB in bf16, of which a batch
reads N rows (N·a·h bytes, 1 MB per 128 tokens). ``HostEmbedding`` keeps the table in (pinned)
host memory, gathers the rows there with the same ``F.embedding`` and copies them to the compute
device: the output is bit for bit that of the device-resident table. The table stays a buffer
named ``weight``, so state dicts keep the key ``...embed_tokens.weight``, and it is not a
parameter, so ``model.device`` and the optimizer see only what lives on the device.
"""
import torch
from torch import nn


class HostEmbedding(nn.Module):
    """An ``nn.Embedding``'s table in host memory, serving rows to ``device``."""

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.padding_idx = embedding.padding_idx
        weight = embedding.weight.detach().to("cpu")
        if self.device.type == "cuda":
            weight = weight.pin_memory()
        self.register_buffer("weight", weight)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        rows = torch.empty((*ids.shape, self.embedding_dim), dtype=self.weight.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.embedding_dim))
        return rows.to(self.device, non_blocking=True)

    def _apply(self, fn, recurse=True):
        # model.to(device, dtype): follow the dtype, remember the device, keep the table here
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device))
        self.device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight = self.weight.to(probe.dtype)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory, rows to {self.device}"


def move_embedding_to_host(model) -> int:
    """Replace the input embedding of a Hugging Face model by a ``HostEmbedding``. Returns the
    bytes of the table. The table must be frozen and not shared with the output layer."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, HostEmbedding):
        return 0
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"embedding on host: the input embedding is a "
                         f"{type(embedding).__name__}, not an nn.Embedding")
    if embedding.weight.requires_grad:
        raise ValueError("embedding on host: the input embedding is trained (lora.modules_to_save?)"
                         "; only a frozen table can live in host memory")
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        raise ValueError("embedding on host: the input embedding is tied to the output layer, "
                         "which needs it on the device")
    host = HostEmbedding(embedding, embedding.weight.device)
    model.set_input_embeddings(host)
    return host.weight.numel() * host.weight.element_size()
