"""A base model folder of a real model's shape with random weights, for measurements where
only the size matters (memory per worker at 1-8B): no hub download. The shape is given here,
copied from the model's published config.json; the tokenizer is SmolLM2-135M's (the same
49,152-token vocabulary as the whole SmolLM2 family).

    python benchmarks/make_base.py --shape smollm2-1.7b --dtype float32 --out /tmp/smollm2-1.7b-fp32
    python benchmarks/make_base.py --shape smollm2-1.7b --dtype bfloat16 --out /tmp/smollm2-1.7b-bf16

The two folders hold the same weights (seed 0), each stored in its own dtype, so a worker of
either dtype reads a checkpoint in the dtype it computes in (as recycle's alias copies do).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES = {
    # HuggingFaceTB/SmolLM2-1.7B-Instruct config.json
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=130000, tie_word_embeddings=True),
    # HuggingFaceTB/SmolLM2-360M-Instruct config.json
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if (args.out / "model.safetensors").is_file() or (args.out / "model.safetensors.index.json").is_file():
        print(f"{args.out}: already there")
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from recycle.basemodels import alias_folder, resolve_base

    tok_src = alias_folder(resolve_base("smollm2-135m").name)
    cfg = LlamaConfig(**SHAPES[args.shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)  # float32 init, then cast: both folders hold the same values
    model = model.to(getattr(torch, args.dtype))
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="20GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, tmp / f)
    tmp.rename(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {n / 1e9:.2f}B parameters in {args.dtype}")


if __name__ == "__main__":
    main()
