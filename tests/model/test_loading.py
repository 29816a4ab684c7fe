"""load_model / quantize_model: streaming NF4 loading of Hugging Face checkpoints."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qlora.model.loading import QUANT_CHUNK_ELEMENTS, load_model, quantize_chunked, quantize_model
from qlora.quant.nf4 import quantize
from qlora.nn import Linear4bit

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)


def _llama(tie=False):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=tie))


def _save(model, path, dtype=torch.bfloat16, **kwargs):
    model.to(dtype).save_pretrained(path, **kwargs)
    return path


def _dense_reference(loaded, path):
    """The checkpoint's model in fp32 with every NF4 layer's weight replaced by its dequantization:
    what the NF4 model computes, up to the order of fp32 operations."""
    ref = getattr(transformers, loaded.config.architectures[0]).from_pretrained(path).float().eval()
    with torch.no_grad():
        for name, module in loaded.named_modules():
            if isinstance(module, Linear4bit):
                w = module.weight.dequantize(torch.float32)
                target = ref.get_submodule(name)
                target.weight.copy_(w.t() if isinstance(target, Conv1D) else w)
    return ref


@pytest.mark.parametrize("shape,blocksize,double_quant,chunk", [
    ((33, 96), 64, True, 64 * 3), ((7, 13), 32, False, 32), ((301, 1000), 128, True, 1 << 12), ((5,), 64, True, 64),
])
def test_quantize_chunked_is_bit_identical_to_quantize(shape, blocksize, double_quant, chunk):
    w = torch.randn(shape, dtype=torch.bfloat16)
    a, b = quantize(w, blocksize, double_quant), quantize_chunked(w, blocksize, double_quant, chunk_elements=chunk)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert a.shape == b.shape and a.dtype == b.dtype
    if double_quant:
        assert torch.equal(a.nested_absmax, b.nested_absmax) and torch.equal(a.offset, b.offset)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_load_model_quantizes_each_linear_exactly_and_computes_like_dense(tmp_path, family):
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v have biases
    }[family]
    dense = model_cls(config_cls(**TINY, num_key_value_heads=2))
    path = _save(dense, tmp_path / family)
    model = load_model(path, compute_dtype=torch.float32, blocksize=64)
    n_nf4 = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            n_nf4 += 1
            expected = quantize(dense.get_submodule(name).weight.detach(), 64, True)  # the bf16 checkpoint tensor
            assert torch.equal(module.weight.packed, expected.packed), name
            assert torch.equal(module.weight.absmax, expected.absmax), name
            assert module.weight.dtype == torch.float32
            if dense.get_submodule(name).bias is not None:
                assert torch.equal(module.bias, dense.get_submodule(name).bias.float())
    assert n_nf4 == 7 * TINY["num_hidden_layers"]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    ref = _dense_reference(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)  # fp32, same math


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    torch.manual_seed(1)
    dense = _llama()
    single = load_model(_save(dense, tmp_path / "single"), compute_dtype=torch.float32)
    sharded_path = _save(dense, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded_path / "model.safetensors.index.json").is_file()
    sharded = load_model(sharded_path, compute_dtype=torch.float32)
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_stay_tied_and_dense(tmp_path):
    model = load_model(_save(_llama(tie=True), tmp_path / "tied"), compute_dtype=torch.float32, skip_modules=())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # not quantized on its own


def test_skip_modules_keeps_layers_dense_and_device_and_dtype_apply(tmp_path):
    model = load_model(_save(_llama(), tmp_path / "m"), compute_dtype=torch.bfloat16, device="cpu",
                       skip_modules=("lm_head", "down_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # what NF4 dequantizes to
    assert model.config._name_or_path == str(tmp_path / "m")


def test_gpt2_conv1d_layers_are_quantized_transposed(tmp_path):
    torch.manual_seed(2)
    dense = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2,
                                                                 n_head=4, eos_token_id=0, bos_token_id=0))
    path = _save(dense, tmp_path / "gpt2")
    model = load_model(path, compute_dtype=torch.float32)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Linear4bit) and c_attn.fan_in_fan_out
    expected = quantize(dense.transformer.h[0].attn.c_attn.weight.detach().t(), 64, True)
    assert torch.equal(c_attn.weight.packed, expected.packed)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _dense_reference(model, path)(ids).logits, rtol=1e-4, atol=1e-5)


def test_bert_encoder_with_biases(tmp_path):
    torch.manual_seed(3)
    dense = transformers.BertModel(transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=128))
    path = _save(dense, tmp_path / "bert", dtype=torch.float32)
    model = load_model(path, compute_dtype=torch.float32)
    assert isinstance(model.encoder.layer[1].output.dense, Linear4bit)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        got = model(ids).last_hidden_state
        torch.testing.assert_close(got, _dense_reference(model, path)(ids).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_already_bnb_quantized_checkpoint_is_taken_as_is(tmp_path):
    """A checkpoint saved by transformers with BitsAndBytesConfig (4-bit NF4, double quant)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(4)
    path = _save(_llama(), tmp_path / "dense")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config,
                                                                  dtype=torch.bfloat16)
    bnb_model.save_pretrained(tmp_path / "bnb")
    assert "quantization_config" in json.loads((tmp_path / "bnb" / "config.json").read_text())
    model = load_model(tmp_path / "bnb", compute_dtype=torch.bfloat16)
    theirs = bnb_model.model.layers[1].mlp.down_proj.weight
    ours = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(ours.packed.view(-1), theirs.data.view(-1))
    assert torch.equal(ours.absmax, theirs.quant_state.absmax)
    assert ours.offset.item() == pytest.approx(float(theirs.quant_state.offset), rel=1e-7)  # JSON round trip
    assert type(model.lm_head) is nn.Linear  # transformers keeps the head dense, so do we


def test_quantize_model_matches_load_model(tmp_path):
    torch.manual_seed(5)
    dense = _llama().to(torch.bfloat16)
    loaded = load_model(_save(dense, tmp_path / "m"), compute_dtype=torch.bfloat16)
    quantize_model(dense)
    for name, module in loaded.named_modules():
        if isinstance(module, Linear4bit):
            assert torch.equal(dense.get_submodule(name).weight.packed, module.weight.packed), name
    assert type(dense.lm_head) is nn.Linear


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    path = _save(_llama(), tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors.*pytorch_model.bin"):
        load_model(path)

    bad = _save(_llama(), tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 192
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors.*'model.layers.0.mlp.down_proj.weight' has shape"):
        load_model(bad)

    missing = _save(_llama(), tmp_path / "missing")
    from safetensors.torch import load_file
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no tensor for 'model.norm.weight'"):
        load_model(missing)

    (missing / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(missing)


# --- memory bound -----------------------------------------------------------------------------

BIG = dict(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=8, architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A ~230 MB fp32 Llama checkpoint (57M parameters) written from random tensors (no dense model
    is built), and a tiny one of the same architecture to warm up the loader's imports."""
    from accelerate import init_empty_weights

    path = tmp_path_factory.mktemp("big")
    config = transformers.LlamaConfig(**BIG)
    with init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in skeleton.state_dict().items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)), path / "warmup")
    return path


BIG_MOE = dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, architectures=["MixtralForCausalLM"])


@pytest.fixture(scope="module")
def big_moe_checkpoint(tmp_path_factory):
    """A ~160 MB bf16 Mixtral checkpoint (79M parameters, 8 experts per layer) in Mixtral's own
    layout (block_sparse_moe.experts.<e>.w1/w2/w3), which transformers renames and fuses on load;
    written from random tensors, with a tiny one to warm up the imports."""
    path = tmp_path_factory.mktemp("big-moe")
    config = transformers.MixtralConfig(**BIG_MOE)
    g = torch.Generator().manual_seed(0)
    h, i, E = BIG_MOE["hidden_size"], BIG_MOE["intermediate_size"], BIG_MOE["num_local_experts"]
    shapes = {"model.embed_tokens.weight": (512, h), "lm_head.weight": (512, h), "model.norm.weight": (h,)}
    for layer in range(BIG_MOE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + f"self_attn.{p}.weight": (h, h) for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({prefix + "input_layernorm.weight": (h,), prefix + "post_attention_layernorm.weight": (h,),
                       prefix + "block_sparse_moe.gate.weight": (E, h)})
        for e in range(E):
            shapes.update({prefix + f"block_sparse_moe.experts.{e}.{w}.weight": shape
                           for w, shape in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h)))})
    tensors = {k: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for k, shape in shapes.items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    _save(transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TINY, num_local_experts=2, num_experts_per_tok=1)), path / "warmup")
    return path


_MEASURE = textwrap.dedent("""
    import json, sys, threading, time, tracemalloc
    import torch
    from qlora.model.loading import load_model
    from qlora.nn import Linear4bit

    def rss_anon():  # anonymous memory only: the memory-mapped checkpoint pages are file cache
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    load_model(sys.argv[1] + "/warmup")  # the lazy imports of transformers must not count
    base, peak, done = rss_anon(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    try:
        model = load_model(sys.argv[1], compute_dtype=torch.bfloat16)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], rss_anon())
    nf4 = sum(m.weight.nbytes() for m in model.modules() if isinstance(m, Linear4bit))
    dense = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"peak": peak[0] - base, "python_peak": python_peak, "model": nf4 + dense}))
""")


def _measure_load(checkpoint):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")  # freed blocks go back to the OS
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(checkpoint)], env=env, capture_output=True,
                         text=True, timeout=180, cwd=checkpoint)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_the_quantized_model_plus_one_tensor(big_checkpoint):
    """Load in a fresh process (so earlier tests' memory does not count) and sample its anonymous
    RSS: the increase must stay within the loaded model + one checkpoint tensor + the chunk
    temporaries + 24 MiB for the allocator's slack and the model's Python objects, far below the
    checkpoint's size (a loader holding the dense weights would need all of it)."""
    result = _measure_load(big_checkpoint)
    checkpoint_bytes = (big_checkpoint / "model.safetensors").stat().st_size
    largest = BIG["hidden_size"] * BIG["intermediate_size"] * 4  # an fp32 gate/up/down weight
    bound = result["model"] + largest + 24 * QUANT_CHUNK_ELEMENTS + (24 << 20)
    assert checkpoint_bytes > 220e6
    assert result["peak"] <= bound, (result, bound)
    assert result["peak"] < 0.5 * checkpoint_bytes, result
    assert result["python_peak"] < (8 << 20), result  # no tensor data passes through Python objects


def test_peak_memory_of_an_moe_checkpoint_is_the_model_plus_one_fused_target(big_moe_checkpoint):
    """As above for transformers' weight conversions: the per-expert tensors of one layer are read
    when their fused target is built, and transformers' ops (stack, then concatenate) hold at most
    twice that target; then it is quantized expert by expert. Bound: the loaded model + twice the
    largest fused target (one layer's gate_up_proj, E·2i·h bf16) + chunk temporaries + 24 MiB, far
    below the checkpoint (every expert of every layer)."""
    result = _measure_load(big_moe_checkpoint)
    checkpoint_bytes = (big_moe_checkpoint / "model.safetensors").stat().st_size
    fused = BIG_MOE["num_local_experts"] * 2 * BIG_MOE["intermediate_size"] * BIG_MOE["hidden_size"] * 2
    bound = result["model"] + 2 * fused + 24 * QUANT_CHUNK_ELEMENTS + (24 << 20)
    assert checkpoint_bytes > 150e6
    assert result["peak"] <= bound, (result, bound)
    assert result["peak"] < 0.75 * checkpoint_bytes, result
    assert result["python_peak"] < (8 << 20), result


def test_the_model_does_not_refer_to_the_checkpoint_file(tmp_path):
    """safetensors hands out views of the memory-mapped file; overwriting the file in place after
    loading must not change the model (fp32 checkpoint, fp32 compute: no cast makes a copy)."""
    path = _save(_llama(), tmp_path / "m", dtype=torch.float32)
    model = load_model(path, compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    file = path / "model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    with open(file, "r+b") as f:
        f.seek(header)
        f.write(b"\x00" * (file.stat().st_size - header))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
