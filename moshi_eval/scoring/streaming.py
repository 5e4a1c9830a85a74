"""Does a model compute the same logits streaming as over a whole sequence? (`moshi-eval check-streaming`)

The losses of `moshi-eval librilight` come from `LMGen.step_with_logits`, the streaming model. A model is
the model it was trained as only if every layer's streaming computation (KV cache, TTT inner weights, any
custom state) equals its whole-sequence computation in `LMModel.forward`. This check streams random codes
with teacher forcing through `step_with_logits`, runs `LMModel.forward` on the same codes, and reports, for
the text stream and each audio codebook, how far the two sets of logits are apart and from which frame.
"""
from contextlib import ExitStack
from dataclasses import dataclass, field
import math
import time
import typing as tp

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from moshi.utils.compile import no_compile

from moshi_patch import LMGen, teacher_force
from moshi_patch.chunking import MultiFrameStreamingError
from moshi_patch.ttt import TTTLinear

from ..errors import MoshiEvalError

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
    # With chunk > 1: every path of an eval run (each text mode, with the rollback of predicted text).
    paths: list["PathCheck"] = field(default_factory=list)
    unstreamed: list[str] = field(default_factory=list)    # streaming modules left out of streaming

    @property
    def consistent(self) -> bool:
        return (all(s.first_divergent_frame is None for s in self.streams + self.chunk_streams)
                and all(p.consistent for p in self.paths) and not self.unstreamed)

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
        if self.paths:
            lines.append("paths of an eval run (text mode; chunks vs one frame per call, per-module outputs "
                         "compared on a divergence):")
            lines += [f"  {p.verdict(self.chunk)}" for p in self.paths]
        reported = {k for p in self.paths if not p.consistent for k in p.state_outside}
        warnings = sorted({k for p in self.paths for k in p.state_outside} - reported)
        if warnings:
            lines.append(f"warning: state kept outside moshi's State ({', '.join(warnings[:5])}): no path "
                         "differed here, but a rollback cannot restore it.")
        if self.unstreamed:
            lines.append(f"NOT STREAMED: {', '.join(self.unstreamed)} never enter streaming mode (moshi caches a "
                         "model's streaming children when it first streams: a layer inserted afterwards is "
                         "missed); each call runs them as a whole sequence.")
        if self.consistent:
            lines.append(f"CONSISTENT: step_with_logits ({per_call} per call) reproduces LMModel.forward"
                         + (" and the one-frame path in every text mode" if self.chunk_streams else "")
                         + f" within {self.tolerance:.1e} at every frame of every stream.")
        elif any(p.refused for p in self.paths) or self.unstreamed:
            lines.append("INCONSISTENT: an eval run would refuse this model or score it wrongly (above).")
        elif self.first_divergent_frame is None:
            lines.append(f"INCONSISTENT: an eval path diverges (above): {DIVERGENCE_MEANING}")
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


# Text modes a run can score in, as check_streaming streams them: "forced" (the random codes' own text, what
# LMModel.forward is given), "pad" (`librilight --text pad`) and "predicted" (`--text predicted`, the default:
# the model's argmax; with chunks, guessed and rolled back on a wrong guess).
TEXT_PATHS = ("forced", "pad", "predicted")
# Streaming modules whose chunked and rolled-back streaming the project tests (moshi's own, TTT-Linear): a model
# with any other is verified at the start of an eval run (`verify_streaming`).
KNOWN_STREAMING_MODULES = (TTTLinear,)


class StreamingCheckError(MoshiEvalError, RuntimeError):
    """The eval's chunked path differs from its one-frame path on this model: the message is the verdict."""


@dataclass
class ModuleDivergence:
    """The first module (in execution order, at the earliest frame) whose output differs between two paths."""
    name: str
    kind: str                        # its class name
    frame: int
    max_abs: float


@dataclass
class PathCheck:
    """The chunked path against the one-frame path, for one text mode, every frame of every stream."""
    text: str                        # one of TEXT_PATHS
    streams: list[StreamDiff] = field(default_factory=list)
    refused: str | None = None       # the error the eval stops with on this path (e.g. a state it cannot roll back)
    module: ModuleDivergence | None = None   # where the divergence starts, when the logits diverge
    state_outside: list[str] = field(default_factory=list)   # module attributes changed by streaming

    @property
    def consistent(self) -> bool:
        return self.refused is None and all(s.first_divergent_frame is None for s in self.streams)

    def verdict(self, chunk: int) -> str:
        what = f"text {self.text}, {chunk}-frame chunks vs one frame per call"
        if self.refused is not None:
            return f"{what}: REFUSED by the eval: {self.refused}"
        if self.consistent:
            return f"{what}: consistent"
        first = min(s.first_divergent_frame for s in self.streams if s.first_divergent_frame is not None)
        worst = max(s.max_abs for s in self.streams)
        line = f"{what}: DIVERGES from frame {first} (max |logit diff| {worst:.3e})"
        if self.module is not None:
            m = self.module
            line += (f"; first module whose output differs: {m.name} ({m.kind}) at frame {m.frame} "
                     f"(max |diff| {m.max_abs:.3e})")
        if self.state_outside:
            line += (f"; state kept outside moshi's State, which rollback cannot restore: "
                     f"{', '.join(self.state_outside[:5])}")
        return line


def unstreamed_modules(lm_model: LMModel) -> list[str]:
    """Streaming modules of the temporal transformer left out of streaming (call inside `streaming()`):
    moshi caches a model's streaming children the first time it streams, so a layer inserted afterwards is
    never put in streaming mode and sees each call as a whole sequence."""
    found = []
    for name, module in lm_model.transformer.named_modules():
        if isinstance(module, StreamingModule) and module._streaming_state is None:
            found.append(f"transformer.{name}" if name else "transformer")
    return found


def unknown_streaming_modules(lm_model: LMModel) -> list[str]:
    """Streaming modules of the temporal transformer that are neither moshi's own nor `KNOWN_STREAMING_MODULES`,
    as `name (Class)`."""
    found = []
    for name, module in lm_model.transformer.named_modules():
        if not isinstance(module, StreamingModule) or isinstance(module, KNOWN_STREAMING_MODULES):
            continue
        if not type(module).__module__.startswith("moshi."):
            found.append(f"transformer.{name} ({type(module).__name__})")
    return found


class ModuleOutputs:
    """`with ModuleOutputs(lm_model):` records, while streaming, the output of the temporal transformer and of
    every module under it, per frame: `outputs[name][frame]` is `[B, ...]` (float32, CPU). A frame run again
    (rollback of a wrong text guess) keeps its last output, the one the stream went on from."""

    def __init__(self, lm_model: LMModel) -> None:
        self.root = lm_model.transformer
        self.outputs: dict[str, dict[int, torch.Tensor]] = {}
        self.order: dict[str, int] = {}            # first firing: children fire before their parents
        self.kinds = {self._name(n): type(m).__name__ for n, m in self.root.named_modules()}
        self._start, self._length, self._batch = 0, 0, 0
        self._handles: list[tp.Any] = []

    @staticmethod
    def _name(name: str) -> str:
        return f"transformer.{name}" if name else "transformer"

    def __enter__(self) -> "ModuleOutputs":
        self._handles.append(self.root.register_forward_pre_hook(self._pre))
        for name, module in self.root.named_modules():
            self._handles.append(module.register_forward_hook(self._hook(self._name(name))))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, module: tp.Any, args: tuple) -> None:
        state = module._streaming_state
        x = args[0]
        self._start = int(state.offsets[0]) if state is not None else 0
        self._batch, self._length = int(x.shape[0]), int(x.shape[1])

    def _hook(self, name: str) -> tp.Callable:
        def hook(module: tp.Any, args: tuple, output: tp.Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or tuple(out.shape[:2]) != (self._batch,
                                                                                              self._length):
                return
            self.order.setdefault(name, len(self.order))
            frames = self.outputs.setdefault(name, {})
            for i in range(self._length):
                frames[self._start + i] = out[:, i].detach().float().cpu().clone()
        return hook


def first_divergent_module(tested: ModuleOutputs, reference: ModuleOutputs,
                           tolerance: float) -> ModuleDivergence | None:
    """The module whose output first differs by more than `tolerance` (relative to 1 + its magnitude): the
    earliest frame, and at that frame the first to run."""
    best: tuple[int, int, ModuleDivergence] | None = None
    for name, order in reference.order.items():
        mine = tested.outputs.get(name, {})
        for frame in sorted(set(mine) & set(reference.outputs[name])):
            ref = reference.outputs[name][frame]
            if mine[frame].shape != ref.shape:
                continue
            diff = (mine[frame] - ref).abs()
            diff = torch.where(torch.isnan(diff), math.inf, diff)
            worst = float(diff.max()) if diff.numel() else 0.0
            if worst > tolerance * (1 + float(ref.abs().max())):
                if best is None or (frame, order) < best[:2]:
                    best = (frame, order, ModuleDivergence(name, reference.kinds.get(name, "?"), frame, worst))
                break
    return None if best is None else best[2]


def _attribute_state(lm_model: LMModel) -> dict[str, tp.Any]:
    """Tensors, lists and dicts held by streaming modules outside their moshi State (attributes and buffers)."""
    found: dict[str, tp.Any] = {}
    for name, module in lm_model.transformer.named_modules():
        if not isinstance(module, StreamingModule):
            continue
        values = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        values.update({k: v for k, v in module._buffers.items() if v is not None})
        for attr, value in values.items():
            key = f"transformer.{name}.{attr}" if name else f"transformer.{attr}"
            if isinstance(value, torch.Tensor):
                found[key] = value.detach().clone()
            elif isinstance(value, (list, dict, set)):
                found[key] = repr(value)
    return found


def _changed(before: dict[str, tp.Any], after: dict[str, tp.Any]) -> list[str]:
    changed = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or not torch.equal(a, b):
                changed.append(key)
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
            changed.append(key)
    return changed


@dataclass
class _Streamed:
    text_logits: torch.Tensor                  # [B, 1, T, text_card]
    audio_logits: torch.Tensor                 # [B, dep_q, T, card]
    state_outside: list[str]


@torch.no_grad()
def stream_path(lm_model: LMModel, codes: torch.Tensor, chunk: int, text: str) -> _Streamed:
    """Stream `codes [B, 1 + n_q, T]` as an eval run does in text mode `text` (TEXT_PATHS), `chunk` frames per
    call, the model's audio teacher forced; the logits in the layout of `LMModel.forward`."""
    B, _, T = codes.shape
    dep_q = lm_model.dep_q
    lm_gen = LMGen(lm_model, use_sampling=False)
    text_logits, audio_logits = [], []
    with lm_gen.streaming(B):
        before = _attribute_state(lm_model)
        for forced in teacher_force(lm_gen, codes[:, 1:1 + dep_q], text=codes[:, 0] if text == "forced" else text,
                                    user=codes[:, dep_q + 1:], chunk=chunk):
            text_logits.append(forced.logits.text_logits)
            audio_logits.append(forced.logits.audio_logits)
        state_outside = _changed(before, _attribute_state(lm_model))
    return _Streamed(torch.cat(text_logits, dim=2)[:, :, :T], torch.cat(audio_logits, dim=2)[:, :, :T],
                     state_outside)


def check_path(lm_model: LMModel, codes: torch.Tensor, chunk: int, text: str, tolerance: float) -> PathCheck:
    """The eval's chunked path against its one-frame path in text mode `text`, on `codes`; on a divergence,
    both run again with every module's output recorded, to name the first module that differs."""
    result = PathCheck(text)
    B, _, T = codes.shape
    try:
        chunked = stream_path(lm_model, codes, chunk, text)
    except MultiFrameStreamingError as exc:
        result.refused = str(exc)
        return result
    one = stream_path(lm_model, codes, 1, text)
    every = torch.ones(B, T, dtype=torch.bool, device=codes.device)
    result.streams.append(_compare("text", chunked.text_logits[:, 0], one.text_logits[:, 0], every, tolerance))
    for k in range(lm_model.dep_q):
        result.streams.append(_compare(f"audio {k}", chunked.audio_logits[:, k], one.audio_logits[:, k], every,
                                       tolerance))
    result.state_outside = sorted(set(chunked.state_outside) | set(one.state_outside))
    if not result.consistent:
        with ModuleOutputs(lm_model) as tested:
            stream_path(lm_model, codes, chunk, text)
        with ModuleOutputs(lm_model) as reference:
            stream_path(lm_model, codes, 1, text)
        result.module = first_divergent_module(tested, reference, tolerance)
    return result


def verify_streaming(lm_model: LMModel, chunk: int, text: str, frames: int = 24, seed: int = 0) -> str | None:
    """What an eval run checks first on a model with streaming modules the project does not know
    (`unknown_streaming_modules`) or left out of streaming: a short comparison of its chunked path (`chunk`
    frames per call, at most 8 so that several calls and rollbacks happen) against its one-frame path in text
    mode `text`. Returns a line saying what was verified (None if nothing needed it).

    Raises:
        StreamingCheckError: the paths differ, or the eval would refuse the model; the message is the verdict.
    """
    codes = random_codes(lm_model, 1, frames, seed)
    with _StreamingProbe(lm_model) as unstreamed:
        pass
    if unstreamed:
        raise StreamingCheckError(
            f"streaming modules never put in streaming mode: {', '.join(unstreamed)} (moshi caches a model's "
            "streaming children the first time it streams; a layer inserted afterwards is missed). Insert layers "
            "before the model first streams, or reset `_cached_children` of every StreamingModule of the model.")
    unknown = unknown_streaming_modules(lm_model)
    if not unknown or chunk <= 1:
        return None
    with ExitStack() as stack:
        if lm_model.device.type != "cuda":
            stack.enter_context(no_compile())
        result = check_path(lm_model, codes, min(chunk, 8), text, DEFAULT_TOLERANCE.get(lm_model.dtype, 1e-1))
    if not result.consistent:
        raise StreamingCheckError(
            f"the model has streaming modules this project does not know ({', '.join(unknown[:5])}), and its "
            f"chunked path differs from its one-frame path, which the numbers would depend on: "
            f"{result.verdict(min(chunk, 8))}. Run `moshi-eval check-streaming` on it for every path; score "
            "with --chunk 1 if only chunks differ; --no-verify-streaming skips this check.")
    return (f"verified streaming of {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}: "
            f"{result.verdict(min(chunk, 8))} ({frames} frames of random codes)")


class _StreamingProbe:
    """`with _StreamingProbe(lm_model) as unstreamed:` puts the model in streaming mode as an eval
    run does (through `LMGen`) and lists the streaming modules left out (`unstreamed_modules`)."""

    def __init__(self, lm_model: LMModel) -> None:
        self.lm_gen = LMGen(lm_model, use_sampling=False)
        self._stack = ExitStack()

    def __enter__(self) -> list[str]:
        lm_model = self.lm_gen.lm_model
        streaming = [name or "<root>" for name, m in lm_model.named_modules()
                     if isinstance(m, StreamingModule) and m._streaming_state is not None]
        if streaming:
            # moshi would stop on an assert with an empty name ("  is already streaming!").
            raise StreamingCheckError(
                f"the model is already streaming ({', '.join(streaming[:3])}{' ...' if len(streaming) > 3 else ''} "
                "hold a streaming state): a stream opened earlier (`lm_model.streaming()`, `streaming_forever()` or "
                "an LMGen's `streaming()`) is still open. Leave its `with` block before scoring: streams cannot be "
                "nested.")
        self._stack.enter_context(self.lm_gen.streaming(1))
        return unstreamed_modules(lm_model)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def check_streaming(lm_model: LMModel, frames: int = 64, batch_size: int = 2,
                    tolerance: float | None = None, seed: int = 0, chunk: int = 1,
                    text_paths: tp.Sequence[str] = TEXT_PATHS) -> CheckResult:
    """Compare `step_with_logits` (teacher forced, `chunk` frames per call) with `LMModel.forward` on
    `batch_size` sequences of `frames` frames of random codes drawn from `seed`; with `chunk > 1`, also
    with the one-frame path at every frame.

    Raises `moshi_patch.chunking.MultiFrameStreamingError` for a model with a streaming module that cannot
    take several frames per call.

    With `chunk > 1`, every path an eval run can take is also run, chunked and one frame per call, for each
    text mode of `text_paths` (`PathCheck`: "predicted" guesses the text and rolls back on a wrong guess); a
    path the eval would refuse (a state it cannot roll back) is reported as such, and a divergence names the
    first module whose output differs. Streaming modules left out of streaming are reported too.

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
    unknown_paths = [t for t in text_paths if t not in TEXT_PATHS]
    if unknown_paths:
        raise ValueError(f"text_paths must be among {TEXT_PATHS}, got {list(text_paths)}.")

    begin = time.perf_counter()
    codes = random_codes(lm_model, batch_size, frames, seed)
    with ExitStack() as stack:
        if lm_model.device.type != "cuda":
            # Moshi compiles a few functions (e.g. its output RMSNorm) lazily; on a CPU the compilation
            # costs tens of seconds and saves nothing.
            stack.enter_context(no_compile())
        with _StreamingProbe(lm_model) as unstreamed:
            pass
        paths = [check_path(lm_model, codes, chunk, text, tolerance) for text in text_paths] if chunk > 1 else []
        streamed_text, streamed_audio = teacher_forced_logits(lm_model, codes, chunk)
        one_frame = teacher_forced_logits(lm_model, codes) if chunk > 1 else None
        with torch.no_grad():
            reference = lm_model(codes)
    seconds = time.perf_counter() - begin

    result = CheckResult(frames, batch_size, tolerance, seed, str(lm_model.dtype).replace("torch.", ""), seconds,
                         chunk=chunk, paths=paths, unstreamed=unstreamed)
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


def streaming_structure(lm_model: LMModel) -> tuple:
    """What a verification holds for: every streaming module of the model, by name, class and object. A layer
    inserted, replaced or moved gives another structure; a training step (new weights) does not."""
    return tuple((name, f"{type(m).__module__}.{type(m).__qualname__}", id(m))
                 for name, m in lm_model.named_modules() if isinstance(m, StreamingModule))


class StreamingVerifier:
    """`verify_streaming` at every call on a model whose streaming structure (`streaming_structure`) it has not
    verified yet: every task runs one, so a layer inserted into a model scored before is verified too."""

    def __init__(self) -> None:
        self._verified: set[tuple] = set()

    def __call__(self, lm_model: LMModel, chunk: int, text: str) -> str | None:
        structure = streaming_structure(lm_model)
        if structure in self._verified:
            return None
        message = verify_streaming(lm_model, chunk, text)
        self._verified.add(structure)
        return message
