"""Adapters written from the optimizer's fp32 master weights rather than their 16-bit copies.

    with master_weights_in_place(optimizer):
        save_adapter(model, path)      # every parameter with a master holds it (fp32, CPU)

With ``PagedAdamW(master_weights=True)`` the trained values are the fp32 masters; the parameters
the model computes with are their 16-bit roundings. Inside the block each such parameter's
``data`` is its master, so whatever reads the parameters (the PEFT writer, a state dict) sees
the fp32 values; afterwards the parameters are exactly what they were. Optimizers without
masters leave the parameters alone.
"""
import contextlib


@contextlib.contextmanager
def master_weights_in_place(optimizer):
    masters = optimizer.master_weights_cpu() if hasattr(optimizer, "master_weights_cpu") else {}
    kept = {}
    try:
        for param, master in masters.items():
            kept[param] = param.data
            param.data = master
        yield
    finally:
        for param, data in kept.items():
            param.data = data
