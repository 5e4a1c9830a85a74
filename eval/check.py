"""`moshi-eval check-streaming`: does a model compute the same logits streaming as over a whole sequence?

The losses of `moshi-eval librilight` come from `LMGen.step_with_logits`, the streaming model. A model is
the model it was trained as only if every layer's streaming computation (KV cache, TTT inner weights, any
custom state) equals its whole-sequence computation in `LMModel.forward`. This check streams random codes
with teacher forcing through `step_with_logits`, runs `LMModel.forward` on the same codes, and reports, for
the text stream and each audio codebook, how far the two sets of logits are apart and from which frame.
"""
import argparse
from contextlib import ExitStack
from dataclasses import dataclass, field
import math
import sys
import time
import typing as tp

import torch
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

from moshi_patch import LMGen, teacher_force
from moshi_patch.chunking import MultiFrameStreamingError
from moshi_patch.ttt import add_ttt_layers

from .checkpoint import CheckpointError, add_checkpoint_arguments, load_checkpoint, resolve_device, resolve_dtype
from .demo import demo_lm
from .errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE

# Default tolerance on |logit difference| per model dtype. float32: streaming and forward agree to ~1e-6,
# 1e-4 leaves room for long sequences. Half precision: the two paths round differently (different matmul
# shapes), so differences of a few 1e-2 on logits of magnitude ~10 are rounding, not a bug.
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 5e-2, torch.bfloat16: 2e-1}

DIVERGENCE_MEANING = (
    "a divergence means some layer's streaming computation differs from its sequence computation "
    "(state not carried, reset or masked as in forward, or a different formula), so losses measured by "
    "streaming are not those of the model as LMModel.forward defines it.")


@dataclass
class StreamDiff:
    """|streaming - forward| logits of one stream, over the batch, valid frames and vocabulary."""
    name: str                        # "text" or "audio k" (k-th audio codebook of the model's stream)
    max_abs: float
    mean_abs: float
    first_divergent_frame: int | None   # first frame where some |diff| > tolerance; None if none
    frames_compared: int             # frames valid in forward's mask for at least one batch item


@dataclass
class CheckResult:
    """Outcome of `check_streaming`."""
    frames: int
    batch_size: int
    tolerance: float
    seed: int
    dtype: str
    seconds: float                   # wall time of the streaming passes and the forward pass
    streams: list[StreamDiff] = field(default_factory=list)
    chunk: int = 1                   # frames per step_with_logits call of the checked streaming
    # With chunk > 1: the chunked logits against the one-frame path's, every frame of every stream.
    chunk_streams: list[StreamDiff] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return all(s.first_divergent_frame is None for s in self.streams + self.chunk_streams)

    @property
    def first_divergent_frame(self) -> int | None:
        frames = [s.first_divergent_frame for s in self.streams + self.chunk_streams
                  if s.first_divergent_frame is not None]
        return min(frames) if frames else None

    def format(self) -> str:
        per_call = "one frame" if self.chunk == 1 else f"{self.chunk} frames"
        lines = [f"check-streaming: {self.frames} frames x {self.batch_size} sequences of random codes, "
                 f"{per_call} per call, {self.dtype}, tolerance {self.tolerance:.1e}, {self.seconds:.1f} s"]
        tables = [("streaming vs LMModel.forward", self.streams)]
        if self.chunk_streams:
            tables.append((f"{self.chunk}-frame chunks vs one frame per call", self.chunk_streams))
        for title, streams in tables:
            lines += [title, f"{'stream':<10} {'max|diff|':>11} {'mean|diff|':>11} {'first frame > tol':>18}"]
            for s in streams:
                first = "-" if s.first_divergent_frame is None else str(s.first_divergent_frame)
                lines.append(f"{s.name:<10} {s.max_abs:>11.3e} {s.mean_abs:>11.3e} {first:>18}")
        if self.consistent:
            lines.append(f"CONSISTENT: step_with_logits ({per_call} per call) reproduces LMModel.forward"
                         + (" and the one-frame path" if self.chunk_streams else "")
                         + f" within {self.tolerance:.1e} at every frame of every stream.")
        else:
            lines.append(f"INCONSISTENT from frame {self.first_divergent_frame}: {DIVERGENCE_MEANING}")
        return "\n".join(lines)


def random_codes(lm_model: LMModel, batch_size: int, frames: int, seed: int) -> torch.Tensor:
    """Random codes `[B, 1 + n_q, T]` valid for `lm_model` (text in [0, text_card), audio in [0, card))."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm_model.text_card, (batch_size, 1, frames), generator=gen)
    audio = torch.randint(0, lm_model.card, (batch_size, lm_model.n_q, frames), generator=gen)
    return torch.cat([text, audio], dim=1).to(lm_model.device)


@torch.no_grad()
def teacher_forced_logits(lm_model: LMModel, codes: torch.Tensor, chunk: int = 1
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stream `codes [B, 1 + n_q, T]` through `LMGen.step_with_logits`, `chunk` frames per call, teacher
    forcing the model's own streams (`moshi_patch.teacher_force`), and return the logits in the layout of
    `LMModel.forward`: text `[B, 1, T, text_card]` and audio `[B, dep_q, T, card]` (None if dep_q == 0), in
    the model dtype."""
    dep_q = lm_model.dep_q
    chunks = list(teacher_force(LMGen(lm_model, use_sampling=False), codes[:, 1:1 + dep_q], text=codes[:, 0],
                                user=codes[:, dep_q + 1:], chunk=chunk))
    text = torch.cat([c.logits.text_logits for c in chunks], dim=2)
    audio = [c.logits.audio_logits for c in chunks if c.logits.audio_logits is not None]
    return text, (torch.cat(audio, dim=2) if audio else None)


def _compare(name: str, streamed: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
             tolerance: float) -> StreamDiff:
    """streamed, reference: [B, T, card]; mask: [B, T] frames where forward's logits are valid."""
    diff = (streamed.float() - reference.float()).abs()
    diff = torch.where(torch.isnan(diff), math.inf, diff)          # a NaN where forward has a value diverges
    diff = torch.where(mask[..., None], diff, 0.0)
    count = int(mask.sum()) * diff.shape[-1]
    per_frame = diff.amax(dim=(0, 2))                               # [T]
    over = torch.nonzero(per_frame > tolerance)
    return StreamDiff(
        name=name,
        max_abs=float(per_frame.max()) if count else math.nan,
        mean_abs=float(diff.sum() / count) if count else math.nan,
        first_divergent_frame=int(over[0, 0]) if len(over) else None,
        frames_compared=int(mask.any(dim=0).sum()))


def check_streaming(lm_model: LMModel, frames: int = 64, batch_size: int = 2,
                    tolerance: float | None = None, seed: int = 0, chunk: int = 1) -> CheckResult:
    """Compare `step_with_logits` (teacher forced, `chunk` frames per call) with `LMModel.forward` on
    `batch_size` sequences of `frames` frames of random codes drawn from `seed`; with `chunk > 1`, also
    with the one-frame path at every frame.

    Raises `moshi_patch.chunking.MultiFrameStreamingError` for a model with a streaming module that cannot
    take several frames per call.

    `tolerance` bounds |logit difference|; None picks `DEFAULT_TOLERANCE` for the model dtype. Positions
    that `forward` marks invalid (the last frames of delayed codebooks) are not compared.
    """
    if not isinstance(lm_model, LMModel):
        raise TypeError(f"lm_model must be a moshi LMModel, got {type(lm_model).__name__}.")
    if lm_model.training:
        raise ValueError("lm_model is in training mode: call lm_model.eval() first (dropout makes logits random).")
    if lm_model.depformer is None or lm_model.dep_q == 0:
        raise ValueError("check_streaming needs a model with a depformer (dep_q > 0): LMModel.forward, "
                         "the reference, requires one.")
    if lm_model.fuser is not None:
        raise ValueError("check_streaming supports unconditioned models only (lm_model.fuser is set).")
    bad = [name for name, p in lm_model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"the model's weights hold NaN or inf values (in {len(bad)} tensors, first: "
                         f"{', '.join(bad[:3])}): every logit is undefined, there is nothing to compare.")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}.")
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(lm_model.dtype, 1e-1)
    elif not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}.")

    begin = time.perf_counter()
    codes = random_codes(lm_model, batch_size, frames, seed)
    with ExitStack() as stack:
        if lm_model.device.type != "cuda":
            # Moshi compiles a few functions (e.g. its output RMSNorm) lazily; on a CPU the compilation
            # costs tens of seconds and saves nothing.
            stack.enter_context(no_compile())
        streamed_text, streamed_audio = teacher_forced_logits(lm_model, codes, chunk)
        one_frame = teacher_forced_logits(lm_model, codes) if chunk > 1 else None
        with torch.no_grad():
            reference = lm_model(codes)
    seconds = time.perf_counter() - begin

    result = CheckResult(frames, batch_size, tolerance, seed, str(lm_model.dtype).replace("torch.", ""), seconds,
                         chunk=chunk)
    if one_frame is not None:
        every = torch.ones(batch_size, frames, dtype=torch.bool, device=codes.device)
        result.chunk_streams.append(_compare("text", streamed_text[:, 0], one_frame[0][:, 0], every, tolerance))
        assert streamed_audio is not None and one_frame[1] is not None
        for k in range(lm_model.dep_q):
            result.chunk_streams.append(_compare(f"audio {k}", streamed_audio[:, k], one_frame[1][:, k], every,
                                                 tolerance))
    result.streams.append(_compare("text", streamed_text[:, 0], reference.text_logits[:, 0],
                                   reference.text_mask[:, 0], tolerance))
    assert streamed_audio is not None
    for k in range(lm_model.dep_q):
        result.streams.append(_compare(f"audio {k}", streamed_audio[:, k], reference.logits[:, k],
                                       reference.mask[:, k], tolerance))
    return result


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
    parser = subparsers.add_parser(
        "check-streaming",
        help="check that streaming (step_with_logits) logits equal LMModel.forward logits",
        description=__doc__.split("\n\n")[1].replace("\n", " ") + " The model runs in float32 unless --dtype "
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
    parser.add_argument("--chunk", type=int, default=1,
                        help="frames per step_with_logits call (default 1); with N > 1 the chunked logits are "
                             "also compared with the one-frame path (what `librilight --chunk N` relies on)")
    # float32 by default on every device (the checkpoint loader would pick bfloat16 on a GPU): at 1e-4 a
    # real divergence is not hidden by half-precision rounding.
    parser.set_defaults(func=run_check_streaming, dtype="float32")


def run_check_streaming(args: argparse.Namespace) -> int:
    """`check-streaming` entry point: prints the table and the verdict. Returns 0 if consistent, 1 if not
    (or if `--chunk N` meets a streaming module that cannot take several frames per call), 2 on a usage
    error (the message goes to stderr)."""
    def usage_error(message: str) -> int:
        print(f"moshi-eval check-streaming: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    for name in ("frames", "batch_size", "mini_batch_size", "chunk"):
        if getattr(args, name) < 1:
            return usage_error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.tolerance is not None and not args.tolerance > 0:
        return usage_error(f"--tolerance must be > 0, got {args.tolerance}.")
    if args.demo:
        device = resolve_device(args.device)
        lm_model = demo_lm(seed=args.seed, device=device, dtype=resolve_dtype(args.dtype, device))
    else:
        try:
            lm_model = load_checkpoint(args).lm_model
        except CheckpointError as error:  # Exit 1 means "inconsistent": a checkpoint that won't load is 2.
            return usage_error(str(error))
    if args.ttt_layers:
        torch.manual_seed(args.seed)
        try:
            add_ttt_layers(lm_model, args.ttt_layers, mini_batch_size=args.mini_batch_size)
        except ValueError as error:
            return usage_error(f"--ttt-layers {','.join(map(str, args.ttt_layers))}: {error}")
    lm_model.eval()
    try:
        result = check_streaming(lm_model, frames=args.frames, batch_size=args.batch_size,
                                 tolerance=args.tolerance, seed=args.seed, chunk=args.chunk)
    except ValueError as error:
        return usage_error(str(error))
    except MultiFrameStreamingError as error:   # The model cannot be scored in chunks: a finding, exit 1.
        print(f"moshi-eval check-streaming: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(result.format())
    return EXIT_OK if result.consistent else EXIT_ERROR
