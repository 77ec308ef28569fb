"""Convert checkpoints between OLMo-core and Hugging Face formats.

  olmoe-spattn convert to-hf CHECKPOINT OUT_DIR [--tokenizer TOKENIZER] [--dtype bf16]
  olmoe-spattn convert to-hf CHECKPOINT OUT_DIR --format olmoe     # stock OLMoE, dense only
  olmoe-spattn convert from-hf HF_DIR OUT_DIR [--attention spattention --partition-len 32768]

Weights are mapped by OLMo-core's own converter (olmo_core.nn.hf).

CHECKPOINT is an OLMo-core training step folder (config.json + model_and_optim/,
distributed) or an unsharded one (model.safetensors or a weights-only model.pt, with
the experiment config.json beside it). With --format spattn (default) the HF directory
gets safetensors weights, a config.json of model_type 'olmoe_spattn' (or
'olmoe_spattn_prenorm' for the pre-norm architecture of released OLMoE) carrying
attention_pattern, partition_len and band_n_heads, and the tokenizer files; load it with
`import olmoe_spattn.hf` and transformers' AutoModelForCausalLM. --format olmoe (pre-norm
models) and --format flex_olmo (OLMo-core's OLMoE preset) write a stock transformers
directory of a dense model that plain transformers loads.

`from-hf` reads a stock Hugging Face OLMoE directory (model_type 'olmoe', e.g.
allenai/OLMoE-1B-7B-0924 downloaded with `huggingface-cli download`), a 'flex_olmo' one, or
one written by `to-hf`, and writes an OLMo-core checkpoint: model.safetensors + config.json
+ model_and_optim/ (weights only) + tokenizer/. Point a recipe's train.load_path at OUT_DIR
to continue pretraining from it; --attention picks the attention the checkpoint records.
A released OLMoE is pre-norm with RMS-norm eps 1e-5: the config.json written here holds the
exact OLMo-core model, and training checks the recipe's architecture against it.
"""

from __future__ import annotations

import argparse
import time

from ..api import BACKENDS
from ..bands import PATTERNS, partition_len_arg

#: ``--format`` values (as olmoe_spattn.hf.config_map.HF_FORMATS; not imported: --help stays light)
HF_FORMATS = ("spattn", "olmoe", "flex_olmo")

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
    to_hf.add_argument(
        "--format",
        dest="fmt",
        choices=HF_FORMATS,
        default="spattn",
        help="spattn: band model types (any attention; needs `import olmoe_spattn.hf`); olmoe / "
        "flex_olmo: stock transformers directory of a dense model (default: spattn)",
    )
    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> OLMo-core checkpoint (train.load_path)")
    from_hf.add_argument("hf_dir", help="stock 'olmoe' / 'flex_olmo' directory, or one written by `convert to-hf`")
    from_hf.add_argument("out_dir", help="folder for model.safetensors + config.json + model_and_optim/")
    from_hf.add_argument("--attention", choices=PATTERNS, default=None,
                         help="attention of the written checkpoint (default: the source's own)")
    from_hf.add_argument("--partition-len", type=partition_len_arg, default=None,
                         help="band partition length N (int >= n_heads, normally the training sequence "
                         "length, or 'dynamic'); needed for a band --attention on a dense source")
    from_hf.add_argument("--backend", choices=BACKENDS, default=None, help="band attention backend (default: auto)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..hf.convert import convert_from_hf, convert_to_hf

    start = time.perf_counter()
    if args.direction == "to-hf":
        dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
        out = convert_to_hf(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, config_path=args.config, dtype=dtype,
                           max_seq_len=args.max_seq_len, fmt=args.fmt)
    else:
        out = convert_from_hf(args.hf_dir, args.out_dir, attention=args.attention,
                              partition_len=args.partition_len, backend=args.backend)
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
