"""Convert checkpoints between OLMo-core and Hugging Face formats.

  olmoe-spattn convert to-hf CHECKPOINT OUT_DIR [--tokenizer TOKENIZER] [--dtype bf16]
  olmoe-spattn convert from-hf HF_DIR OUT_DIR

CHECKPOINT is an OLMo-core training step folder (config.json + model_and_optim/,
distributed) or an unsharded one (model.safetensors or a weights-only model.pt, with
the experiment config.json beside it). The HF directory gets safetensors weights, a
config.json of model_type 'olmoe_spattn' carrying attention_pattern, partition_len and
band_n_heads, and the tokenizer files. Load it with `import olmoe_spattn.hf` and
transformers' AutoModelForCausalLM. `from-hf` writes an unsharded OLMo-core checkpoint
(model.safetensors + config.json + tokenizer/).
"""

from __future__ import annotations

import argparse
import time

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="direction", metavar="<direction>")
    sub.required = True
    to_hf = sub.add_parser("to-hf", help="OLMo-core checkpoint -> Hugging Face directory")
    to_hf.add_argument("checkpoint", help="OLMo-core checkpoint: step folder, model_and_optim/, or unsharded weights")
    to_hf.add_argument("out_dir", help="Hugging Face directory to write")
    to_hf.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a HF tokenizer folder to copy (default: tokenizer files found in the checkpoint)",
    )
    to_hf.add_argument("--config", default=None, help="experiment config.json (default: the checkpoint's)")
    to_hf.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context length recorded as max_position_embeddings (default: the experiment's "
        "dataset.sequence_length, else the partition length, else 4096)",
    )
    to_hf.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the weights (default: keep)")
    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> unsharded OLMo-core checkpoint")
    from_hf.add_argument("hf_dir", help="directory written by `convert to-hf`")
    from_hf.add_argument("out_dir", help="folder for model.safetensors + config.json")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..hf.convert import convert_from_hf, convert_to_hf

    start = time.perf_counter()
    if args.direction == "to-hf":
        dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
        out = convert_to_hf(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, config_path=args.config, dtype=dtype,
                           max_seq_len=args.max_seq_len)
    else:
        out = convert_from_hf(args.hf_dir, args.out_dir)
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
