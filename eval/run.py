"""The eval run behind `moshi-eval librilight` and `demo`: lock, identify, encode, score, write, aggregate.

No result is lost or mixed:
- one run at a time per `--out` (`lock.OutputLock`), taken before anything is read or written there;
- the configuration (`config.json`) holds what the numbers depend on, the content hash of every weight file
  included: an `--out` of another configuration is refused;
- each book's file holds its chapters' identity (path, size, mtime, sha256): a finished book whose chapters
  changed is scored again (and the run says so), never reused;
- books are batched by length over the whole selection, so a resumed run scores each book in the very batch
  an uninterrupted run would have: its numbers are bitwise the same;
- each book is written atomically as soon as it is scored; SIGTERM / Ctrl-C stop between two calls and
  print the command that resumes.
"""
from contextlib import ExitStack
from dataclasses import dataclass, field
import hashlib
import json
import math
import os
from pathlib import Path
import platform
import shlex
import signal
import sys
import threading
import time
import typing as tp

import numpy as np
import torch
from tqdm import tqdm

from moshi_patch import LMGen

from . import distributed, report
from .check import verify_streaming
from .checkpoint import LoadedCheckpoint, check_codec_fits
from .config import LibriLightConfig, RunConfig
from .codes import CodeCache, codec_identity, device_kind, encode_book, encoding_setting, silence_codes
from .data import AudioReadError, Book, DataError, book_seconds
from .errors import EXIT_INTERRUPTED, UsageError
from .hashing import FileHasher, file_sha256
from .lock import OutputLock
from .bootstrap import bootstrap_summary, bucket_band
from .metrics import summarize
from .scoring import score_sequences

# Frames of silence encoded for the user stream; later user frames repeat the last one. Mimi's encoder
# attends over 250 steps at 25 Hz (10 s = 125 frames): once the warm-up frames are out of that window its
# input, hence its codes, are constant.
SILENCE_FRAMES = 160
MIMI_FRAME_RATE = 12.5   # frames per second, to estimate a book's frames from its file headers


@dataclass
class EvalJob:
    """Everything `run_eval` needs, whatever the source of the model and the books."""
    argv: list[str]
    out: Path
    audio_dir: Path
    select: tp.Callable[[], list[Book]]       # the books, called once --out is locked and checked
    load: tp.Callable[[], LoadedCheckpoint]   # loads the model and codec (after the config check)
    identity: dict                             # model identity (for the config and results.json)
    config: LibriLightConfig                   # the books' options, scoring and report
    run: RunConfig                             # --out, code cache, threads, progress
    hasher: FileHasher = field(default_factory=FileHasher)
    extra_config: dict = field(default_factory=dict)
    device: str | None = "cpu"                 # where the model runs (`--device`; None: the default device)


def scoring_config(job: EvalJob) -> dict:
    """What the per-sequence numbers depend on: a rerun in the same --out must match it exactly.

    Book selection (--num-books, --min-frames), reporting and --strict are left out: they do not change a
    finished book's numbers, so a run can be extended or re-reported in place. The batch size is in: a book
    streamed in a batch of another size gets other numbers at rounding level (~1e-6). So are the device kind
    and Mimi's encoding setting (`codes.encoding_setting`): codes made on another device or thread count can
    differ. Each book file records the digest of this configuration (`config_digest`).
    """
    a = job.config
    device = _config_device(job.device)
    return {
        "audio_dir": os.fsdecode(job.audio_dir.resolve()),
        "model": job.identity,
        "max_chapters": a.max_chapters,
        "max_frames": a.max_frames,
        "user_stream": a.user_stream,
        "text": a.text,
        "first_codebook_weight": a.first_codebook_weight,
        # The losses agree across chunk lengths up to float rounding only: a resumed run keeps its chunk so
        # that its books are bitwise those of an uninterrupted run.
        "chunk": a.chunk,
        "batch_size": a.batch_size,
        "device": device_kind(device),
        "encoding": encoding_setting(device),
        **job.extra_config,
    }


def _config_device(device: str | None) -> torch.device:
    """The device the run scores on, as `checkpoint.resolve_device` resolves `--device`."""
    from .checkpoint import resolve_device
    return resolve_device(device)


def config_digest(config: dict) -> str:
    """sha256 of a scoring configuration in the form it takes on disk, recorded in each book file."""
    return hashlib.sha256(json.dumps(report.json_form(config), sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    import moshi
    import moshi_patch
    from importlib import metadata
    try:
        moshi_version = metadata.version("moshi")
    except metadata.PackageNotFoundError:
        moshi_version = getattr(moshi, "__version__", None)
    return {"moshi": moshi_version, "torch": torch.__version__, "moshi_patch": moshi_patch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def book_entry(book: Book, sequence_id: str) -> dict:
    return {"sequence_id": sequence_id, "speaker": book.speaker, "book": book.book,
            "chapters": [{"file": os.fsdecode(c.path), "metadata": c.metadata} for c in book.chapters]}


def command_line(argv: list[str]) -> str:
    return "moshi-eval " + shlex.join(argv)


def _raise_interrupt(signum: int, frame: tp.Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_eval(job: EvalJob) -> int:
    """Encode, score, write and aggregate. Returns the exit code.

    Under torchrun the ranks share the batches and rank 0 writes the results (`distributed`). SIGTERM is
    turned into KeyboardInterrupt; either stops the run between two streaming calls, leaving every
    finished book's file intact, and prints the command that resumes it.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    threads = torch.get_num_threads()
    if job.run.threads is not None:
        torch.set_num_threads(job.run.threads)
    ranks = distributed.from_environment()
    try:
        _check_usage(job)
        with ExitStack() as stack:
            resumed = _open_output(job, ranks, stack)
            return _run(job, ranks, resumed)
    except KeyboardInterrupt:
        seq_dir = job.out / report.SEQUENCES_DIR
        n = len(list(seq_dir.glob("*.npz"))) if seq_dir.is_dir() else 0
        print(f"\nmoshi-eval: {ranks.tag}interrupted. {n} finished book(s) are saved in {seq_dir}. "
              f"Resume with the same command:\n  {command_line(job.argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        ranks.close()
        torch.set_num_threads(threads)     # main() may be called in-process (tests, notebooks)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _open_output(job: EvalJob, ranks: distributed.Ranks, stack: ExitStack) -> bool:
    """Rank 0 locks `--out` (for the whole run) and checks its configuration; every rank learns the outcome
    (an error stops them all with the same message). Returns True for a resumed run."""
    outcome: tuple[bool, BaseException | None] = (False, None)
    if ranks.is_main:
        try:
            stack.enter_context(OutputLock(job.out, command_line(job.argv)))
            report.remove_stale_temporaries(job.out)     # of a run killed while writing (under the lock)
            outcome = (report.check_or_write_config(job.out, scoring_config(job)), None)
        except Exception as exc:
            outcome = (False, exc)
    resumed, error = ranks.broadcast(outcome)
    if error is not None:
        raise error
    return resumed


def _check_usage(job: EvalJob) -> None:
    args, out = job.config, job.out
    if args.min_frames is not None and args.max_frames is not None and args.min_frames > args.max_frames:
        raise UsageError(f"--min-frames {args.min_frames} is larger than --max-frames {args.max_frames}: "
                         "no book could be scored.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder: {exc.strerror}.") from exc


@dataclass
class _Book:
    """A selected book on its way through the run."""
    book: Book
    sequence_id: str
    estimate: int = 0                         # frames it will be scored on, from the file headers
    chapters: list[dict] | None = None        # identity of its chapter files, None if one is unreadable
    codes: torch.Tensor | None = None         # [8, T] once encoded
    finished: dict[str, np.ndarray] | None = None   # its arrays, once scored (in this run or before)
    scored_now: bool = False                  # scored (and written) by this run


@dataclass
class _RankReport:
    """What one rank did, sent to rank 0 for results.json."""
    skipped: list[dict]
    scored: list[str]                         # books this rank scored in this run
    frames: int
    encode_seconds: float
    score_seconds: float
    chunks: dict
    cache: dict | None


def _run(job: EvalJob, ranks: distributed.Ranks, resumed: bool) -> int:
    args, run = job.config, job.run
    start_time = time.perf_counter()
    books = [_Book(b, b.sequence_id) for b in job.select()]
    _check_unique_ids(books, job.audio_dir)
    batches = _batches(books, args)
    owners = distributed.assign([max(b.estimate for b in batch) * len(batch) for batch in batches], ranks.world)
    mine = [batch for batch, owner in zip(batches, owners) if owner == ranks.rank]
    ckpt = job.load()
    check_codec_fits(ckpt.lm_model, ckpt.mimi)
    if args.verify_streaming:
        # A streaming layer the project does not know: its chunked path is checked against one frame per call.
        verified = verify_streaming(ckpt.lm_model, args.chunk, args.text)
        if verified and ranks.is_main:
            print(f"moshi-eval: {verified}", file=sys.stderr)
    _resume([b for batch in mine for b in batch], job, resumed, ranks)
    todo = [batch for batch in mine if any(b.finished is None for b in batch)]
    cache = None if run.no_cache else CodeCache(tp.cast(Path, run.cache_dir), codec_identity(ckpt.mimi))
    skipped: list[dict] = []
    encode_start = time.perf_counter()
    todo = _encode(todo, ckpt, cache, args, skipped, ranks, run.no_progress)
    encode_seconds = time.perf_counter() - encode_start
    lm_gen = LMGen(ckpt.lm_model, use_sampling=False)
    score_start = time.perf_counter()
    frames = _score(todo, lm_gen, ckpt.mimi, job, ranks)
    mine_report = _RankReport(
        skipped, [b.sequence_id for batch in todo for b in batch if b.scored_now], frames, encode_seconds,
        time.perf_counter() - score_start, chunk_summary(lm_gen),
        None if cache is None else {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses})
    reports = ranks.gather(mine_report)
    if ranks.is_main:
        _write_results(job, ckpt, books, reports, start_time)
    ranks.barrier()
    return 0


def _check_unique_ids(books: list[_Book], audio_dir: Path) -> None:
    ids = [b.sequence_id for b in books]
    if len(set(ids)) != len(ids):
        dups = sorted({i for i in ids if ids.count(i) > 1})
        folders = {i: [os.fsdecode(b.book.chapters[0].path.parent) for b in books if b.sequence_id == i]
                   for i in dups[:3]}
        named = "; ".join(f"{i}: {', '.join(f)}" for i, f in folders.items())
        raise DataError(f"several books share a sequence id under {audio_dir} ({named}): rename one of the "
                        "folders.")


def _chapter_identity(book: Book, hasher: FileHasher) -> list[dict] | None:
    try:
        return [hasher.identity(c.path) for c in book.chapters]
    except OSError:
        return None


def _load_finished(b: _Book, job: EvalJob, digest: str) -> str | None:
    """Keeps in `b` the book's arrays if `--out` holds it scored from the very chapters it has now, under
    this configuration (`digest`: `config_digest(scoring_config(job))`), for this book. Returns why a book
    file there is not reused (None otherwise)."""
    b.chapters = _chapter_identity(b.book, job.hasher)
    path = report.sequence_path(job.out, b.sequence_id)
    if not path.is_file():
        return None
    arrays, meta = report.read_sequence(path, with_meta=True)
    if meta.get("config_sha256") != digest:
        return ("its file was scored under another configuration (another model, --max-frames, options...) "
                "or comes from another run")
    if meta.get("sequence_id") != b.sequence_id:
        return f"its file holds book {meta.get('sequence_id')!r}"
    if b.chapters is None or meta.get("chapters") != b.chapters:
        return "its chapters changed since it was scored (added, removed or replaced files)"
    b.finished = arrays
    return None


def _resume(books: list[_Book], job: EvalJob, resumed: bool, ranks: distributed.Ranks) -> None:
    """Mark the books already scored in `--out` as finished, unless their chapters changed since or their
    file was not scored under this configuration (copied from elsewhere)."""
    digest = config_digest(scoring_config(job))
    rescored = [(b.sequence_id, why) for b in books if (why := _load_finished(b, job, digest)) is not None]
    done = sum(b.finished is not None for b in books)
    if resumed and done:
        print(f"moshi-eval: {ranks.tag}resuming in {job.out}: {done} of {len(books)} books already scored.",
              file=sys.stderr)
    for sid, why in rescored:
        print(f"moshi-eval: {ranks.tag}{sid}: {why}: scoring it again.", file=sys.stderr)


def _encode(batches: list[list[_Book]], ckpt: LoadedCheckpoint, cache: CodeCache | None,
            args: LibriLightConfig, skipped: list[dict], ranks: distributed.Ranks,
            no_progress: bool = False) -> list[list[_Book]]:
    """Mimi codes of the books of `batches` (cached on disk by content and codec). Unreadable books and books
    shorter than --min-frames go to `skipped` and leave their batch. Returns the batches left."""
    books = [b for batch in batches for b in batch]
    kept: set[int] = set()
    with tqdm(total=sum(len(b.book.chapters) for b in books), unit="chapter", desc=f"{ranks.tag}encoding",
              disable=no_progress or not books or not ranks.is_main, dynamic_ncols=True) as bar:
        for b in books:
            try:
                b.codes = encode_book(ckpt.mimi, b.book, cache, num_codebooks=ckpt.lm_model.dep_q,
                                      on_chapter=lambda i, c: bar.update(1))
            except AudioReadError as exc:
                if args.strict:
                    raise
                tqdm.write(f"moshi-eval: {ranks.tag}skipping book {b.sequence_id}: {exc}", file=sys.stderr)
                skipped.append(dict(book_entry(b.book, b.sequence_id), reason=str(exc), path=os.fsdecode(exc.path)))
                continue
            length = int(b.codes.shape[-1])
            if args.min_frames is not None and length < args.min_frames:
                skipped.append(dict(book_entry(b.book, b.sequence_id), frames=length,
                                    reason=f"shorter than --min-frames {args.min_frames}: {length} frames"))
                continue
            kept.add(id(b))
    return [left for left in ([b for b in batch if id(b) in kept] for batch in batches) if left]


def _estimated_frames(book: Book, max_frames: int | None) -> int:
    """Frames a book will be scored on, from its file headers (0 if a header cannot be read)."""
    try:
        frames = math.ceil(book_seconds(book) * MIMI_FRAME_RATE)
    except AudioReadError:
        frames = 0
    return min(frames, max_frames) if max_frames else frames


def _batches(books: list[_Book], args: LibriLightConfig) -> list[list[_Book]]:
    """Batches of books of similar length (few frames streamed past the shorter ones), formed over the whole
    selection from the file headers, finished books included: a book is scored in the same batch whether
    the run is resumed or not, and whatever the number of processes, so its numbers are bitwise the same."""
    for b in books:
        b.estimate = _estimated_frames(b.book, args.max_frames)
    order = sorted(books, key=lambda b: b.estimate)   # stable: ties keep the selection order
    return [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]


def _score(batches: list[list[_Book]], lm_gen: LMGen, mimi: tp.Any, job: EvalJob, ranks: distributed.Ranks) -> int:
    """Scores each batch; writes its books not finished yet. Returns the frames written."""
    args, out = job.config, job.out
    lm_model = lm_gen.lm_model
    silence = None
    if args.user_stream == "silence":
        silence = silence_codes(mimi, SILENCE_FRAMES)[: lm_model.n_q - lm_model.dep_q]
    total = sum(min(b.codes.shape[-1], args.max_frames or b.codes.shape[-1])
                for batch in batches for b in batch if b.finished is None and b.codes is not None)
    written = 0
    digest = config_digest(scoring_config(job))
    with tqdm(total=total, unit="frame", desc=f"{ranks.tag}scoring", dynamic_ncols=True, smoothing=0.05,
              disable=job.run.no_progress or not total or not ranks.is_main) as bar:
        for batch in batches:
            results = score_sequences(
                lm_gen, [b.codes for b in batch], sequence_ids=[b.sequence_id for b in batch],
                user_stream=args.user_stream, text=args.text, silence=silence, max_frames=args.max_frames,
                progress=bar, chunk=args.chunk, first_codebook_weight=args.first_codebook_weight)
            for result in results:
                b = batch[result.index]
                if b.finished is not None:      # Scored before, in this same batch: the same numbers.
                    continue
                meta = {"sequence_id": b.sequence_id, "chapters": b.chapters, "batch_size": args.batch_size,
                        "batch": [x.sequence_id for x in batch], "device": str(lm_model.device),
                        "config_sha256": digest}
                path = report.write_sequence(out, b.sequence_id, result.arrays(), meta)
                b.finished = result.arrays()
                b.scored_now = True
                written += result.num_frames
                tqdm.write(f"moshi-eval: {ranks.tag}{b.sequence_id}: {result.num_frames} frames, mean audio_ce "
                           f"{np.nanmean(result.audio_ce):.4f} -> {path}", file=sys.stderr)
    return written


def _sum_chunks(summaries: list[dict]) -> dict:
    """The chunk counts of every rank, summed, with the ratios recomputed."""
    keys = ("chunked_calls", "frames", "passes", "text_guesses", "text_guesses_accepted")
    total = {k: sum(s[k] for s in summaries) for k in keys}
    total["passes_per_chunk"] = total["passes"] / total["chunked_calls"] if total["chunked_calls"] else None
    total["text_guess_accepted_share"] = (total["text_guesses_accepted"] / total["text_guesses"]
                                          if total["text_guesses"] else None)
    return total


def chunk_summary(lm_gen: LMGen) -> dict:
    """What chunked scoring did in this run: passes per chunk and, for predicted text, the guesses."""
    stats = lm_gen.chunk_stats
    return {"chunked_calls": stats.calls, "frames": stats.frames, "passes": stats.passes,
            "passes_per_chunk": stats.passes_per_call, "text_guesses": stats.guesses,
            "text_guesses_accepted": stats.guesses_right, "text_guess_accepted_share": stats.guess_accuracy}


def _metrics(sequences: dict[str, dict[str, np.ndarray]], args: LibriLightConfig) -> dict:
    """`metrics.summarize` of each loss, with bootstrap intervals over books unless `--bootstrap 0`."""
    def summary(values: list[np.ndarray]) -> dict:
        result = summarize(values, args.report_at, args.report_window, args.bucket).to_dict()
        if args.bootstrap > 0:
            result["bootstrap"] = bootstrap_summary(values, args.report_at, args.report_window, args.bucket,
                                                    args.bootstrap, args.bootstrap_seed)
        else:
            result["bootstrap"] = {"absent_reason": "--bootstrap 0"}
        return result

    metrics: dict[str, tp.Any] = {name: summary([s[name] for s in sequences.values()])
                                  for name in ("audio_ce", "audio_ce_weighted")}
    K = next(iter(sequences.values()))["codebook_ce"].shape[0]
    metrics["codebook_ce"] = [summary([s["codebook_ce"][k] for s in sequences.values()]) for k in range(K)]
    return metrics


def _write_results(job: EvalJob, ckpt: LoadedCheckpoint, books: list[_Book], reports: list[_RankReport],
                   start_time: float) -> None:
    """`results.json`, `curve.csv` and `curve.png`, rebuilt from every finished book of the selection."""
    args, out = job.config, job.out
    lm_model, mimi = ckpt.lm_model, ckpt.mimi
    frame_rate = float(mimi.frame_rate)
    skipped = [entry for r in reports for entry in r.skipped]
    skipped_ids = {entry["sequence_id"] for entry in skipped}
    scored_now = {sid for r in reports for sid in r.scored}
    digest = config_digest(scoring_config(job))
    for b in books:                      # books of other ranks: read their files
        if b.finished is None and b.sequence_id not in skipped_ids:
            _load_finished(b, job, digest)
    finished = [b for b in books if b.sequence_id not in skipped_ids and b.finished is not None]
    if args.min_frames is not None:     # Books scored before, in a run with a lower --min-frames.
        short = [b for b in finished if tp.cast(dict, b.finished)["audio_ce"].shape[0] < args.min_frames]
        for b in short:
            frames = int(tp.cast(dict, b.finished)["audio_ce"].shape[0])
            skipped.append(dict(book_entry(b.book, b.sequence_id), frames=frames,
                                reason=f"shorter than --min-frames {args.min_frames}: {frames} frames"))
        finished = [b for b in finished if all(b is not x for x in short)]
    if not finished:
        if skipped and all("min-frames" in s["reason"] for s in skipped):
            longest = max(s["frames"] for s in skipped)
            raise DataError(f"every book is shorter than --min-frames {args.min_frames} frames "
                            f"(longest: {longest} frames) under {job.audio_dir}.")
        reasons = "; ".join(f"{s['sequence_id']}: {s['reason']}" for s in skipped[:5])
        raise DataError(f"no book could be scored under {job.audio_dir} ({reasons}).")
    sequences = {b.sequence_id: tp.cast(dict, b.finished) for b in finished}
    books_meta = []
    for b in finished:
        s = sequences[b.sequence_id]
        T = int(s["audio_ce"].shape[0])
        books_meta.append(dict(
            book_entry(b.book, b.sequence_id), frames=T, minutes=T / frame_rate / 60,
            audio_ce_mean=float(np.nanmean(s["audio_ce"])),
            audio_ce_weighted_mean=float(np.nanmean(s["audio_ce_weighted"])),
            file=str(report.sequence_path(out, b.sequence_id).relative_to(out)),
            file_sha256=file_sha256(report.sequence_path(out, b.sequence_id))))
    timing = {"scored_frames": sum(r.frames for r in reports),
              "score_seconds": max(r.score_seconds for r in reports),
              "encode_seconds": max(r.encode_seconds for r in reports)}
    scored, seconds = timing["scored_frames"], timing["score_seconds"]
    total_seconds = time.perf_counter() - start_time
    caches = [r.cache for r in reports if r.cache is not None]
    runtime = {
        "frames": scored, "seconds": seconds,
        "frames_per_s": scored / seconds if scored else None,
        "frames_per_s_note": None if scored else "nothing scored in this run (all books were finished)",
        "encode_seconds": timing["encode_seconds"], "total_seconds": total_seconds,
        "books_scored_this_run": sum(b.sequence_id in scored_now for b in finished),
        "books_resumed": sum(b.sequence_id not in scored_now for b in finished),
        "code_cache": None if not caches else {"dir": caches[0]["dir"], "hits": sum(c["hits"] for c in caches),
                                               "misses": sum(c["misses"] for c in caches)},
        "device": str(lm_model.device),
        "processes": len(reports),
        "chunks": _sum_chunks([r.chunks for r in reports]),
    }
    config = dict(scoring_config(job), num_books=args.num_books,
                  min_frames=args.min_frames, report_at=list(args.report_at), report_window=args.report_window,
                  bucket=args.bucket, strict=args.strict, bootstrap=args.bootstrap,
                  bootstrap_seed=args.bootstrap_seed)
    model = dict(ckpt.identity, n_q=lm_model.n_q, dep_q=lm_model.dep_q, card=lm_model.card,
                 text_card=lm_model.text_card, delays=list(lm_model.delays), context=lm_model.context,
                 context_minutes=None if lm_model.context is None else lm_model.context / frame_rate / 60,
                 text_padding_token_id=lm_model.text_padding_token_id)
    codec = {"identity": codec_identity(mimi), "num_codebooks": mimi.num_codebooks,
             "cardinality": mimi.cardinality, "sample_rate": mimi.sample_rate, "frame_rate": frame_rate}
    results = report.results_document(command_line(job.argv), config, versions(), model, codec, books_meta,
                                      skipped, _metrics(sequences, args), runtime)
    # results.json last, naming the digests of the files written with it: a run killed in between leaves
    # a results.json whose digests do not match curve.csv / curve.png, which a reader can tell.
    report.write_curve_csv(out / report.CURVE_CSV, sequences, frame_rate)
    values = [s["audio_ce"] for s in sequences.values()]
    band = bucket_band(values, args.bucket, args.bootstrap, args.bootstrap_seed) if args.bootstrap > 0 else None
    report.plot_curve(out / report.CURVE_PNG, {sid: s["audio_ce"] for sid, s in sequences.items()},
                      frame_rate, lm_model.context, band=band, log_x=args.log_x, bucket=args.bucket,
                      title=f"audio CE of {len(sequences)} book(s), text={args.text}, user={args.user_stream}")
    results["files"] = {name: file_sha256(out / name) for name in (report.CURVE_CSV, report.CURVE_PNG)}
    report.write_json_atomic(out / report.RESULTS_JSON, results)
    rate = f"{scored / seconds:.1f} frames/s" if scored else "nothing left to score"
    print(f"moshi-eval: {len(sequences)} book(s), {scored} frames scored in {seconds:.1f} s "
          f"({rate}); {len(skipped)} skipped; total {total_seconds:.1f} s; results in "
          f"{out / report.RESULTS_JSON}")
