"""Evaluate a model in memory, as often as wanted: the library behind `moshi-eval librilight`.

    evaluator = LibriLightEvaluator(mimi, LibriLightConfig(audio_dir="..."))   # reads and encodes the books once
    result = evaluator(lm_model)        # any moshi LMModel (custom layers, LoRA, training mode): scores the books
    wandb.log(result.metrics, step=step)
    result.write("runs/step_1000")     # results.json, curve.csv, curve.png, sequences/*.npz, as the CLI writes

The books are selected, read and encoded by Mimi when the evaluator is built (the on-disk code cache is read
and filled as by the CLI) and kept in memory: a call only streams the codes through the model. A call scores
the books with the CLI's very functions and options (`run._batches`, `run._encode`, `score_sequences`,
`run._metrics`): for the same model and options, the per-book arrays and the metrics are bitwise the CLI's.

The model comes back as it was given: every module's training flag is restored (a model in training mode is
scored in eval mode, dropout off), nothing is written to its parameters or `requires_grad`, scoring runs
under `torch.no_grad()`, and its streaming state is opened and closed by the call (a model already streaming
is refused). The model stays on its device and dtype; the codes go to it.

Under torch.distributed (the caller's `torchrun` job, a process group already initialised): build the
evaluator and call it on every rank. Each rank encodes and scores its share of the batches (the CLI's split),
the per-book arrays are gathered, and every rank returns the same `EvalResult`, equal to one process's. The
caller's process group is used as is: never initialised or destroyed here.

FSDP: a model wrapped in `torch.distributed.fsdp.FullyShardedDataParallel` holds shards only; score the full
model with the parameters gathered for the call, on every rank:

    with FSDP.summon_full_params(model, writeback=False):
        result = evaluator(model.module)     # the LMModel inside the wrapper

(`writeback=False`: nothing the call does can change the trained shards; on a large model add
`offload_to_cpu=True` or score on one rank only, with a one-process evaluator built there.)
"""
from dataclasses import dataclass, field
import math
import os
from pathlib import Path
import time
import typing as tp

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from tqdm import tqdm

from moshi_patch import LMGen

from . import distributed, report
from .check import verify_streaming
from .checkpoint import LoadedCheckpoint, check_codec_fits
from .cli import default_cache_dir, select_librilight_books   # the CLI's cache and book selection
from .codes import CodeCache, codec_identity, silence_codes
from .config import LibriLightConfig, RunConfig
from .hashing import FileHasher
from .likelihood import LikelihoodEvaluator, LikelihoodResult
from .lock import OutputLock
from .model_call import RankFailedError, caller_ranks, check_model, on_every_rank, score_model
from .run import (SILENCE_FRAMES, EvalJob, _Book, _RankReport, _batches, _check_unique_ids, _chapter_identity,
                  _encode, _metrics, _write_results, chunk_summary, config_digest, scoring_config)
from .scoring import score_sequences

LOSSES = ("audio_ce", "audio_ce_weighted")


def flat_metrics(metrics: dict, prefix: str = "librilight") -> dict[str, float]:
    """The flat `{name: value}` of a run's metrics (results.json's "metrics", or `run._metrics`'s output).

    Names, for `L` in audio_ce, audio_ce_weighted and codebook_0_ce ... codebook_{K-1}_ce:
    - `{prefix}/L`: mean over every scored (book, frame);
    - `{prefix}/L@F`: at each report frame F, the curve's mean over frames F +- report_window (the books
      reaching each frame), with `{prefix}/L@F/low`, `.../high` (95% bootstrap interval over books) and
      `.../se` for audio_ce and audio_ce_weighted;
    - `{prefix}/L/slope_per_1000`: the curve's least-squares slope per 1000 frames (with `/low`, `/high`,
      `/se` for the two audio losses);
    - `{prefix}/num_books`, `{prefix}/longest_book_frames`, `{prefix}/frames_scored` (the (book, frame) values
      averaged into the means).
    A value that does not exist is left out, never 0.0: a report frame no book reaches, an interval with
    fewer than 2 books reaching it or `bootstrap=0`, a slope over fewer than 2 frames.
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
    """What results.json records of the model scored (read at call time: a later training step may move it)."""
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


@dataclass
class EvalResult:
    """One call of an evaluator.

    Attributes:
        metrics: flat `{name: value}` (see `flat_metrics`), straight into `wandb.log` or `add_scalar`.
        sequences: per book (selection order), its arrays: `audio_ce [T]`, `audio_ce_weighted [T]` float32,
            `codebook_ce [K, T]` float32, `text_token [T]` int64 (as in the CLI's `sequences/*.npz`).
        summary: the nested metrics of results.json (curve summaries, bootstrap intervals, buckets).
        skipped: books left out (unreadable file, shorter than `min_frames`), with the reason.
        seconds: wall time of the scoring.
    """
    metrics: dict[str, float]
    sequences: dict[str, dict[str, np.ndarray]]
    summary: dict
    skipped: list[dict]
    seconds: float
    _evaluator: "LibriLightEvaluator" = field(repr=False)
    _model: _ModelShape = field(repr=False)
    _books: list[_Book] = field(repr=False)
    _reports: list[_RankReport] = field(repr=False)

    def write(self, out_dir: str | Path, identity: dict | None = None, argv: tp.Sequence[str] = ()) -> Path:
        """Write the files `moshi-eval librilight --out out_dir` writes: `config.json`, `sequences/<id>.npz`,
        `results.json`, `curve.csv`, `curve.png`. Returns `out_dir / "results.json"`.

        `identity`: what identifies the model in config.json and results.json (default: the Python class and
        parameter count, as a model in memory has no files); `argv` is recorded as the command. `out_dir` is
        locked while writing and, as for the CLI, must be new or hold results of this same configuration
        (`report.ConfigMismatchError` otherwise). Under torch.distributed, call it on one rank.
        """
        ev = self._evaluator
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        identity = dict(identity) if identity is not None else {"in_memory": True}
        hasher = ev._hasher
        books = [_Book(b.book, b.sequence_id) for b in self._books]
        for b in books:
            b.finished = self.sequences.get(b.sequence_id)
        job = EvalJob(argv=list(argv), out=out, audio_dir=tp.cast(Path, ev.config.audio_dir),
                      select=lambda: [b.book for b in books], load=lambda: tp.cast(tp.Any, None),
                      identity=identity, config=ev.config, run=RunConfig(out=out, no_progress=True), hasher=hasher,
                      device=str(self._model.device))
        ckpt = LoadedCheckpoint(tp.cast(tp.Any, self._model), ev.mimi, None, identity)
        batch_of = {b.sequence_id: batch for batch in ev._batch_ids for b in batch}
        with OutputLock(out, f"moshi_eval.EvalResult.write({os.fsdecode(out)!r})"):
            report.check_or_write_config(out, scoring_config(job))
            for b in books:
                if b.finished is None:
                    continue
                b.chapters = _chapter_identity(b.book, hasher)
                meta = {"sequence_id": b.sequence_id, "chapters": b.chapters, "batch_size": ev.config.batch_size,
                        "batch": [x.sequence_id for x in batch_of[b.sequence_id]], "device": str(self._model.device),
                        "config_sha256": config_digest(scoring_config(job))}
                report.write_sequence(out, b.sequence_id, b.finished, meta)
            _write_results(job, ckpt, books, self._reports, time.perf_counter() - self.seconds)
        return out / report.RESULTS_JSON


class LibriLightEvaluator:
    """The LibriLight long-context task, prepared once: books selected, read and encoded by `mimi`.

    Args:
        mimi: the codec of the models to score (moshi's `MimiModel`, `num_codebooks` = the model's `dep_q`).
        config: the books (`config.audio_dir`, LibriLight layout) and the scoring and report options; the
            defaults are `moshi-eval librilight`'s, `config.demo_config()` gives `moshi-eval demo`'s.
        cache_dir: the on-disk code cache (default: the CLI's, so codes encoded by either are reused);
            None with `use_cache=False`: no cache.
        progress: tqdm bars while encoding and scoring.
    Raises:
        DataError: no book, or two books with one id, under `config.audio_dir`; AudioReadError with
            `config.strict`.
    Call it with a model: `evaluator(lm_model) -> EvalResult`.
    """

    def __init__(self, mimi: MimiModel, config: LibriLightConfig, cache_dir: str | Path | None = None,
                 use_cache: bool = True, progress: bool = False) -> None:
        if not isinstance(config, LibriLightConfig):
            raise TypeError(f"config: expected a moshi_eval.LibriLightConfig, got {type(config).__name__}.")
        if config.audio_dir is None:
            raise ValueError("config.audio_dir: expected the LibriLight folder to score, got None.")
        config.validate()
        self.config = config
        self.mimi = mimi
        self.progress = progress
        self.ranks = caller_ranks()
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._hasher = FileHasher(cache_root / "hashes" if use_cache else None)
        self._verified: set[int] = set()     # ids of the models whose streaming was verified
        self._books = [_Book(b, b.sequence_id) for b in select_librilight_books(config)]
        _check_unique_ids(self._books, config.audio_dir)
        batches = _batches(self._books, config)
        owners = distributed.assign([max(b.estimate for b in batch) * len(batch) for batch in batches],
                                    self.ranks.world)
        mine = [batch for batch, owner in zip(batches, owners) if owner == self.ranks.rank]
        self.cache = CodeCache(cache_root, codec_identity(mimi)) if use_cache else None
        skipped: list[dict] = []
        start = time.perf_counter()
        # `_encode` reads only `mimi` of the checkpoint; the codebook count is checked against the model at
        # each call (`check_codec_fits`).
        codec_only = LoadedCheckpoint(tp.cast(tp.Any, _CodecOnly(mimi.num_codebooks)), mimi, None)
        self._mine = on_every_rank(self.ranks, "encoding the books", lambda: _encode(
            mine, codec_only, self.cache, config, skipped, self.ranks, not progress))
        self._silence = silence_codes(mimi, SILENCE_FRAMES) if config.user_stream == "silence" else None
        self.encode_seconds = time.perf_counter() - start
        # The batches as scored (books left out removed), every rank's: recorded with each book's file.
        mine_ids = [[b.sequence_id for b in batch] for batch in self._mine]
        all_ids = [batch for ids in self.ranks.gather(mine_ids) for batch in ids]
        by_id = {b.sequence_id: b for b in self._books}
        self._batch_ids = [[by_id[sid] for sid in batch] for batch in all_ids]
        self.skipped = [entry for part in self.ranks.gather(skipped) for entry in part]
        skipped_ids = {entry["sequence_id"] for entry in self.skipped}
        self.books = [b.book for b in self._books if b.sequence_id not in skipped_ids]
        if not self.books:
            from .data import DataError
            reasons = "; ".join(f"{s['sequence_id']}: {s['reason']}" for s in self.skipped[:5])
            raise DataError(f"no book could be scored under {config.audio_dir} ({reasons}).")

    def __call__(self, lm_model: LMModel) -> EvalResult:
        """Score the books with `lm_model` and return the metrics; the model comes back as given.

        Raises:
            TypeError: not a moshi LMModel; ValueError: the model is streaming already;
            CheckpointError: the codec does not fit the model; NonFiniteLossError: a NaN/inf loss;
            RankFailedError: under torch.distributed, another rank failed (its error is named): every rank
            raises, none waits forever.
        """
        check_model(lm_model)
        check_codec_fits(lm_model, self.mimi)
        config = self.config
        start = time.perf_counter()
        arrays: dict[str, dict[str, np.ndarray]] = {}
        chunks = score_model(self.ranks, lm_model, lambda: self._score(lm_model, arrays))
        seconds = time.perf_counter() - start
        frames = sum(int(a["audio_ce"].shape[0]) for a in arrays.values())
        cache = None if self.cache is None else {"dir": str(self.cache.root), "hits": self.cache.hits,
                                                 "misses": self.cache.misses}
        mine = _RankReport([], list(arrays), frames, self.encode_seconds, seconds, chunks, cache)
        gathered = self.ranks.gather((arrays, mine))
        reports = [r for _, r in gathered]
        reports[0].skipped = list(self.skipped)
        every: dict[str, dict[str, np.ndarray]] = {}
        for part, _ in gathered:
            every.update(part)
        sequences = {b.sequence_id: every[b.sequence_id] for b in self._books if b.sequence_id in every}
        summary = _metrics(sequences, config)
        # Every rank holds every book's arrays and computes the same metrics from them, in selection order.
        return EvalResult(flat_metrics(summary), sequences, summary, list(self.skipped), seconds, self,
                          _ModelShape.of(lm_model), self._books, reports)

    def _score(self, lm_model: LMModel, arrays: dict[str, dict[str, np.ndarray]]) -> dict:
        """This rank's books through `lm_model` (in eval mode, without autograd) into `arrays`; returns the
        chunk summary of results.json."""
        config = self.config
        if config.verify_streaming and id(lm_model) not in self._verified:
            # A streaming layer the project does not know: its chunked path is checked against one frame
            # per call, once per model (training changes its weights, not how it streams).
            verify_streaming(lm_model, config.chunk, config.text)
            self._verified.add(id(lm_model))
        lm_gen = LMGen(lm_model, use_sampling=False)
        silence = None
        if self._silence is not None:
            silence = self._silence[: lm_model.n_q - lm_model.dep_q]
        total = sum(min(b.codes.shape[-1], config.max_frames or b.codes.shape[-1])
                    for batch in self._mine for b in batch if b.codes is not None)
        with tqdm(total=total, unit="frame", desc=f"{self.ranks.tag}scoring",
                  disable=not self.progress or not self.ranks.is_main) as bar:
            for batch in self._mine:     # As `run._score`, same arguments: the same numbers.
                results = score_sequences(
                    lm_gen, [b.codes for b in batch], sequence_ids=[b.sequence_id for b in batch],
                    user_stream=config.user_stream, text=config.text, silence=silence,
                    max_frames=config.max_frames, progress=bar, chunk=config.chunk,
                    first_codebook_weight=config.first_codebook_weight)
                for result in results:
                    arrays[batch[result.index].sequence_id] = result.arrays()
        return chunk_summary(lm_gen)

    def book_ids(self) -> list[str]:
        """The ids of the books scored (selection order)."""
        return [b.sequence_id for b in self._books if b.book in self.books]


Evaluator = tp.Union[LibriLightEvaluator, LikelihoodEvaluator]
Result = tp.Union[EvalResult, LikelihoodResult]


def task_name(evaluator: Evaluator) -> str:
    """The metric prefix of an evaluator's results: `librilight`, or the likelihood task (`sblimp`, ...)."""
    if isinstance(evaluator, LibriLightEvaluator):
        return "librilight"
    if isinstance(evaluator, LikelihoodEvaluator):
        return evaluator.config.task
    raise TypeError(f"evaluators: expected LibriLightEvaluator or LikelihoodEvaluator objects, got "
                    f"{type(evaluator).__name__}.")


@dataclass
class EvalResults:
    """One call of `Evaluators`: each task's result and their metrics merged.

    Attributes:
        results: `{name: EvalResult | LikelihoodResult}` in the evaluators' order.
        metrics: every result's flat metrics under its name (`librilight/audio_ce@8000`, `sblimp/accuracy`, ...),
            straight into `wandb.log` or `add_scalar`.
        seconds: wall time of the call.
    """
    results: dict[str, Result]
    metrics: dict[str, float]
    seconds: float

    def write(self, out_dir: str | Path) -> dict[str, tp.Any]:
        """Each result's files (as its CLI command writes them) in `out_dir/<name>/`; returns their paths."""
        return {name: result.write(Path(out_dir) / name) for name, result in self.results.items()}


class Evaluators:
    """Several evaluators called as one, for a training loop's numbers in one dict:

        evaluate_all = Evaluators([LibriLightEvaluator(mimi, libri_config),
                                   LikelihoodEvaluator(mimi, LikelihoodConfig("sblimp", zr_root))])
        wandb.log(evaluate_all(lm_model).metrics, step=step)

    Args:
        evaluators: a sequence (each named by its task: `librilight`, `sblimp`, ...) or `{name: evaluator}`
            (the name replaces the task as the metric prefix, e.g. two sWUGGY splits). Names must differ, so
            metric names never collide.
    Raises ValueError on two evaluators of one name. A call runs them in order on the model (each returns the
    model as it was given) and raises the first error.
    """

    def __init__(self, evaluators: tp.Sequence[Evaluator] | tp.Mapping[str, Evaluator]) -> None:
        pairs = list(evaluators.items()) if isinstance(evaluators, tp.Mapping) else \
            [(task_name(e), e) for e in evaluators]
        if not pairs:
            raise ValueError("evaluators: expected at least one evaluator, got none.")
        names = [name for name, _ in pairs]
        for name, e in pairs:
            task_name(e)     # the type check
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"evaluators: expected names without '/', got {name!r}.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"evaluators: two evaluators named {duplicates} (their metrics would collide); pass "
                             "{name: evaluator} with distinct names.")
        self.evaluators: dict[str, Evaluator] = dict(pairs)

    def __call__(self, lm_model: LMModel) -> EvalResults:
        start = time.perf_counter()
        results: dict[str, Result] = {}
        metrics: dict[str, float] = {}
        for name, evaluator in self.evaluators.items():
            result = results[name] = evaluator(lm_model)
            prefix = task_name(evaluator)
            for key, value in result.metrics.items():
                metrics[name + key[len(prefix):]] = value    # every key starts with `prefix/`
        return EvalResults(results, metrics, time.perf_counter() - start)


@dataclass
class _CodecOnly:
    """Stands for the model while encoding: `run._encode` reads only its `dep_q` (the codebooks kept)."""
    dep_q: int


__all__ = ["EvalResult", "EvalResults", "Evaluators", "LibriLightEvaluator", "RankFailedError", "caller_ranks",
           "default_cache_dir", "flat_metrics", "task_name"]
