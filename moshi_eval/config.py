"""Typed configuration of the eval: what the command line parses into, and what the library takes.

- `LibriLightConfig`: the books (LibriLight layout) and how they are scored and reported;
- `LikelihoodConfig`: a likelihood benchmark (sWUGGY, sBLIMP, StoryCloze, SALMon) and how it is scored;
- `DialogueConfig`: moshi-finetune dialogue data (a jsonl) and how it is scored;
- `CheckStreamingConfig`: `moshi-eval check-streaming`;
- `RunConfig`: where and how a command line run works (output folder, code cache, threads, progress bars);
- `ModelSource`: where a checkpoint comes from (the `moshi.models.loaders.CheckpointInfo` files).

Every field kind has one validator here (`positive_int`, `choice`, `text_mode`, ...), used by every configuration,
and one error class for a bad option, `ConfigError`, whose message names the field and its flag. Only
`moshi_eval.cli` turns command line arguments into these; everything else under `moshi_eval` takes them. The
defaults are the commands' defaults; `demo_config()` gives `moshi-eval demo`'s.
"""
from dataclasses import dataclass, field, fields, replace
import os
from pathlib import Path
import typing as tp

from moshi_patch.driver import TEXT_MODES

from .errors import EXIT_USAGE, MoshiEvalError
from .scoring.loss import DEFAULT_FIRST_CODEBOOK_WEIGHT
from .scoring.sequences import DEFAULT_CHUNK, USER_STREAMS
from .stats.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from .stats.metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT

# The likelihood benchmarks, their splits and SALMon's parts (what `data.benchmarks` reads).
TASKS = ("swuggy", "sblimp", "sstorycloze", "tstorycloze", "salmon")
SPLITS = ("dev", "test")
SALMON_PARTS = ("bg_alignment", "bg_all_consistency", "bg_domain_consistency", "gender_consistency",
                "rir_consistency", "sentiment_alignment", "sentiment_consistency", "speaker_consistency")
# The dialogue task's text lengths (moshi-finetune's quirk on partial windows, or the audio's) and its default
# window: moshi-finetune's example config (duration_sec: 100).
TEXT_LENGTHS = ("finetune", "audio")
DEFAULT_DURATION = 100.0


class ConfigError(MoshiEvalError, ValueError):
    """A configuration value out of range; the message names the field (the command line flag)."""

    exit_code = EXIT_USAGE      # a bad option: the command line's fault, as argparse's own errors


def default_cache_dir() -> Path:
    """The Mimi code cache shared by the command line and the evaluators: `$XDG_CACHE_HOME/moshi_eval/codes`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moshi_eval" / "codes"


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _bad(name: str, expected: str, value: tp.Any) -> tp.NoReturn:
    raise ConfigError(f"{_flag(name)}: expected {expected}, got {value!r}.")


# --- one validator per field kind: the configurations and the command line's argument types use these ----------

def positive_int(name: str, value: tp.Any, optional: bool = False) -> int | None:
    """A positive integer (None allowed with `optional`): chunk, batch size, max frames, limit, threads..."""
    if optional and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _bad(name, "a positive integer" + (" or None" if optional else ""), value)
    return value


def non_negative_int(name: str, value: tp.Any) -> int:
    """An integer >= 0: bootstrap resamples."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        _bad(name, "an integer >= 0", value)
    return value


def positive_float(name: str, value: tp.Any) -> float:
    """A finite positive number: codebook and padding weights."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < float("inf")):
        _bad(name, "a finite positive number", value)
    return float(value)


def choice(name: str, value: tp.Any, choices: tp.Sequence[str]) -> str:
    """One of `choices`: text mode, user stream, task, split."""
    if value not in choices:
        _bad(name, f"one of {tuple(choices)}", value)
    return value


def text_mode(value: tp.Any, name: str = "text") -> str:
    """The text stream: `predicted` (the model's argmax), `pad` (the padding token) or `zero` (no input)."""
    return choice(name, value, TEXT_MODES)


def user_stream(value: tp.Any, name: str = "user_stream") -> str:
    """The user's audio stream: `silence` (Mimi codes of digital silence) or `zero` (no input)."""
    return choice(name, value, USER_STREAMS)


def frame_list(name: str, value: tp.Any) -> tuple[int, ...]:
    """Non-empty non-negative frame counts: report positions."""
    frames = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not frames or any(not isinstance(f, int) or isinstance(f, bool) or f < 0 for f in frames):
        _bad(name, "non-negative frame counts", value)
    return frames


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
    differ). `threads`: torch CPU threads for each evaluator call (None: as they are; restored after; recorded in
    results.json's `runtime.threads`). torch does not promise the same numbers for another count (scoring with 1
    to 8 threads gave bitwise the same on the machines tested), so it is not part of what a resume must match.
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
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.audio_dir is not None:
            self.audio_dir = Path(self.audio_dir)
        self.report_at = tuple(self.report_at)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        for name in ("num_books", "min_frames", "max_chapters", "max_frames", "threads"):
            positive_int(name, getattr(self, name), optional=True)
        for name in ("chunk", "batch_size", "report_window", "bucket"):
            positive_int(name, getattr(self, name))
        user_stream(self.user_stream)
        text_mode(self.text)
        positive_float("first_codebook_weight", self.first_codebook_weight)
        frame_list("report_at", self.report_at)
        non_negative_int("bootstrap", self.bootstrap)
        if self.min_frames is not None and self.max_frames is not None and self.min_frames > self.max_frames:
            raise ConfigError(f"--min-frames {self.min_frames} is larger than --max-frames {self.max_frames}: "
                              "no book could be scored.")


def demo_config(**overrides: tp.Any) -> LibriLightConfig:
    """The settings of `moshi-eval demo` (report at 125, 250, 500 frames, window 25, buckets of 100,
    batches of 2) with `overrides`; `audio_dir` is where `demo.demo_audiobook` copied the book."""
    base = LibriLightConfig(report_at=(125, 250, 500), report_window=25, bucket=100, batch_size=2)
    return replace(base, **overrides)


@dataclass
class LikelihoodConfig:
    """A likelihood benchmark: which task and data, and everything its numbers and report depend on besides the
    model. `task`: swuggy, sblimp, sstorycloze, tstorycloze or salmon; `data`: the ZeroSpeech 2021 root (swuggy,
    sblimp), the StoryCloze folder, or the SALMon root; `split`: dev (with gold.csv) or test (submission only);
    `parts`: SALMon's parts (default all 8); `text`, `user_stream`, `batch_size` (files scored together, batched by
    length), `chunk` (frames per streaming call); `limit`: the first N pairs only (a smoke run); `strict`: a
    skipped file or pair is an error; `bootstrap` resamples of the averaging units and their seed; `progress`: a
    tqdm bar (default off, as in a training log); `cache_dir`: the Mimi code cache (None: no cache);
    `verify_streaming`: as `LibriLightConfig.verify_streaming`; `threads`: as `LibriLightConfig.threads`."""
    task: str
    data: Path
    split: str = "dev"
    parts: tuple[str, ...] | None = None
    text: str = "predicted"
    user_stream: str = "silence"
    batch_size: int = 16
    chunk: int = DEFAULT_CHUNK
    limit: int | None = None
    strict: bool = False
    bootstrap: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_SEED
    progress: bool = False
    cache_dir: Path | None = None
    verify_streaming: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.parts is not None:
            self.parts = tuple(self.parts)

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        choice("task", self.task, TASKS)
        text_mode(self.text)
        user_stream(self.user_stream)
        choice("split", self.split, SPLITS)
        positive_int("batch_size", self.batch_size)
        positive_int("chunk", self.chunk)
        positive_int("limit", self.limit, optional=True)
        positive_int("threads", self.threads, optional=True)
        non_negative_int("bootstrap", self.bootstrap)
        if self.parts is not None:
            if self.task != "salmon":
                _bad("parts", "None unless task is 'salmon'", self.parts)
            if not self.parts:
                _bad("parts", f"some of {SALMON_PARTS}", self.parts)
            for part in self.parts:
                choice("parts", part, SALMON_PARTS)
            if len(set(self.parts)) != len(self.parts):
                _bad("parts", "each part once", self.parts)

    check = validate

    def identity(self) -> dict:
        """What the per-file numbers and the batches depend on: a resumed run must match it exactly."""
        return {"benchmark": self.task, "data": os.fsdecode(Path(self.data).resolve()), "split": self.split,
                "parts": None if self.parts is None else list(self.parts), "text": self.text,
                "user_stream": self.user_stream, "batch_size": self.batch_size, "chunk": self.chunk,
                "limit": self.limit}


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


@dataclass
class DialogueConfig:
    """The dialogue task: moshi-finetune data and how it is scored. `jsonl`: the manifest; `duration`: window
    seconds (None: whole files); `batch_size`: consecutive windows per batch; `text_padding_weight`,
    `first_codebook_weight`: the weights of the weighted means (moshi-finetune's example config: 0.5 and 100);
    `chunk`: frames per streaming call; `text_length`: "finetune" (its text length quirk) or "audio";
    `drop_last`, `max_batches`: moshi-finetune's eval drops a trailing short batch and reads 40 batches;
    `report_at`: frames of `audio_ce@F`; `verify_streaming`; `progress`: a tqdm bar; `cache_dir`: the Mimi code
    cache (None: none); `threads`: torch CPU threads for each call (None: as they are)."""
    jsonl: Path
    duration: float | None = DEFAULT_DURATION
    batch_size: int = 4
    text_padding_weight: float = 1.0
    first_codebook_weight: float = 1.0
    chunk: int = DEFAULT_CHUNK
    text_length: str = "finetune"
    drop_last: bool = False
    max_batches: int | None = None
    report_at: tuple[int, ...] = ()
    verify_streaming: bool = True
    progress: bool = False
    cache_dir: Path | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        self.jsonl = Path(self.jsonl)
        self.report_at = tuple(self.report_at)

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        if self.duration is not None:
            positive_float("duration", self.duration)
        positive_int("batch_size", self.batch_size)
        positive_int("chunk", self.chunk)
        positive_int("max_batches", self.max_batches, optional=True)
        positive_int("threads", self.threads, optional=True)
        positive_float("text_padding_weight", self.text_padding_weight)
        positive_float("first_codebook_weight", self.first_codebook_weight)
        choice("text_length", self.text_length, TEXT_LENGTHS)
        if self.report_at:
            frame_list("report_at", self.report_at)
        if not isinstance(self.drop_last, bool):
            raise ConfigError(f"drop_last (--drop-last): expected True or False, got {self.drop_last!r}.")

    def identity(self) -> dict:
        """What the numbers depend on besides the model, the tokenizer and the device."""
        return {"jsonl": os.fsdecode(self.jsonl.resolve()), "duration": self.duration, "batch_size": self.batch_size,
                "text_padding_weight": self.text_padding_weight, "first_codebook_weight": self.first_codebook_weight,
                "chunk": self.chunk, "text_length": self.text_length, "drop_last": self.drop_last,
                "max_batches": self.max_batches, "report_at": list(self.report_at)}


def from_values(cls: type[C], values: tp.Mapping[str, tp.Any] | tp.Any) -> C:
    """`cls` built from the attributes (or keys) of `values` named as its fields; the others are ignored.

    The command line builds its configurations this way from the parsed arguments."""
    get = values.get if isinstance(values, tp.Mapping) else (lambda k, d: getattr(values, k, d))
    missing = object()
    kwargs = {f.name: v for f in fields(tp.cast(tp.Any, cls)) if (v := get(f.name, missing)) is not missing}
    return cls(**kwargs)


@dataclass
class CheckStreamingConfig(ModelSource):
    """`check_streaming` of a checkpoint (`ModelSource`) or of the seeded `demo` model, optionally with TTT layers
    inserted after `ttt_layers` (TTT mini-batches of `mini_batch_size`): `frames` per sequence, `batch_size`
    sequences, `tolerance` on |logit difference| (None: by dtype), `seed`, `chunk` frames per call, torch CPU
    `threads`. The model runs in float32 unless `dtype` says otherwise."""
    demo: bool = False
    ttt_layers: list[int] | None = None
    mini_batch_size: int = 16
    frames: int = 64
    batch_size: int = 2
    tolerance: float | None = None
    seed: int = 0
    chunk: int = 16
    threads: int | None = None
    dtype: str | None = "float32"

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        for name in ("frames", "batch_size", "mini_batch_size", "chunk"):
            positive_int(name, getattr(self, name))
        positive_int("threads", self.threads, optional=True)
        if self.tolerance is not None:
            positive_float("tolerance", self.tolerance)
