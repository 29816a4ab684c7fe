"""`qlora generate --model DIR [--adapter DIR] --prompt TEXT`: try a trained adapter (or a merged
export); the answer is printed as it is generated."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a prompt with a model (and adapter), "
                                                    "streaming the answer")
    parser.add_argument("--model", required=True,
                        help="Hugging Face checkpoint directory, or builtin:tiny-llama")
    parser.add_argument("--adapter", default=None, help="PEFT-format LoRA adapter directory")
    parser.add_argument("--prompt", required=True,
                        help="the instruction, wrapped in the alpaca template unless --chat or --raw")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat", action="store_true",
                          help="send the prompt as a user turn in the tokenizer's chat template "
                               "(the built-in one if it has none), as data.format: chat trains")
    template.add_argument("--raw", action="store_true", help="send the prompt text as it is")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-quant", action="store_true",
                        help="keep the base weights dense instead of NF4 (use the setting of training)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code the model directory ships (config.json auto_map), "
                             "as model.trust_remote_code: true does in training; never done otherwise")
    parser.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch

    from qlora.data.formats import prompt_ids
    from qlora.data.streaming import TextStreamer
    from qlora.train.config import Config
    from qlora.train.loop import generate
    from qlora.train.model import base_model, load_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cfg = Config()
    cfg.model.name_or_path = args.model
    cfg.quant.enabled = not args.no_quant
    cfg.model.trust_remote_code = args.trust_remote_code
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = base_model(cfg, device)
    if args.adapter is not None:
        from qlora.model.adapters import load_adapter

        load_adapter(model, args.adapter)
        model.to(device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    fmt = "chat" if args.chat else "completion" if args.raw else "alpaca"

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tokenizer, prompt_ids(tokenizer, args.prompt, fmt), args.max_new_tokens,
             streamer=TextStreamer(tokenizer, write))
    print()
    return 0
