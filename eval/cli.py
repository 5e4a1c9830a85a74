"""`moshi-eval`: long-context audio cross-entropy of a streaming Moshi model.

Subcommands:
- `librilight --audio-dir DIR --out DIR [checkpoint options]`: every book of a LibriLight-layout folder
  (`<root>/<speaker>/<book>/<chapter>.flac`) is one sequence; its Mimi codes are teacher forced in the
  model's audio stream and the per-frame cross-entropy of the 8 codebooks is saved, then aggregated.
- `demo --out DIR`: the same job on the embedded defaults (a small seeded model and codec, a short shipped
  audiobook): no download, well under a minute on a CPU.
- `check-streaming`: streaming logits against `LMModel.forward` (moshi_eval.check).
- `compare RUN_DIR RUN_DIR ... --out DIR`: paired comparison of finished runs (moshi_eval.compare).

No finished work is lost: each book's results are written as soon as it is scored; rerunning the same
command with the same `--out` skips finished books, and Ctrl-C / SIGTERM prints the command to resume.
"""
import argparse
import os
from pathlib import Path
import sys
import typing as tp

from . import check as check_module
from . import compare as compare_module
from .bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from .checkpoint import LoadedCheckpoint, add_checkpoint_arguments, resolve_checkpoint
from .distributed import from_environment, rank_device
from .data import AudioReadError, Book, DataError, book_seconds, discover_books, select_books
from .errors import EXIT_INTERRUPTED, MoshiEvalError, UsageError
from .hashing import FileHasher
from .loss import DEFAULT_FIRST_CODEBOOK_WEIGHT
from .metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT
from .run import MIMI_FRAME_RATE, EvalJob, run_eval
from .scoring import DEFAULT_CHUNK, TEXT_MODES, USER_STREAMS


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moshi_eval" / "codes"


def _int_at_least(minimum: int, what: str) -> tp.Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return n
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


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
                        help="text stream: the model's own argmax (default), forced to the padding token (pad), "
                             "or no text input (zero, -1)")
    parser.add_argument("--first-codebook-weight", type=_positive_float, default=DEFAULT_FIRST_CODEBOOK_WEIGHT,
                        help="weight of codebook 0 in audio_ce_weighted (default 100, as moshi-finetune's "
                             "example config; its loss function defaults to 1)")
    parser.add_argument("--report-at", type=_frame_list, default=report_at,
                        help="frames at which results.json reports the curve (default "
                             f"{','.join(map(str, report_at))})")
    parser.add_argument("--report-window", type=_positive_int, default=window,
                        help=f"half width in frames of the window mean around each report frame (default {window})")
    parser.add_argument("--bucket", type=_positive_int, default=bucket,
                        help=f"frames per bucket of the bucket means (default {bucket})")
    _add_report_arguments(parser)
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


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", type=_non_negative_int, default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples of the books for the intervals (default {DEFAULT_RESAMPLES}; "
                             "0: no interval)")
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap resamples")
    parser.add_argument("--log-x", action="store_true", help="logarithmic time axis in the plots")


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

    compare = subparsers.add_parser(
        "compare", help="paired comparison of finished runs on the books they share",
        description=compare_module.__doc__.split("\n\n")[1].replace("\n", " "))
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="--out folders of finished runs")
    compare.add_argument("--out", required=True, type=Path, help="folder for compare.json, .md, .csv, .png")
    compare.add_argument("--names", default=None, help="comma-separated names of the runs (default: folder names)")
    compare.add_argument("--reference", default=None, help="run the others are compared to (default: the first)")
    compare.add_argument("--report-at", type=_frame_list, default=DEFAULT_REPORT_AT,
                         help="report positions in frames (default " + ",".join(map(str, DEFAULT_REPORT_AT)) + ")")
    compare.add_argument("--report-window", type=_positive_int, default=DEFAULT_HALF_WINDOW,
                         help=f"half width of the window means (default {DEFAULT_HALF_WINDOW})")
    compare.add_argument("--bucket", type=_positive_int, default=DEFAULT_BUCKET,
                         help=f"frames per bucket in the plot (default {DEFAULT_BUCKET})")
    _add_report_arguments(compare)
    compare.set_defaults(func=run_compare)

    check_module.add_parser(subparsers)
    return parser


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


def _hasher(args: argparse.Namespace) -> FileHasher:
    """Content hashes of weights and chapters, cached beside the code cache (none with --no-cache)."""
    return FileHasher(None if args.no_cache else args.cache_dir / "hashes")


def run_librilight(args: argparse.Namespace) -> int:
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.device = rank_device(args.device, from_environment())   # cuda:LOCAL_RANK under torchrun
    hasher = _hasher(args)
    resolved = resolve_checkpoint(args, hasher)
    job = EvalJob(argv=args.argv, out=args.out, audio_dir=args.audio_dir,
                  select=lambda: select_librilight_books(args), load=resolved.load, identity=resolved.identity,
                  args=args, hasher=hasher)
    return run_eval(job)


def run_demo(args: argparse.Namespace) -> int:
    from . import demo
    args.cache_dir = args.cache_dir or default_cache_dir()
    audio_dir = args.out / "demo_audio" / "librilight_demo"   # where `demo_audiobook` puts it
    identity = {"demo": True, "seed": args.seed, "lm_kwargs": demo.DEMO_LM_KWARGS,
                "mimi_config": demo.DEMO_MIMI_CONFIG, "dtype": "float32"}

    def select() -> list[Book]:
        # Written once --out is locked and its configuration checked: never into a foreign --out.
        demo.demo_audiobook(audio_dir.parent)
        return select_books(discover_books(audio_dir), args.num_books, args.max_chapters)

    def load() -> LoadedCheckpoint:
        return LoadedCheckpoint(demo.demo_lm(args.seed), demo.demo_mimi(args.seed), None, identity)

    job = EvalJob(argv=args.argv, out=args.out, audio_dir=audio_dir, select=select, load=load,
                  identity=identity, args=args, hasher=_hasher(args))
    return run_eval(job)


def run_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise UsageError(f"compare needs at least 2 run folders, got {len(args.runs)}.")
    names = args.names.split(",") if args.names else [p.resolve().name for p in args.runs]
    if len(names) != len(args.runs) or len(set(names)) != len(names):
        raise UsageError(f"--names: expected {len(args.runs)} distinct names, got {names}.")
    if args.bootstrap < 1:
        raise UsageError("compare needs --bootstrap >= 1: its intervals are what it reports.")
    runs = [compare_module.load_run(path, name) for path, name in zip(args.runs, names)]
    result = compare_module.compare(runs, args.reference or names[0], args.report_at, args.report_window,
                                    args.bucket, args.bootstrap, args.bootstrap_seed)
    paths = compare_module.write(args.out, runs, result, args.log_x)
    left_out = {name: len(ids) for name, ids in result["left_out"].items() if ids}
    print(f"moshi-eval compare: {len(result['shared_books'])} shared books"
          + (f" (left out, not in every run: {left_out})" if left_out else "") + "\n")
    print(compare_module.markdown_table(result))
    print("written: " + ", ".join(map(str, paths)))
    return 0


def main(argv: tp.Sequence[str] | None = None) -> int:
    """Entry point of the `moshi-eval` console script. Returns (and, as a script, exits with) the code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except MoshiEvalError as exc:   # a message, no traceback; anything else is a bug and keeps its traceback
        print(f"moshi-eval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nmoshi-eval: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
