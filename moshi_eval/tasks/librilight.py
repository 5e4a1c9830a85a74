"""The LibriLight long-context task: per-frame audio cross-entropy over audiobooks, from the streaming model.

    evaluator = LibriLightEvaluator(mimi, LibriLightConfig(audio_dir="..."))   # selects, reads and encodes once
    result = evaluator(lm_model)        # any moshi LMModel (custom layers, LoRA, training mode): scores the books
    wandb.log(result.metrics, step=step)
    result.write("runs/step_1000")     # results.json, curve.csv, curve.png, sequences/*.npz, as the CLI writes

`moshi-eval librilight` runs this very evaluator through `runner.run_task` (with its books finished in `--out`
kept, `BookStore`): for the same model and options the per-book arrays and the metrics are bitwise the CLI's.

A book is one sequence: its chapters in order, encoded by Mimi into `[8, T]` codes, teacher forced in the model's
audio stream (`scoring.score_sequences`). Books are batched by length over the whole selection, from the file
headers, so a book is scored in the same batch whether the run is resumed or not and whatever the number of
processes: its numbers are bitwise the same.

The model comes back as it was given: every module's training flag is restored (a model in training mode is scored
in eval mode, dropout off), nothing is written to its parameters, scoring runs under `torch.no_grad()` with
`requires_grad` on for every parameter for the call (restored after: torch picks its matmul kernels by it, and
this is the fast and common choice), and its streaming state is opened and closed by the call (a model
already streaming is refused). The model stays on its device and dtype; the codes go to it.

Under torch.distributed (the caller's `torchrun` job, a process group already initialised): build the evaluator and
call it on every rank. Each rank encodes and scores its share of the batches, the per-book arrays are gathered, and
every rank returns the same `EvalResult`, equal to one process's; `write()` writes on rank 0 only. The caller's
process group is used as is: never initialised or destroyed here.

FSDP: a model wrapped in `torch.distributed.fsdp.FullyShardedDataParallel` holds shards only; score the full model
with the parameters gathered for the call, on every rank:

    with FSDP.summon_full_params(model, writeback=False):
        result = evaluator(model.module)     # the LMModel inside the wrapper
"""
from dataclasses import dataclass, field
import math
import os
from pathlib import Path
import sys
import time
import typing as tp

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from tqdm import tqdm

from moshi_patch import LMGen

from .. import distributed
from ..checkpoint import check_codec_fits
from ..config import LibriLightConfig, default_cache_dir
from ..data.codes import (MIMI_FRAME_RATE, SILENCE_FRAMES, CodeCache, codec_identity, device_kind, encode_book,
                          encoding_setting, silence_codes)
from ..data.librilight import AudioReadError, Book, DataError, book_seconds, discover_books, select_books
from ..files import report
from ..files.folder import OutputFolder, folder_command
from ..files.hashing import FileHasher, file_sha256
from ..scoring.model_call import caller_ranks, check_model, on_every_rank, score_model
from ..scoring.sequences import score_sequences
from ..scoring.streaming import StreamingVerifier
from ..stats.bootstrap import bootstrap_summary, bucket_band
from ..stats.metrics import summarize
from .base import chunk_summary, sum_chunk_summaries, versions

TASK = "librilight"
LOSSES = ("audio_ce", "audio_ce_weighted")


def select_librilight_books(config: LibriLightConfig) -> list[Book]:
    """The first `num_books` books (cut to `max_chapters`) that can reach `min_frames`.

    The length filter runs before counting the books and before encoding, on the durations of the file headers,
    so that `num_books=50, min_frames=24000` scores 50 long books without encoding the short ones. The exact
    frame count is checked again after encoding. A book whose header cannot be read is kept: its encoding
    reports it (skipped and listed, or an error with `strict`).
    """
    books = select_books(discover_books(tp.cast(Path, config.audio_dir)), None, config.max_chapters)
    if config.min_frames is None:
        return books[:config.num_books]
    min_seconds = config.min_frames / MIMI_FRAME_RATE
    chosen: list[Book] = []
    longest = 0.
    for book in books:
        if config.num_books is not None and len(chosen) == config.num_books:
            break
        try:
            seconds = book_seconds(book)
        except AudioReadError:
            seconds = float("inf")
        longest = max(longest, seconds)
        if seconds >= min_seconds:
            chosen.append(book)
    if not chosen:
        raise DataError(f"every book is shorter than --min-frames {config.min_frames} frames = {min_seconds:.1f} s "
                        f"(longest: {longest:.1f} s) under {config.audio_dir}.")
    return chosen


def scoring_identity(config: LibriLightConfig, device: str | torch.device) -> dict:
    """What the per-book numbers depend on besides the model: a rerun in the same folder must match it exactly.

    Book selection (`num_books`, `min_frames`), reporting and `strict` are left out: they do not change a finished
    book's numbers, so a run can be extended or re-reported in place. The batch size is in: a book streamed in a
    batch of another size gets other numbers at rounding level (~1e-6). So are the chunk (the losses agree across
    chunk lengths up to float rounding only), the device kind and Mimi's encoding setting
    (`codes.encoding_setting`): codes made on another device or thread count can differ.
    """
    c = config
    return {"audio_dir": os.fsdecode(Path(tp.cast(Path, c.audio_dir)).resolve()), "max_chapters": c.max_chapters,
            "max_frames": c.max_frames, "user_stream": c.user_stream, "text": c.text,
            "first_codebook_weight": c.first_codebook_weight, "chunk": c.chunk, "batch_size": c.batch_size,
            "device": device_kind(device), "encoding": encoding_setting(device)}


def book_entry(book: Book, sequence_id: str) -> dict:
    return {"sequence_id": sequence_id, "speaker": book.speaker, "book": book.book,
            "chapters": [{"file": os.fsdecode(c.path), "metadata": c.metadata} for c in book.chapters]}


@dataclass
class _Book:
    """A selected book: its place in the batches and, once encoded, its codes."""
    book: Book
    sequence_id: str
    estimate: int = 0                         # frames it will be scored on, from the file headers
    chapters: list[dict] | None = None        # identity of its chapter files when read, None if one is unreadable
    codes: torch.Tensor | None = None         # [8, T] once encoded
    skipped: dict | None = None               # why it is left out (unreadable, too short), once known


def _chapter_identity(book: Book, hasher: FileHasher) -> list[dict] | None:
    try:
        return [hasher.identity(c.path) for c in book.chapters]
    except OSError:
        return None


def _check_unique_ids(books: list[_Book], audio_dir: Path) -> None:
    ids = [b.sequence_id for b in books]
    if len(set(ids)) != len(ids):
        dups = sorted({i for i in ids if ids.count(i) > 1})
        folders = {i: [os.fsdecode(b.book.chapters[0].path.parent) for b in books if b.sequence_id == i]
                   for i in dups[:3]}
        named = "; ".join(f"{i}: {', '.join(f)}" for i, f in folders.items())
        raise DataError(f"several books share a sequence id under {audio_dir} ({named}): rename one of the "
                        "folders.")


def _estimated_frames(book: Book, max_frames: int | None) -> int:
    """Frames a book will be scored on, from its file headers (0 if a header cannot be read)."""
    try:
        frames = math.ceil(book_seconds(book) * MIMI_FRAME_RATE)
    except AudioReadError:
        frames = 0
    return min(frames, max_frames) if max_frames else frames


def _batches(books: list[_Book], config: LibriLightConfig) -> list[list[_Book]]:
    """Batches of books of similar length (few frames streamed past the shorter ones), formed over the whole
    selection from the file headers, finished books included: a book is scored in the same batch whether the run
    is resumed or not, and whatever the number of processes, so its numbers are bitwise the same."""
    for b in books:
        b.estimate = _estimated_frames(b.book, config.max_frames)
    order = sorted(books, key=lambda b: b.estimate)   # stable: ties keep the selection order
    return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]


class BookStore:
    """LibriLight's resume units in an `OutputFolder`: `sequences/<id>.npz`, one per finished book, written as soon
    as it is scored, with its origin (the folder's configuration digest and model identity), the identity of the
    chapters it was scored from, the batch it was scored in and the checksum of its arrays (`report.write_sequence`).

    A book file is reused only if it comes from this very configuration, for this book, from the chapters the
    book has now; otherwise the book is scored again and the run says why."""

    def __init__(self, folder: OutputFolder, tag: str = "") -> None:
        self.folder = folder
        self.tag = tag

    def load(self, b: _Book) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(the book's arrays if its file can be reused, else None; why a file there is not reused)."""
        path = report.sequence_path(self.folder.path, b.sequence_id)
        if not path.is_file():
            return None, None
        arrays, meta = report.read_sequence(path, with_meta=True)    # ReportError: corrupt or edited
        if meta.get("config_sha256") != self.folder.config_sha256:
            return None, ("its file was scored under another configuration (another model, --max-frames, "
                          "options...) or comes from another run")
        if meta.get("sequence_id") != b.sequence_id:
            return None, f"its file holds book {meta.get('sequence_id')!r}"
        if b.chapters is None or meta.get("chapters") != b.chapters:
            return None, "its chapters changed since it was scored (added, removed or replaced files)"
        return arrays, None

    def save(self, b: _Book, arrays: dict[str, np.ndarray], batch: list[str], config: LibriLightConfig,
             device: str, announce: bool = True) -> Path:
        meta = {"sequence_id": b.sequence_id, "chapters": b.chapters, "batch_size": config.batch_size,
                "batch": batch, "device": device, "config_sha256": self.folder.config_sha256,
                "origin": self.folder.origin()}
        path = report.write_sequence(self.folder.path, b.sequence_id, arrays, meta)
        if announce:
            tqdm.write(f"moshi-eval: {self.tag}{b.sequence_id}: {arrays['audio_ce'].shape[0]} frames, mean "
                       f"audio_ce {np.nanmean(arrays['audio_ce']):.4f} -> {path}", file=sys.stderr)
        return path


@dataclass
class _RankReport:
    """What one rank did in a call, gathered for results.json."""
    skipped: list[dict]
    scored: list[str]                         # books this rank scored in this call
    frames: int
    encode_seconds: float
    score_seconds: float
    chunks: dict
    cache: dict | None


def curve_metrics(sequences: dict[str, dict[str, np.ndarray]], config: LibriLightConfig) -> dict:
    """`metrics.summarize` of each loss over the books, with bootstrap intervals over books unless
    `config.bootstrap == 0`: the nested metrics of results.json ("summary")."""
    def summary(values: list[np.ndarray]) -> dict:
        result = summarize(values, config.report_at, config.report_window, config.bucket).to_dict()
        if config.bootstrap > 0:
            result["bootstrap"] = bootstrap_summary(values, config.report_at, config.report_window, config.bucket,
                                                    config.bootstrap, config.bootstrap_seed)
        else:
            result["bootstrap"] = {"absent_reason": "--bootstrap 0"}
        return result

    metrics: dict[str, tp.Any] = {name: summary([s[name] for s in sequences.values()]) for name in LOSSES}
    K = next(iter(sequences.values()))["codebook_ce"].shape[0]
    metrics["codebook_ce"] = [summary([s["codebook_ce"][k] for s in sequences.values()]) for k in range(K)]
    return metrics


def flat_metrics(metrics: dict, prefix: str = TASK) -> dict[str, float]:
    """The flat `{name: value}` of a LibriLight run's nested metrics (`EvalResult.summary`, results.json's
    "summary").

    Names, for `L` in audio_ce, audio_ce_weighted and codebook_0_ce ... codebook_{K-1}_ce:
    - `{prefix}/L`: mean over every scored (book, frame);
    - `{prefix}/L@F`: at each report frame F, the curve's mean over frames F +- report_window (the books reaching
      each frame), with `{prefix}/L@F/low`, `.../high` (95% bootstrap interval over books) and `.../se` for
      audio_ce and audio_ce_weighted;
    - `{prefix}/L/slope_per_1000`: the curve's least-squares slope per 1000 frames (with `/low`, `/high`, `/se` for
      the two audio losses);
    - `{prefix}/num_books`, `{prefix}/longest_book_frames`, `{prefix}/frames_scored` (the (book, frame) values
      averaged into the means).
    A value that does not exist is left out, never 0.0: a report frame no book reaches, an interval with fewer
    than 2 books reaching it or `bootstrap=0`, a slope over fewer than 2 frames.
    """
    out: dict[str, float] = {}

    def put(name: str, value: tp.Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{name}"] = float(value)

    def interval(name: str, entry: dict | None) -> None:
        if entry and entry.get("present"):
            for key in ("low", "high", "se"):
                put(f"{name}/{key}", entry.get(key))

    def summary(loss: str, s: dict) -> None:
        put(loss, s.get("mean"))
        boot = s.get("bootstrap") or {}
        boot_positions = {p["frame"]: p for p in boot.get("positions", [])}
        for position in s["positions"]:
            if not position["present"]:
                continue
            name = f"{loss}@{position['frame']}"
            put(name, position["window_mean"])
            interval(name, boot_positions.get(position["frame"], {}).get("window_mean"))
        if s["slope"]["present"]:
            put(f"{loss}/slope_per_1000", s["slope"]["per_1000_frames"])
            interval(f"{loss}/slope_per_1000", boot.get("slope"))

    for loss in LOSSES:
        summary(loss, metrics[loss])
    for k, s in enumerate(metrics.get("codebook_ce", [])):
        summary(f"codebook_{k}_ce", dict(s, bootstrap=None))
    put("num_books", metrics["audio_ce"]["num_sequences"])
    put("longest_book_frames", metrics["audio_ce"]["longest_book_frames"])
    put("frames_scored", metrics["audio_ce"]["frames_scored"])
    return out


@dataclass
class _ModelShape:
    """What results.json records of the model scored (read at call time: a later training step may change it)."""
    n_q: int
    dep_q: int
    card: int
    text_card: int
    delays: list[int]
    context: int | None
    text_padding_token_id: int
    device: torch.device

    @classmethod
    def of(cls, lm_model: LMModel) -> "_ModelShape":
        return cls(lm_model.n_q, lm_model.dep_q, lm_model.card, lm_model.text_card, list(lm_model.delays),
                   lm_model.context, lm_model.text_padding_token_id, lm_model.device)

    def to_dict(self, frame_rate: float) -> dict:
        return {"n_q": self.n_q, "dep_q": self.dep_q, "card": self.card, "text_card": self.text_card,
                "delays": self.delays, "context": self.context,
                "context_minutes": None if self.context is None else self.context / frame_rate / 60,
                "text_padding_token_id": self.text_padding_token_id}


@dataclass
class EvalResult:
    """One call of a `LibriLightEvaluator`.

    Attributes:
        metrics: flat `{name: value}` (see `flat_metrics`), straight into `wandb.log` or `add_scalar`.
        sequences: per book (selection order), its arrays: `audio_ce [T]`, `audio_ce_weighted [T]` float32,
            `codebook_ce [K, T]` float32, `text_token [T]` int64 (as in the CLI's `sequences/*.npz`).
        summary: the nested metrics of results.json (curve summaries, bootstrap intervals, buckets).
        skipped: books left out (unreadable file, shorter than `min_frames`), with the reason.
        seconds: wall time of the call.
        resumed: books taken from a store (a resumed CLI run), not scored by this call.
    """
    metrics: dict[str, float]
    sequences: dict[str, dict[str, np.ndarray]]
    summary: dict
    skipped: list[dict]
    seconds: float
    resumed: list[str] = field(default_factory=list)
    _evaluator: "LibriLightEvaluator" = field(default=tp.cast(tp.Any, None), repr=False)
    _model: _ModelShape = field(default=tp.cast(tp.Any, None), repr=False)
    _reports: list[_RankReport] = field(default_factory=list, repr=False)
    _stored_in: Path | None = field(default=None, repr=False)   # the folder whose store holds every book file

    task = TASK

    def write(self, out_dir: str | Path, identity: dict | None = None, argv: tp.Sequence[str] = ()) -> Path | None:
        """Write the files `moshi-eval librilight --out out_dir` writes: `config.json`, `sequences/<id>.npz`,
        `curve.csv`, `curve.png` and, last, `results.json`. Returns `out_dir / "results.json"`.

        On a rank other than 0 of a torch.distributed job, writes nothing and returns None: every rank holds the
        same result, rank 0 writes it (so the training loop's line can stay the same on every rank).
        `identity`: what identifies the model in config.json and results.json (default: `{"in_memory": True}`, as
        a model in memory has no files); `argv` is recorded as the command. `out_dir` is locked while writing and,
        as for the CLI, must be new or hold results of this same task and configuration
        (`folder.ConfigMismatchError` otherwise).
        """
        if not self._evaluator.ranks.is_main:
            return None
        identity = dict(identity) if identity is not None else {"in_memory": True}
        command = "moshi-eval " + " ".join(argv) if argv else folder_command(out_dir, "EvalResult.write")
        with OutputFolder(out_dir, TASK, command) as folder:
            folder.check_config({"model": identity, **scoring_identity(self._evaluator.config, self._model.device)})
            return self.write_files(folder, command, identity)

    def write_files(self, folder: OutputFolder, command: str, identity: dict) -> Path:
        """Into `folder` (entered, its configuration checked): the book files its store does not hold already,
        `curve.csv`, `curve.png`, then `results.json` naming their sha256."""
        ev = self._evaluator
        config = ev.config
        if self._stored_in is None or Path(self._stored_in).resolve() != folder.path.resolve():
            store = BookStore(folder)       # the book files a CLI run writes as it scores, written here at once
            for b in ev._books:
                arrays = self.sequences.get(b.sequence_id)
                if arrays is not None:
                    store.save(b, arrays, ev._batch_of.get(b.sequence_id, [b.sequence_id]), config,
                               str(self._model.device), announce=False)
        frame_rate = float(ev.mimi.frame_rate)
        sequences = self.sequences
        books_meta = []
        for b in ev._books:
            s = sequences.get(b.sequence_id)
            if s is None:
                continue
            T = int(s["audio_ce"].shape[0])
            path = report.sequence_path(folder.path, b.sequence_id)
            books_meta.append(dict(
                book_entry(b.book, b.sequence_id), frames=T, minutes=T / frame_rate / 60,
                audio_ce_mean=float(np.nanmean(s["audio_ce"])),
                audio_ce_weighted_mean=float(np.nanmean(s["audio_ce_weighted"])),
                file=str(path.relative_to(folder.path)), file_sha256=file_sha256(path)))
        reports = self._reports
        scored = sum(r.frames for r in reports)
        seconds = max(r.score_seconds for r in reports)
        caches = [r.cache for r in reports if r.cache is not None]
        runtime = {
            "frames": scored, "seconds": seconds,
            "frames_per_s": scored / seconds if scored else None,
            "frames_per_s_note": None if scored else "nothing scored in this run (all books were finished)",
            "encode_seconds": max(r.encode_seconds for r in reports), "total_seconds": self.seconds,
            "books_scored_this_run": len(sequences) - len(self.resumed),
            "books_resumed": len(self.resumed),
            "code_cache": None if not caches else {"dir": caches[0]["dir"], "hits": sum(c["hits"] for c in caches),
                                                   "misses": sum(c["misses"] for c in caches)},
            "device": str(self._model.device),
            "processes": len(reports),
            "threads": ev.config.threads or torch.get_num_threads(),
            "chunks": sum_chunk_summaries([r.chunks for r in reports]),
        }
        run_config = dict(folder.config or {}, num_books=config.num_books, min_frames=config.min_frames,
                          report_at=list(config.report_at), report_window=config.report_window, bucket=config.bucket,
                          strict=config.strict, bootstrap=config.bootstrap, bootstrap_seed=config.bootstrap_seed)
        run_config.pop("task", None)
        model = dict(identity, **self._model.to_dict(frame_rate))
        mimi = ev.mimi
        codec = {"identity": codec_identity(mimi), "num_codebooks": mimi.num_codebooks,
                 "cardinality": mimi.cardinality, "sample_rate": mimi.sample_rate, "frame_rate": frame_rate}
        results = {"command": command, "created": _now(), "config": run_config, "versions": versions(),
                   "model": model, "codec": codec, "num_books": len(books_meta), "books": books_meta,
                   "skipped": self.skipped, "metrics": self.metrics, "summary": self.summary, "runtime": runtime}
        values = [s["audio_ce"] for s in sequences.values()]

        def plot(path: Path) -> None:
            band = (bucket_band(values, config.bucket, config.bootstrap, config.bootstrap_seed)
                    if config.bootstrap > 0 else None)
            report.plot_curve(path, {sid: s["audio_ce"] for sid, s in sequences.items()}, frame_rate,
                              self._model.context, band=band, log_x=config.log_x, bucket=config.bucket,
                              title=f"audio CE of {len(sequences)} book(s), text={config.text}, "
                                    f"user={config.user_stream}")
        files = {report.CURVE_CSV: lambda path: report.write_curve_csv(path, sequences, frame_rate),
                 report.CURVE_PNG: plot}
        return folder.write_results(results, files)

    def print_summary(self, out: Path) -> None:
        reports = self._reports
        scored, seconds = sum(r.frames for r in reports), max(r.score_seconds for r in reports)
        rate = f"{scored / seconds:.1f} frames/s" if scored else "nothing left to score"
        print(f"moshi-eval: {len(self.sequences)} book(s), {scored} frames scored in {seconds:.1f} s ({rate}); "
              f"{len(self.skipped)} skipped; total {self.seconds:.1f} s; results in {out / 'results.json'}")


def _now() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class LibriLightEvaluator:
    """The LibriLight long-context task, prepared once: books selected, read and encoded by `mimi`.

    Args:
        mimi: the codec of the models to score (moshi's `MimiModel`, `num_codebooks` = the model's `dep_q`).
        config: the books (`config.audio_dir`, LibriLight layout) and the scoring and report options; the
            defaults are `moshi-eval librilight`'s, `config.demo_config()` gives `moshi-eval demo`'s.
        cache_dir: the on-disk code cache (default: the CLI's, so codes encoded by either are reused); with
            `use_cache=False`: no cache.
        progress: tqdm bars while encoding and scoring (default off, as in a training log).
        ranks: the ranks to share the books over (default: the caller's process group, if any).
        encode: encode every book now and keep the codes in memory (default); False: when a call needs them (the
            books finished in its store are never encoded, as in a resumed CLI run).
        hasher: content hashes of the chapters (default: cached beside the code cache).
    Raises:
        DataError: no book, or two books with one id, under `config.audio_dir`; AudioReadError with
            `config.strict`.
    Call it with a model: `evaluator(lm_model) -> EvalResult`.
    """

    metric_prefix = TASK

    def __init__(self, mimi: MimiModel, config: LibriLightConfig, cache_dir: str | Path | None = None,
                 use_cache: bool = True, progress: bool = False, *, ranks: distributed.Ranks | None = None,
                 encode: bool = True, hasher: FileHasher | None = None) -> None:
        if not isinstance(config, LibriLightConfig):
            raise TypeError(f"config: expected a moshi_eval.LibriLightConfig, got {type(config).__name__}.")
        if config.audio_dir is None:
            raise ValueError("config.audio_dir: expected the LibriLight folder to score, got None.")
        config.validate()
        self.config = config
        self.mimi = mimi
        self.progress = progress
        self.ranks = ranks if ranks is not None else caller_ranks()
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._hasher = hasher or FileHasher(cache_root / "hashes" if use_cache else None)
        self._verify = StreamingVerifier()
        self._books = [_Book(b, b.sequence_id) for b in select_librilight_books(config)]
        _check_unique_ids(self._books, tp.cast(Path, config.audio_dir))
        batches = _batches(self._books, config)
        owners = distributed.assign([max(b.estimate for b in batch) * len(batch) for batch in batches],
                                    self.ranks.world)
        self._mine = [batch for batch, owner in zip(batches, owners) if owner == self.ranks.rank]
        self._batch_of: dict[str, list[str]] = {}
        self.cache = CodeCache(cache_root, codec_identity(mimi)) if use_cache else None
        self._silence = silence_codes(mimi, SILENCE_FRAMES) if config.user_stream == "silence" else None
        self.encode_seconds = 0.0
        self.skipped: list[dict] = []
        if encode:
            on_every_rank(self.ranks, "encoding the books", lambda: self._encode(self._mine))
            self._gather_skipped()
            if not any(b.skipped is None for b in self._books):
                reasons = "; ".join(f"{s['sequence_id']}: {s['reason']}" for s in self.skipped[:5])
                raise DataError(f"no book could be scored under {config.audio_dir} ({reasons}).")

    @property
    def books(self) -> list[Book]:
        """The books selected and not left out (selection order)."""
        return [b.book for b in self._books if b.skipped is None]

    def book_ids(self) -> list[str]:
        """The ids of the books scored (selection order)."""
        return [b.sequence_id for b in self._books if b.skipped is None]

    def _encode(self, batches: list[list[_Book]]) -> None:
        """Mimi codes of the books of `batches` not encoded yet (cached on disk by content and codec); the identity
        of their chapters is taken as they are read. Unreadable books and books shorter than `min_frames` are
        marked `skipped` (with `strict`, an unreadable book raises)."""
        config = self.config
        books = [b for batch in batches for b in batch if b.codes is None and b.skipped is None]
        start = time.perf_counter()
        with tqdm(total=sum(len(b.book.chapters) for b in books), unit="chapter", desc=f"{self.ranks.tag}encoding",
                  disable=not self.progress or not books or not self.ranks.is_main, dynamic_ncols=True) as bar:
            for b in books:
                b.chapters = _chapter_identity(b.book, self._hasher)
                try:
                    b.codes = encode_book(self.mimi, b.book, self.cache, num_codebooks=self.mimi.num_codebooks,
                                          on_chapter=lambda i, c: bar.update(1))
                except AudioReadError as exc:
                    if config.strict:
                        raise
                    tqdm.write(f"moshi-eval: {self.ranks.tag}skipping book {b.sequence_id}: {exc}", file=sys.stderr)
                    b.skipped = dict(book_entry(b.book, b.sequence_id), reason=str(exc), path=os.fsdecode(exc.path))
                    continue
                length = int(b.codes.shape[-1])
                if config.min_frames is not None and length < config.min_frames:
                    b.skipped = dict(book_entry(b.book, b.sequence_id), frames=length,
                                     reason=f"shorter than --min-frames {config.min_frames}: {length} frames")
        self.encode_seconds += time.perf_counter() - start

    def _gather_skipped(self) -> None:
        mine = [b.skipped for batch in self._mine for b in batch if b.skipped is not None]
        found = {entry["sequence_id"]: entry for part in self.ranks.gather(mine) for entry in part}
        for b in self._books:
            if b.sequence_id in found:
                b.skipped = found[b.sequence_id]
        self.skipped = [b.skipped for b in self._books if b.skipped is not None]

    def __call__(self, lm_model: LMModel, store: BookStore | None = None) -> EvalResult:
        """Score the books with `lm_model` and return the metrics; the model comes back as given.

        `store`: the books finished in an output folder (a resumed CLI run): those are read back, not scored.
        Raises:
            TypeError: not a moshi LMModel; ValueError: the model is streaming already;
            CheckpointError: the codec does not fit the model; NonFiniteLossError: a NaN/inf loss;
            StreamingCheckError: a streaming layer this project does not know streams in chunks otherwise than
            frame by frame; DataError: no book could be scored;
            RankFailedError: under torch.distributed, another rank failed (its error is named): every rank
            raises, none waits forever.
        """
        check_model(lm_model)
        check_codec_fits(lm_model, self.mimi)
        start = time.perf_counter()
        finished: dict[str, dict[str, np.ndarray]] = {}
        mine = score_model(self.ranks, lm_model, lambda: self._score(lm_model, store, finished),
                           self.config.threads)
        gathered = self.ranks.gather((finished, mine))
        self._gather_skipped()
        every: dict[str, dict[str, np.ndarray]] = {}
        reports = []
        for part, r in gathered:
            every.update(part)
            reports.append(r)
        reports[0].skipped = list(self.skipped)
        config = self.config
        sequences = {}
        for b in self._books:
            arrays = every.get(b.sequence_id)
            if arrays is None or b.skipped is not None:
                continue
            if config.min_frames is not None and arrays["audio_ce"].shape[0] < config.min_frames:
                # A book file of a run with a lower --min-frames.
                frames = int(arrays["audio_ce"].shape[0])
                self.skipped.append(dict(book_entry(b.book, b.sequence_id), frames=frames,
                                         reason=f"shorter than --min-frames {config.min_frames}: {frames} frames"))
                continue
            sequences[b.sequence_id] = arrays
        if not sequences:
            skipped = self.skipped
            if skipped and all("min-frames" in s["reason"] for s in skipped):
                longest = max(s["frames"] for s in skipped)
                raise DataError(f"every book is shorter than --min-frames {config.min_frames} frames "
                                f"(longest: {longest} frames) under {config.audio_dir}.")
            reasons = "; ".join(f"{s['sequence_id']}: {s['reason']}" for s in skipped[:5])
            raise DataError(f"no book could be scored under {config.audio_dir} ({reasons}).")
        scored_now = {sid for r in reports for sid in r.scored}
        summary = curve_metrics(sequences, config)
        # Every rank holds every book's arrays and computes the same metrics from them, in selection order.
        return EvalResult(flat_metrics(summary), sequences, summary, list(self.skipped),
                          time.perf_counter() - start, [sid for sid in sequences if sid not in scored_now],
                          self, _ModelShape.of(lm_model), reports, None if store is None else store.folder.path)

    def _resume(self, store: BookStore, finished: dict[str, dict[str, np.ndarray]]) -> None:
        books = [b for batch in self._mine for b in batch]
        rescored = []
        for b in books:
            if b.chapters is None:
                b.chapters = _chapter_identity(b.book, self._hasher)
            arrays, why = store.load(b)
            if arrays is not None:
                finished[b.sequence_id] = arrays
            elif why is not None:
                rescored.append((b.sequence_id, why))
        if finished:
            print(f"moshi-eval: {self.ranks.tag}resuming in {store.folder.path}: {len(finished)} of {len(books)} "
                  "books already scored.", file=sys.stderr)
        for sid, why in rescored:
            print(f"moshi-eval: {self.ranks.tag}{sid}: {why}: scoring it again.", file=sys.stderr)

    def _score(self, lm_model: LMModel, store: BookStore | None,
               finished: dict[str, dict[str, np.ndarray]]) -> _RankReport:
        """This rank's books through `lm_model` (in scoring mode) into `finished`; returns what it did."""
        config = self.config
        if config.verify_streaming:
            # A streaming layer the project does not know: its chunked path is checked against one frame per call,
            # once per model structure (training changes its weights, not how it streams).
            verified = self._verify(lm_model, config.chunk, config.text)
            if verified and self.ranks.is_main and store is not None:
                print(f"moshi-eval: {verified}", file=sys.stderr)
        if store is not None:
            self._resume(store, finished)
        todo = [batch for batch in self._mine if any(b.sequence_id not in finished for b in batch)]
        before = self.encode_seconds
        self._encode(todo)
        encode_seconds = self.encode_seconds - before if store is not None else self.encode_seconds
        todo = [left for left in ([b for b in batch if b.skipped is None] for batch in todo) if left]
        lm_gen = LMGen(lm_model, use_sampling=False)
        silence = None if self._silence is None else self._silence[: lm_model.n_q - lm_model.dep_q]
        total = sum(min(b.codes.shape[-1], config.max_frames or b.codes.shape[-1])
                    for batch in todo for b in batch if b.sequence_id not in finished and b.codes is not None)
        scored: list[str] = []
        frames = 0
        start = time.perf_counter()
        with tqdm(total=total, unit="frame", desc=f"{self.ranks.tag}scoring", dynamic_ncols=True, smoothing=0.05,
                  disable=not self.progress or not total or not self.ranks.is_main) as bar:
            for batch in todo:
                ids = [b.sequence_id for b in batch]
                results = score_sequences(
                    lm_gen, [b.codes for b in batch], sequence_ids=ids, user_stream=config.user_stream,
                    text=config.text, silence=silence, max_frames=config.max_frames, progress=bar, chunk=config.chunk,
                    first_codebook_weight=config.first_codebook_weight)
                for result in results:
                    b = batch[result.index]
                    self._batch_of[b.sequence_id] = ids
                    if b.sequence_id in finished:      # Scored before, in this same batch: the same numbers.
                        continue
                    arrays = result.arrays()
                    if store is not None:
                        store.save(b, arrays, ids, config, str(lm_model.device))
                    finished[b.sequence_id] = arrays
                    scored.append(b.sequence_id)
                    frames += result.num_frames
        cache = None if self.cache is None else {"dir": str(self.cache.root), "hits": self.cache.hits,
                                                 "misses": self.cache.misses}
        return _RankReport([], scored, frames, encode_seconds, time.perf_counter() - start, chunk_summary(lm_gen),
                           cache)


class LibriLightTask:
    """The LibriLight task as the runner runs it (`moshi-eval librilight`, `demo`): its identity, its evaluator
    (encoding lazily: books finished in `--out` are never encoded) and its unit of resume (a book)."""

    name = TASK
    unit = "book"
    units_dir = report.SEQUENCES_DIR

    def __init__(self, config: LibriLightConfig, prepare_data: tp.Callable[[], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.prepare_data = prepare_data    # the demo writes its audio once the folder is locked and checked

    def identity(self, device: str | torch.device) -> dict:
        return scoring_identity(self.config, device)

    def evaluator(self, mimi: MimiModel, ranks: distributed.Ranks, cache_dir: Path | None, hasher: FileHasher,
                  progress: bool) -> LibriLightEvaluator:
        if self.prepare_data is not None:
            self.prepare_data()
        return LibriLightEvaluator(mimi, self.config, cache_dir, use_cache=cache_dir is not None, progress=progress,
                                   ranks=ranks, encode=False, hasher=hasher)

    def store(self, folder: OutputFolder, ranks: distributed.Ranks) -> BookStore:
        return BookStore(folder, ranks.tag)


__all__ = ["BookStore", "EvalResult", "LibriLightEvaluator", "LibriLightTask", "MIMI_FRAME_RATE", "SILENCE_FRAMES",
           "curve_metrics", "flat_metrics", "scoring_identity", "select_librilight_books"]
