"""FSDP2 over gloo on CPU, two processes started by torchrun: the NF4 base is sharded by rows
(each rank holds half of its bytes, measured), the LoRA parameters shard normally, and three
training steps give the same loss and adapter as one process on the same global batch."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

STEPS, GLOBAL_BATCH, SEQ, LR = 3, 4, 32, 0.5

SCRIPT = f"""
import json, os, sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from qlora.model.fsdp import make_nf4_shardable, nf4_bytes_held
from qlora.model.inject import add_lora
from qlora.model.loading import quantize_model
from qlora.nn import Linear4bit
from qlora.train.model import builtin_model

out = sys.argv[1]
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
model = builtin_model(init_seed=0)  # hidden 256, 4 layers, k/v_proj [128, 256]
quantize_model(model, blocksize=64, double_quant=True)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(1)
    add_lora(model, r=8, alpha=16, dropout=0.0,
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
constants = sum(m.nf4.quant_map.nbytes + m.nf4.nested_quant_map.nbytes + m.nf4.offset.nbytes
                for m in model.modules() if isinstance(m, Linear4bit))
total = nf4_bytes_held(model)
if distributed:
    from torch.distributed.fsdp import fully_shard
    make_nf4_shardable(model, world)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
held = nf4_bytes_held(model)
tokens = torch.randint(0, 256, ({STEPS}, {GLOBAL_BATCH}, {SEQ}), generator=torch.Generator().manual_seed(2))
per = {GLOBAL_BATCH} // world
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr={LR})
losses, grad_max = [], 0.0
for step in range({STEPS}):
    batch = tokens[step, rank * per:(rank + 1) * per]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grad_max = max(grad_max, grad.abs().max().item())
    opt.step()
    opt.zero_grad()
    loss = loss.detach()
    if distributed:
        dist.all_reduce(loss)
        loss /= world
    losses.append(loss.item())
adapter = {{n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
           for n, p in model.named_parameters() if p.requires_grad}}
save_file(adapter, f"{{out}}/adapter{{rank}}.safetensors")
save_file(model.model.layers[0].self_attn.k_proj.base_layer.state_dict(), f"{{out}}/k_proj{{rank}}.safetensors")
with open(f"{{out}}/rank{{rank}}.json", "w") as f:
    json.dump(dict(losses=losses, grad_max=grad_max, held=held, total=total, constants=constants), f)
if distributed:
    dist.destroy_process_group()
"""


def test_two_process_fsdp2_matches_one_process(tmp_path, free_port):
    script = tmp_path / "fsdp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "QLORA_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={free_port()}"]
    two = subprocess.run([*launch, str(script), str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]

    # Memory: the NF4 codes, absmax codes and nested scales are split in halves; the per-layer
    # constants (quant maps, offset: 1,092 bytes a layer) stay on every rank.
    assert single["held"] == single["total"]
    for rank in ranks:
        assert rank["held"] == (rank["total"] - rank["constants"]) // 2 + rank["constants"]
        assert rank["held"] < 0.53 * rank["total"]

    # Both runs see the same 4 sequences a step and compute each sequence's forward on the same
    # bit-identical weights; what differs is only where the fp32 sums over the batch are cut
    # (two halves averaged by FSDP's reduce-scatter / the loss all-reduce, against one sum).
    # Reordering a sum of n fp32 terms moves it by at most n·u times the sum of magnitudes
    # (u = 2^-24); with n = 4·31 = 124 token losses: the loss to 124·u = 7.4e-6 relative.
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], rtol=124 * 2.0**-24, atol=0)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # A gradient entry sums 4·32 = 128 per-token contributions: its error is at most 128·u·max|g|
    # (taking the sum of magnitudes no larger than the largest gradient in the run), and SGD moves
    # a parameter by lr·g a step, so after 3 steps the adapters agree to 3·lr·128·u·max|g|.
    grad_max = max(single["grad_max"], ranks[0]["grad_max"])
    atol = STEPS * LR * 128 * 2.0**-24 * grad_max
    adapter = load_file(str(tmp_path / "one" / "adapter0.safetensors"))
    sharded = [load_file(str(tmp_path / "two" / f"adapter{r}.safetensors")) for r in (0, 1)]
    assert adapter.keys() == sharded[0].keys() == sharded[1].keys() and len(adapter) == 56
    for key, value in adapter.items():
        assert torch.equal(sharded[0][key], sharded[1][key]), key
        torch.testing.assert_close(sharded[0][key], value, rtol=0, atol=atol, msg=key)
    # and training did move them by far more than that
    assert max((adapter[k] - torch.zeros_like(adapter[k])).abs().max().item()
               for k in adapter if "lora_B" in k) > 1000 * atol

    # The sharded state dict: each rank has its rows of k_proj [128, 256] in bitsandbytes' keys,
    # and the ranks' bytes laid end to end are the unsharded state dict's.
    full = load_file(str(tmp_path / "one" / "k_proj0.safetensors"))
    shards = [load_file(str(tmp_path / "two" / f"k_proj{r}.safetensors")) for r in (0, 1)]
    for key in ("weight", "weight.absmax", "weight.nested_absmax"):
        assert shards[0][key].numel() == full[key].numel() // 2, key
        assert torch.equal(torch.cat([shards[0][key], shards[1][key]]), full[key]), key
    for key in ("weight.quant_map", "weight.nested_quant_map"):
        assert torch.equal(shards[0][key], full[key]) and torch.equal(shards[1][key], full[key]), key
    meta = json.loads(bytes(shards[1]["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [64, 256]
