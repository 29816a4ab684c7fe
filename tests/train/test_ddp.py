"""Two CPU processes started by `accelerate launch --multi_gpu --num_processes 2` (DDP over gloo)
end with identical adapters, equal to one process training on the same global batch; and both
stop with the main process's message when the run directory is another run's."""
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from qlora.train.run_dir import lock_run_dir

SCRIPT = """
import sys
from safetensors.torch import save_file
from qlora.model.adapters import adapter_state_dict
from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.train.loop import Trainer

out, micro_batch = sys.argv[1], sys.argv[2]
cfg = resolve_config(BUILTIN_RUN, [f"train.output_dir={out}", f"train.micro_batch_size={micro_batch}",
                            "train.gradient_accumulation_steps=2", "train.max_steps=3",
                            "lora.dropout=0", "data.max_seq_len=48", "logging.progress_bar=false",
                            "logging.sample_max_new_tokens=1", "logging.exact_match_examples=0",
                            # the setting the tolerance below was worked out for
                            "lora.r=16", "lora.alpha=16", "optim.lr=2e-3"])
trainer = Trainer(cfg)
trainer.run()
rank = trainer.acc.process_index
save_file(adapter_state_dict(trainer.model), f"{out}/rank{rank}.safetensors")
"""


def test_two_process_ddp_matches_one_process(tmp_path, free_port):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    # HF_HOME: no accelerate config file of the user's may change the launch
    env = {**os.environ, "QLORA_BACKEND": "torch", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr
    # --multi_gpu selects torch's elastic launcher, which starts the processes on CPU as well;
    # accelerate's --cpu would start one process unless mpirun is set up
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
              f"--main_process_port={free_port()}"]
    two = subprocess.run([*launch, str(script), str(tmp_path / "two"), "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    rank0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        # Same tokens and normalization; only the fp32 summation order differs (gloo's
        # all-reduce, per-process matmuls), ~1e-7 relative in the gradients. Adam divides by
        # sqrt(v), so where a gradient is itself near rounding level its update (up to lr =
        # 2e-3 per step) can differ by more, in either direction: such isolated entries may be
        # off by up to the 3 steps' total movement (6e-3), but no more than 0.1% of a tensor;
        # every other entry agrees to 1e-5. A wrong loss normalization or a missing sync would
        # move most entries.
        close = torch.isclose(rank0[key], single[key], rtol=1e-4, atol=1e-5)
        assert (~close).float().mean() <= 1e-3, key
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=3 * 2e-3)

    # Only the main process locks the directory; it tells the other whether to go on, so that
    # both stop here with its message (otherwise the other would build the model and wait for
    # the dead main process in DDP's first collective).
    busy = tmp_path / "busy"
    lock = lock_run_dir(busy)
    refused = subprocess.run([*launch[:-1], f"--main_process_port={free_port()}", str(script),
                              str(busy), "2"], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=600)
    lock.release()
    assert refused.returncode != 0
    message = f"train.output_dir {busy} is in use by another run (pid {os.getpid()}"
    assert refused.stderr.count(message) >= 2, refused.stderr[-3000:]
