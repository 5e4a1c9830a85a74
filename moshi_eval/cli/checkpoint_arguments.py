"""The checkpoint flags every command shares; they parse into `config.ModelSource`."""
import argparse
from pathlib import Path

from moshi.models import loaders


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--hf-repo --moshi-weight --mimi-weight --tokenizer --config --mimi-config --lora-weight --fuse-lora
    --checkpoint-dir --device --dtype."""
    group = parser.add_argument_group("checkpoint (moshi.models.loaders.CheckpointInfo)")
    group.add_argument("--hf-repo", default=None,
                       help=f"Hugging Face repo of the checkpoint, e.g. {loaders.DEFAULT_REPO}")
    group.add_argument("--moshi-weight", default=None, help="LM weights: local path or hf://repo/file")
    group.add_argument("--mimi-weight", default=None, help="Mimi weights: local path or hf://repo/file")
    group.add_argument("--tokenizer", default=None, help="text tokenizer (sentencepiece): local path or hf://")
    group.add_argument("--config", default=None, help="LM config.json (moshi's format), overrides the repo's")
    group.add_argument("--mimi-config", default=None, help="Mimi config JSON, for a non-default codec")
    group.add_argument("--lora-weight", default=None,
                       help="LoRA adapters (safetensors, e.g. moshi-finetune's lora.safetensors): local path or "
                            "hf://repo/file; the config must say `lora: true`")
    group.add_argument("--fuse-lora", action=argparse.BooleanOptionalAction, default=True,
                       help="merge the LoRA adapters into the weights after loading (--no-fuse-lora keeps the "
                            "LoRA layers)")
    group.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="a moshi-finetune checkpoint folder (checkpoint_NNNNNN or its consolidated/ folder: "
                            "config.json with lora.safetensors or consolidated.safetensors); Mimi and the "
                            "tokenizer come from --hf-repo or the local flags")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="LM dtype (default: bfloat16 on cuda, float32 on cpu)")
