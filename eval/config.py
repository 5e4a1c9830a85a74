"""Typed configuration of an eval run: what the command line parses into, and what the library takes.

- `LibriLightConfig`: the books (LibriLight layout) and how they are scored and reported;
- `RunConfig`: where and how a command line run works (output folder, code cache, threads, progress bars);
- `ModelSource`: where a checkpoint comes from (the `moshi.models.loaders.CheckpointInfo` files).

Only `moshi_eval.cli` turns command line arguments into these; everything else under `moshi_eval` takes them.
The defaults are the `moshi-eval librilight` ones; `demo_config()` gives the `moshi-eval demo` ones.
"""
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
import typing as tp

from .bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from .loss import DEFAULT_FIRST_CODEBOOK_WEIGHT
from .metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT
from .scoring import DEFAULT_CHUNK, TEXT_MODES, USER_STREAMS
from .errors import EXIT_USAGE, MoshiEvalError


class ConfigError(MoshiEvalError, ValueError):
    """A configuration value out of range; the message names the field (the command line flag)."""

    exit_code = EXIT_USAGE      # a bad option: the command line's fault, as argparse's own errors


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass
class LibriLightConfig:
    """The LibriLight task: which books, how each is scored, how the curve is reported.

    Scoring (the per-book numbers depend on these): `max_chapters`, `max_frames`, `user_stream` ("silence":
    Mimi codes of digital silence; "zero": no input), `text` ("predicted": the model's argmax; "pad"),
    `first_codebook_weight` (codebook 0's weight in `audio_ce_weighted`), `chunk` (frames per streaming
    call) and `batch_size` (books streamed together, batched by length).
    Selection: `num_books` (the first N), `min_frames` (skip shorter books), `strict` (an unreadable file is an
    error instead of a skipped book). Reporting: `report_at` (frames), `report_window` (half width of the
    window means), `bucket` (frames per bucket), `bootstrap` resamples of the books (0: no interval) and their
    `bootstrap_seed`, `log_x` (plot axis). `verify_streaming`: a model with streaming modules this project does
    not know has its chunked path checked against one frame per call first (a few seconds; an error if they
    differ).
    """
    audio_dir: Path | None = None
    num_books: int | None = None
    min_frames: int | None = None
    max_chapters: int | None = None
    max_frames: int | None = None
    user_stream: str = "silence"
    text: str = "predicted"
    first_codebook_weight: float = DEFAULT_FIRST_CODEBOOK_WEIGHT
    chunk: int = DEFAULT_CHUNK
    batch_size: int = 4
    report_at: tuple[int, ...] = DEFAULT_REPORT_AT
    report_window: int = DEFAULT_HALF_WINDOW
    bucket: int = DEFAULT_BUCKET
    bootstrap: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_SEED
    strict: bool = False
    log_x: bool = False
    verify_streaming: bool = True

    def __post_init__(self) -> None:
        if self.audio_dir is not None:
            self.audio_dir = Path(self.audio_dir)
        self.report_at = tuple(self.report_at)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        def positive(name: str, optional: bool) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{_flag(name)}: expected a positive integer{' or None' if optional else ''}, "
                                  f"got {value!r}.")
        for name in ("num_books", "min_frames", "max_chapters", "max_frames"):
            positive(name, True)
        for name in ("chunk", "batch_size", "report_window", "bucket"):
            positive(name, False)
        if self.user_stream not in USER_STREAMS:
            raise ConfigError(f"{_flag('user_stream')}: expected one of {USER_STREAMS}, got {self.user_stream!r}.")
        if self.text not in TEXT_MODES:
            raise ConfigError(f"{_flag('text')}: expected one of {TEXT_MODES}, got {self.text!r}.")
        w = self.first_codebook_weight
        if not isinstance(w, (int, float)) or not (0 < w < float("inf")):
            raise ConfigError(f"{_flag('first_codebook_weight')}: expected a finite positive number, got {w!r}.")
        if not self.report_at or any(not isinstance(f, int) or f < 0 for f in self.report_at):
            raise ConfigError(f"{_flag('report_at')}: expected non-negative frame counts, got {self.report_at!r}.")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ConfigError(f"{_flag('bootstrap')}: expected an integer >= 0, got {self.bootstrap!r}.")
        if self.min_frames is not None and self.max_frames is not None and self.min_frames > self.max_frames:
            raise ConfigError(f"--min-frames {self.min_frames} is larger than --max-frames {self.max_frames}: "
                              "no book could be scored.")


def demo_config(**overrides: tp.Any) -> LibriLightConfig:
    """The settings of `moshi-eval demo` (report at 125, 250, 500 frames, window 25, buckets of 100,
    batches of 2) with `overrides`; `audio_dir` is where `demo.demo_audiobook` copied the book."""
    base = LibriLightConfig(report_at=(125, 250, 500), report_window=25, bucket=100, batch_size=2)
    return replace(base, **overrides)


@dataclass
class RunConfig:
    """A command line run: `out` folder (locked, resumable), the Mimi code cache (`cache_dir`; `no_cache`
    neither reads nor writes it), torch CPU `threads` (None: torch's default), progress bars, and the
    command line `argv` (recorded in results.json and printed to resume)."""
    out: Path
    cache_dir: Path | None = None
    no_cache: bool = False
    no_progress: bool = False
    threads: int | None = None
    argv: list[str] = field(default_factory=list)


@dataclass
class ModelSource:
    """Where the checkpoint comes from: a Hugging Face repo (`hf_repo`, each file overridable by a local path
    or `hf://repo/file`), local files (`config`, `moshi_weight`, `mimi_weight`, optional `mimi_config`,
    `tokenizer`), LoRA adapters (`lora_weight`, merged when `fuse_lora`), or a moshi-finetune
    `checkpoint_dir`; `device` and `dtype` (None: cuda/bfloat16 if available, else cpu/float32)."""
    hf_repo: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config: str | None = None
    mimi_config: str | None = None
    lora_weight: str | None = None
    fuse_lora: bool = True
    checkpoint_dir: Path | None = None
    device: str | None = None
    dtype: str | None = None


C = tp.TypeVar("C")


def from_values(cls: type[C], values: tp.Mapping[str, tp.Any] | tp.Any) -> C:
    """`cls` built from the attributes (or keys) of `values` named as its fields; the others are ignored.

    The command line builds its configurations this way from the parsed arguments."""
    get = values.get if isinstance(values, tp.Mapping) else (lambda k, d: getattr(values, k, d))
    missing = object()
    kwargs = {f.name: v for f in fields(tp.cast(tp.Any, cls)) if (v := get(f.name, missing)) is not missing}
    return cls(**kwargs)
