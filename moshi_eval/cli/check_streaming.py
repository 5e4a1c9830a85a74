"""`moshi-eval check-streaming`: the arguments, and the run of `scoring.streaming.check_streaming` they ask for."""
import argparse
import sys
import typing as tp

import torch

from moshi_patch.chunking import MultiFrameStreamingError
from moshi_patch.ttt import add_ttt_layers

from ..checkpoint import CheckpointError, load_checkpoint, resolve_device, resolve_dtype
from ..config import CheckStreamingConfig, ConfigError
from ..demo import demo_lm
from ..errors import EXIT_ERROR, EXIT_OK, UsageError
from ..scoring import streaming
from ..scoring.streaming import StreamingCheckError, check_streaming
from .checkpoint_arguments import add_checkpoint_arguments


def _layer_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 1,3, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one layer index, got {text!r}")
    return values


def add_parser(subparsers: tp.Any) -> None:
    """Register the `check-streaming` subcommand on the `moshi-eval` subparsers."""
    doc = tp.cast(str, streaming.__doc__)
    parser = subparsers.add_parser(
        "check-streaming",
        help="check that streaming (step_with_logits) logits equal LMModel.forward logits",
        description=doc.split("\n\n")[1].replace("\n", " ") + " The model runs in float32 unless --dtype "
        "says otherwise: the check looks for layers that compute differently, not for rounding.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--demo", action="store_true",
                        help="check the small seeded demo model (moshi_eval.demo.demo_lm) instead of a checkpoint")
    parser.add_argument("--ttt-layers", type=_layer_list, default=None, metavar="I,J",
                        help="first insert TTT-Linear blocks after these temporal transformer layers "
                             "(moshi_patch.ttt.add_ttt_layers, seeded by --seed)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size (default 16)")
    parser.add_argument("--frames", type=int, default=64,
                        help="frames per sequence (default 64); more than the model's context also checks "
                             "the KV cache ring buffer")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences streamed together (default 2)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max |logit difference| (default 1e-4 in float32; 5e-2 in float16 and 2e-1 "
                             "in bfloat16, rough bounds for rounding)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random codes and TTT init")
    parser.add_argument("--chunk", type=int, default=16,
                        help="frames per step_with_logits call (default 16: several chunks over --frames); with "
                             "N > 1 every path of an eval run (text forced, pad and predicted, with its "
                             "rollbacks) runs chunked and one frame per call, and a divergence names the first "
                             "module whose output differs (what `librilight --chunk N` relies on); 1: only "
                             "one frame per call against LMModel.forward")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads; default: torch's default)")
    # float32 by default on every device (the checkpoint loader would pick bfloat16 on a GPU): at 1e-4 a real
    # divergence is not hidden by half-precision rounding.
    parser.set_defaults(dtype="float32")


def run_check_streaming(config: CheckStreamingConfig) -> int:
    """Prints the table and the verdict. Returns 0 if consistent, 1 if not (or if `chunk > 1` meets a streaming
    module that cannot take several frames per call). A bad option or a checkpoint that does not load raises
    `UsageError` / `ConfigError` (exit code 2: 1 means "inconsistent")."""
    config.validate()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: CheckStreamingConfig) -> int:
    if config.demo:
        device = resolve_device(config.device)
        lm_model = demo_lm(seed=config.seed, device=device, dtype=resolve_dtype(config.dtype, device))
    else:
        try:
            lm_model = load_checkpoint(config).lm_model
        except CheckpointError as error:  # Exit 1 means "inconsistent": a checkpoint that won't load is a usage error.
            raise UsageError(str(error)) from error
    if config.ttt_layers:
        torch.manual_seed(config.seed)
        try:
            add_ttt_layers(lm_model, config.ttt_layers, mini_batch_size=config.mini_batch_size)
        except ValueError as error:
            raise ConfigError(f"ttt_layers (--ttt-layers) {','.join(map(str, config.ttt_layers))}: {error}") from error
    lm_model.eval()
    try:
        result = check_streaming(lm_model, frames=config.frames, batch_size=config.batch_size,
                                 tolerance=config.tolerance, seed=config.seed, chunk=config.chunk)
    except (ValueError, StreamingCheckError) as error:
        raise UsageError(str(error)) from error
    except MultiFrameStreamingError as error:   # The model cannot be scored in chunks: a finding, exit 1.
        print(f"moshi-eval check-streaming: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(result.format())
    return EXIT_OK if result.consistent else EXIT_ERROR
