"""`moshi-eval`: long-context audio cross-entropy of a streaming Moshi model.

Subcommands:
- `librilight --audio-dir DIR --out DIR [checkpoint options]`: every book of a LibriLight-layout folder
  (`<root>/<speaker>/<book>/<chapter>.flac`) is one sequence; its Mimi codes are teacher forced in the
  model's audio stream and the per-frame cross-entropy of the 8 codebooks is saved, then aggregated.
- `demo --out DIR`: the same job on the embedded defaults (a small seeded model and codec, a short shipped
  audiobook): no download, well under a minute on a CPU.
- `check-streaming`: streaming logits against `LMModel.forward` (moshi_eval.check).

No finished work is lost: each book's results are written as soon as it is scored; rerunning the same
command with the same `--out` skips finished books, and Ctrl-C / SIGTERM prints the command to resume.
"""
import argparse
from dataclasses import dataclass, field
import datetime
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

from . import check as check_module
from . import report
from .checkpoint import (CheckpointError, LoadedCheckpoint, add_checkpoint_arguments, check_codec_fits,
                         resolve_checkpoint)
from .codes import CodeCache, codec_identity, encode_book, silence_codes
from .data import AudioReadError, Book, DataError, book_seconds, discover_books, select_books
from .loss import DEFAULT_FIRST_CODEBOOK_WEIGHT
from .metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT, summarize
from .scoring import DEFAULT_CHUNK, NonFiniteLossError, TEXT_MODES, USER_STREAMS, score_sequences

# Frames of silence encoded for the user stream; later user frames repeat the last one. Mimi's encoder
# attends over 250 steps at 25 Hz (10 s = 125 frames): once the warm-up frames are out of that window its
# input, hence its codes, are constant.
SILENCE_FRAMES = 160
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A bad combination of command line values."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moshi_eval" / "codes"


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    if not (x > 0 and x != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value!r}")
    return x


def _frame_list(value: str) -> tuple[int, ...]:
    try:
        frames = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts like 8000,16000, got {value!r}")
    if not frames or any(f < 0 for f in frames):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative frame counts, got {value!r}")
    return frames


def _add_scoring_arguments(parser: argparse.ArgumentParser, report_at: tuple[int, ...], window: int,
                           bucket: int, batch_size: int, threads: int | None = None) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; reused to resume)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                        help=f"books streamed together (default {batch_size}); books are batched by length")
    parser.add_argument("--max-frames", type=_positive_int, default=None,
                        help="score at most this many frames of each book (12.5 frames per second)")
    parser.add_argument("--max-chapters", type=_positive_int, default=None,
                        help="use only the first N chapters of each book")
    parser.add_argument("--num-books", type=_positive_int, default=None, help="use only the first N books")
    parser.add_argument("--min-frames", type=_positive_int, default=None,
                        help="skip books shorter than this many frames (all shorter: error)")
    parser.add_argument("--user-stream", choices=USER_STREAMS, default="silence",
                        help="user audio stream: Mimi codes of digital silence (default), or zero (-1, no input)")
    parser.add_argument("--text", choices=TEXT_MODES, default="predicted",
                        help="text stream: the model's own argmax (default) or forced to the padding token")
    parser.add_argument("--first-codebook-weight", type=_positive_float, default=DEFAULT_FIRST_CODEBOOK_WEIGHT,
                        help="weight of codebook 0 in audio_ce_weighted (default 100, as moshi-finetune)")
    parser.add_argument("--report-at", type=_frame_list, default=report_at,
                        help="frames at which results.json reports the curve (default "
                             f"{','.join(map(str, report_at))})")
    parser.add_argument("--report-window", type=_positive_int, default=window,
                        help=f"half width in frames of the window mean around each report frame (default {window})")
    parser.add_argument("--bucket", type=_positive_int, default=bucket,
                        help=f"frames per bucket of the bucket means (default {bucket})")
    parser.add_argument("--chunk", type=_positive_int, default=DEFAULT_CHUNK,
                        help=f"frames per streaming call (default {DEFAULT_CHUNK}): the temporal transformer "
                             "runs over a chunk at once, with the same per-frame losses; 1 = one step per frame")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an unreadable audio file instead of skipping its book")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"Mimi code cache (default {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the code cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=_positive_int, default=threads,
                        help="torch CPU threads (torch.set_num_threads; default: "
                             f"{threads or 'torch default'}). Small models on a CPU run fastest on 1 thread")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-eval", description=__doc__.split("\n\n")[0].replace("`", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)

    libri = subparsers.add_parser("librilight", help="score the books of a LibriLight-layout folder",
                                  description="Per-frame audio cross-entropy of a streaming Moshi model on "
                                              "LibriLight books (one book = one sequence).")
    libri.add_argument("--audio-dir", required=True, type=Path,
                       help="LibriLight layout root: <root>/<speaker>/<book>/<chapter>.flac (+ .json)")
    add_checkpoint_arguments(libri)
    _add_scoring_arguments(libri, DEFAULT_REPORT_AT, DEFAULT_HALF_WINDOW, DEFAULT_BUCKET, batch_size=4)
    libri.set_defaults(func=run_librilight)

    demo = subparsers.add_parser("demo", help="the librilight job on embedded defaults (no download)",
                                 description="Runs the librilight eval on a small seeded Moshi-shaped model, "
                                             "a small seeded Mimi and a short shipped audiobook (random "
                                             "weights: the numbers show the plumbing, not a trained model).")
    # The demo model is tiny: intra-op threads only add synchronization (7x slower on a busy 2-core box).
    _add_scoring_arguments(demo, (125, 250, 500), 25, 100, batch_size=2, threads=1)
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo model and codec")
    demo.set_defaults(func=run_demo)

    check_module.add_parser(subparsers)
    return parser


@dataclass
class EvalJob:
    """Everything `run_eval` needs, whatever the source of the model and the books."""
    argv: list[str]
    out: Path
    audio_dir: Path
    books: list[Book]
    load: tp.Callable[[], LoadedCheckpoint]   # loads the model and codec (after the config check)
    identity: dict                             # model identity (for the config and results.json)
    args: argparse.Namespace
    extra_config: dict = field(default_factory=dict)


def _scoring_config(job: EvalJob) -> dict:
    """What the per-sequence numbers depend on: a rerun in the same --out must match it exactly.

    Book selection (--num-books, --min-frames), batching, device, reporting and --strict are left out:
    they do not change a finished book's numbers, so a run can be extended or re-reported in place.
    """
    a = job.args
    return {
        "audio_dir": str(job.audio_dir.resolve()),
        "model": job.identity,
        "max_chapters": a.max_chapters,
        "max_frames": a.max_frames,
        "user_stream": a.user_stream,
        "text": a.text,
        "first_codebook_weight": a.first_codebook_weight,
        # The losses agree across chunk lengths up to float rounding only: a resumed run keeps its chunk so
        # that its books are bitwise those of an uninterrupted run.
        "chunk": a.chunk,
        **job.extra_config,
    }


def _versions() -> dict:
    import moshi
    import moshi_patch
    from importlib import metadata
    try:
        moshi_version = metadata.version("moshi")
    except metadata.PackageNotFoundError:
        moshi_version = getattr(moshi, "__version__", None)
    return {"moshi": moshi_version, "torch": torch.__version__, "moshi_patch": moshi_patch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _book_entry(book: Book, sequence_id: str) -> dict:
    return {"sequence_id": sequence_id, "speaker": book.speaker, "book": book.book,
            "chapters": [{"file": str(c.path), "metadata": c.metadata} for c in book.chapters]}


def _raise_interrupt(signum: int, frame: tp.Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_eval(job: EvalJob) -> int:
    """Encode, score, write and aggregate. Returns the exit code.

    SIGTERM is turned into KeyboardInterrupt; either stops the run between two frames, leaving every
    finished book's file intact, and prints the command that resumes it.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    threads = torch.get_num_threads()
    if job.args.threads is not None:
        torch.set_num_threads(job.args.threads)
    try:
        return _run_eval(job)
    except KeyboardInterrupt:
        seq_dir = job.out / report.SEQUENCES_DIR
        n = len(list(seq_dir.glob("*.npz"))) if seq_dir.is_dir() else 0
        print(f"\nmoshi-eval: interrupted. {n} finished book(s) are saved in {seq_dir}. "
              f"Resume with the same command:\n  {_command(job.argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)     # main() may be called in-process (tests, notebooks)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_eval(job: EvalJob) -> int:
    args = job.args
    out = job.out
    if args.min_frames is not None and args.max_frames is not None and args.min_frames > args.max_frames:
        raise UsageError(f"--min-frames {args.min_frames} is larger than --max-frames {args.max_frames}: "
                         "no book could be scored.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    resumed = report.check_or_write_config(out, _scoring_config(job))
    start_time = time.perf_counter()
    progress = not args.no_progress

    ckpt = job.load()
    lm_model, mimi = ckpt.lm_model, ckpt.mimi
    check_codec_fits(lm_model, mimi)
    frame_rate = float(mimi.frame_rate)

    ids = [b.sequence_id for b in job.books]
    if len(set(ids)) != len(ids):
        dups = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"several books share a sequence id under {job.audio_dir}: {dups[:5]}")
    done = {i for i in ids if report.sequence_path(out, i).is_file()}
    if resumed and done:
        print(f"moshi-eval: resuming in {out}: {len(done)} of {len(ids)} books already scored.", file=sys.stderr)

    # 1. Codes of the books still to score (cached on disk by content and codec).
    cache = None
    if not args.no_cache:
        cache = CodeCache(args.cache_dir or default_cache_dir(), codec_identity(mimi))
    skipped: list[dict] = []
    pending: list[tuple[Book, torch.Tensor]] = []
    todo = [b for b in job.books if b.sequence_id not in done]
    encode_start = time.perf_counter()
    with tqdm(total=sum(len(b.chapters) for b in todo), unit="chapter", desc="encoding",
              disable=not progress or not todo, dynamic_ncols=True) as bar:
        for book in todo:
            try:
                codes = encode_book(mimi, book, cache, num_codebooks=lm_model.dep_q,
                                    on_chapter=lambda i, c: bar.update(1))
            except AudioReadError as exc:
                if args.strict:
                    raise
                tqdm.write(f"moshi-eval: skipping book {book.sequence_id}: {exc}", file=sys.stderr)
                skipped.append(dict(_book_entry(book, book.sequence_id), reason=str(exc), path=str(exc.path)))
                continue
            pending.append((book, codes))
    encode_seconds = time.perf_counter() - encode_start

    # 2. Length filter (finished books were checked when they were scored; recheck their saved length).
    finished: dict[str, dict[str, np.ndarray]] = {}
    for book in job.books:
        if book.sequence_id in done:
            finished[book.sequence_id] = report.read_sequence(report.sequence_path(out, book.sequence_id))
    if args.min_frames is not None:
        kept = []
        for book, codes in pending:
            if codes.shape[-1] < args.min_frames:
                skipped.append(dict(_book_entry(book, book.sequence_id), frames=int(codes.shape[-1]),
                                    reason=f"shorter than --min-frames {args.min_frames}: {codes.shape[-1]} frames"))
            else:
                kept.append((book, codes))
        for sid in list(finished):
            n = finished[sid]["audio_ce"].shape[0]
            if n < args.min_frames:
                book = next(b for b in job.books if b.sequence_id == sid)
                skipped.append(dict(_book_entry(book, sid), frames=n,
                                    reason=f"shorter than --min-frames {args.min_frames}: {n} frames"))
                del finished[sid]
        pending = kept
        if not pending and not finished and skipped and all("min-frames" in s["reason"] for s in skipped):
            longest = max(s["frames"] for s in skipped)
            raise DataError(f"every book is shorter than --min-frames {args.min_frames} frames "
                            f"(longest: {longest} frames = {longest / frame_rate:.1f} s) under {job.audio_dir}.")
    if not pending and not finished:
        reasons = "; ".join(f"{s['sequence_id']}: {s['reason']}" for s in skipped[:5])
        raise DataError(f"no book could be scored under {job.audio_dir} ({reasons}).")

    # 3. Scoring, batched by length so that a batch streams few frames past its shorter books.
    lm_gen = LMGen(lm_model, use_sampling=False)
    silence = None
    if args.user_stream == "silence":
        silence = silence_codes(mimi, SILENCE_FRAMES)[: lm_model.n_q - lm_model.dep_q]
    pending.sort(key=lambda bc: bc[1].shape[-1])
    total_frames = sum(min(c.shape[-1], args.max_frames or c.shape[-1]) for _, c in pending)
    scored_frames = 0
    score_start = time.perf_counter()
    with tqdm(total=total_frames, unit="frame", desc="scoring", disable=not progress or not pending,
              dynamic_ncols=True, smoothing=0.05) as bar:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start: start + args.batch_size]
            for result in score_sequences(
                    lm_gen, [c for _, c in batch], sequence_ids=[b.sequence_id for b, _ in batch],
                    user_stream=args.user_stream, text=args.text, silence=silence,
                    max_frames=args.max_frames, progress=bar, chunk=args.chunk,
                    first_codebook_weight=args.first_codebook_weight):
                report.write_sequence(out, result.sequence_id, result.arrays())
                finished[result.sequence_id] = result.arrays()
                scored_frames += result.num_frames
                tqdm.write(f"moshi-eval: {result.sequence_id}: {result.num_frames} frames, mean audio_ce "
                           f"{np.nanmean(result.audio_ce):.4f} -> {report.sequence_path(out, result.sequence_id)}",
                           file=sys.stderr)
    score_seconds = time.perf_counter() - score_start

    # 4. Aggregates and files, rebuilt from every finished book of this selection.
    order = [b.sequence_id for b in job.books if b.sequence_id in finished]
    sequences = {sid: finished[sid] for sid in order}
    metrics = {
        name: summarize([s[name] for s in sequences.values()], args.report_at, args.report_window,
                        args.bucket).to_dict()
        for name in ("audio_ce", "audio_ce_weighted")}
    K = next(iter(sequences.values()))["codebook_ce"].shape[0]
    metrics["codebook_ce"] = [
        summarize([s["codebook_ce"][k] for s in sequences.values()], args.report_at, args.report_window,
                  args.bucket).to_dict() for k in range(K)]
    books_meta = []
    for book in job.books:
        if book.sequence_id not in sequences:
            continue
        s = sequences[book.sequence_id]
        T = int(s["audio_ce"].shape[0])
        books_meta.append(dict(
            _book_entry(book, book.sequence_id), frames=T, minutes=T / frame_rate / 60,
            audio_ce_mean=float(np.nanmean(s["audio_ce"])),
            audio_ce_weighted_mean=float(np.nanmean(s["audio_ce_weighted"])),
            file=str(report.sequence_path(out, book.sequence_id).relative_to(out))))
    total_seconds = time.perf_counter() - start_time
    runtime = {
        "frames": scored_frames, "seconds": score_seconds,
        "frames_per_s": scored_frames / score_seconds if scored_frames else None,
        "frames_per_s_note": None if scored_frames else "nothing scored in this run (all books were finished)",
        "encode_seconds": encode_seconds, "total_seconds": total_seconds,
        "books_scored_this_run": sum(1 for b, _ in pending if b.sequence_id in finished),
        "books_resumed": len(done & set(sequences)),
        "code_cache": None if cache is None else {"dir": str(cache.root), "hits": cache.hits,
                                                  "misses": cache.misses},
        "device": str(lm_model.device),
        "chunks": _chunk_summary(lm_gen),
    }
    results = {
        "command": _command(job.argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(_scoring_config(job), batch_size=args.batch_size, num_books=args.num_books,
                       min_frames=args.min_frames, report_at=list(args.report_at),
                       report_window=args.report_window, bucket=args.bucket, strict=args.strict),
        "versions": _versions(),
        "model": dict(ckpt.identity, n_q=lm_model.n_q, dep_q=lm_model.dep_q, card=lm_model.card,
                      text_card=lm_model.text_card, delays=list(lm_model.delays), context=lm_model.context,
                      context_minutes=None if lm_model.context is None else lm_model.context / frame_rate / 60,
                      text_padding_token_id=lm_model.text_padding_token_id),
        "codec": {"identity": codec_identity(mimi), "num_codebooks": mimi.num_codebooks,
                  "cardinality": mimi.cardinality, "sample_rate": mimi.sample_rate, "frame_rate": frame_rate},
        "num_books": len(books_meta),
        "books": books_meta,
        "skipped": skipped,
        "metrics": metrics,
        "runtime": runtime,
    }
    report.write_json_atomic(out / report.RESULTS_JSON, results)
    report.write_curve_csv(out / report.CURVE_CSV, sequences, frame_rate)
    report.plot_curve(out / report.CURVE_PNG, {sid: s["audio_ce"] for sid, s in sequences.items()},
                      frame_rate, lm_model.context,
                      title=f"audio CE of {len(sequences)} book(s), text={args.text}, user={args.user_stream}")
    rate = f"{scored_frames / score_seconds:.1f} frames/s" if scored_frames else "nothing left to score"
    print(f"moshi-eval: {len(sequences)} book(s), {scored_frames} frames scored in {score_seconds:.1f} s "
          f"({rate}); {len(skipped)} skipped; total {total_seconds:.1f} s; results in "
          f"{out / report.RESULTS_JSON}")
    return 0


def _chunk_summary(lm_gen: LMGen) -> dict:
    """What chunked scoring did in this run: passes per chunk and, for predicted text, the guesses."""
    stats = lm_gen.chunk_stats
    return {"chunked_calls": stats.calls, "frames": stats.frames, "passes": stats.passes,
            "passes_per_chunk": stats.passes_per_call, "text_guesses": stats.guesses,
            "text_guesses_accepted": stats.guesses_right, "text_guess_accepted_share": stats.guess_accuracy}


def _command(argv: list[str]) -> str:
    return "moshi-eval " + shlex.join(argv)


# Mimi's frame rate, to turn --min-frames into seconds before anything is encoded.
MIMI_FRAME_RATE = 12.5


def select_librilight_books(args: argparse.Namespace) -> list[Book]:
    """The first `--num-books` books (cut to `--max-chapters`) that can reach `--min-frames`.

    The length filter runs before counting the books and before encoding, on the durations of the file
    headers, so that `--num-books 50 --min-frames 24000` scores 50 long books without encoding the short
    ones. The exact frame count is checked again after encoding. A book whose header cannot be read is
    kept: its encoding reports it (skipped and listed, or the run fails with --strict).
    """
    books = select_books(discover_books(args.audio_dir), None, args.max_chapters)
    if args.min_frames is None:
        return books[:args.num_books]
    min_seconds = args.min_frames / MIMI_FRAME_RATE
    chosen: list[Book] = []
    longest = 0.
    for book in books:
        if args.num_books is not None and len(chosen) == args.num_books:
            break
        try:
            seconds = book_seconds(book)
        except AudioReadError:
            seconds = float("inf")
        longest = max(longest, seconds)
        if seconds >= min_seconds:
            chosen.append(book)
    if not chosen:
        raise DataError(f"every book is shorter than --min-frames {args.min_frames} frames = {min_seconds:.1f} s "
                        f"(longest: {longest:.1f} s) under {args.audio_dir}.")
    return chosen


def run_librilight(args: argparse.Namespace) -> int:
    books = select_librilight_books(args)
    resolved = resolve_checkpoint(args)
    job = EvalJob(argv=args.argv, out=args.out, audio_dir=args.audio_dir, books=books, load=resolved.load,
                  identity=resolved.identity, args=args)
    return run_eval(job)


def run_demo(args: argparse.Namespace) -> int:
    from . import demo
    audio_dir = demo.demo_audiobook(args.out / "demo_audio")
    books = select_books(discover_books(audio_dir), args.num_books, args.max_chapters)
    identity = {"demo": True, "seed": args.seed, "lm_kwargs": demo.DEMO_LM_KWARGS,
                "mimi_config": demo.DEMO_MIMI_CONFIG, "dtype": "float32"}

    def load() -> LoadedCheckpoint:
        return LoadedCheckpoint(demo.demo_lm(args.seed), demo.demo_mimi(args.seed), None, identity)

    job = EvalJob(argv=args.argv, out=args.out, audio_dir=audio_dir, books=books, load=load,
                  identity=identity, args=args)
    return run_eval(job)


def main(argv: tp.Sequence[str] | None = None) -> int:
    """Entry point of the `moshi-eval` console script. Returns (and, as a script, exits with) the code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (DataError, CheckpointError, report.ReportError, UsageError, NonFiniteLossError) as exc:
        print(f"moshi-eval: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nmoshi-eval: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
