"""`moshi-eval`: long-context audio cross-entropy of a streaming Moshi model.

Subcommands:
- `librilight --audio-dir DIR --out DIR [checkpoint options]`: every book of a LibriLight-layout folder
  (`<root>/<speaker>/<book>/<chapter>.flac`) is one sequence; its Mimi codes are teacher forced in the
  model's audio stream and the per-frame cross-entropy of the 8 codebooks is saved, then aggregated.
- `demo --out DIR`: the same job on the embedded defaults (a small seeded model and codec, a short shipped
  audiobook): no download, well under a minute on a CPU.
- `check-streaming`: streaming logits against `LMModel.forward` (moshi_eval.check).
- `compare RUN_DIR RUN_DIR ... --out DIR`: paired comparison of finished runs (moshi_eval.compare).
- `likelihood --task {swuggy,sblimp,sstorycloze,tstorycloze,salmon} --data DIR --out DIR`: zero-shot
  likelihood benchmarks (moshi_eval.likelihood).

No finished work is lost: each book's results are written as soon as it is scored; rerunning the same
command with the same `--out` skips finished books, and Ctrl-C / SIGTERM prints the command to resume.
"""
import argparse
import os
from pathlib import Path
import signal
import sys
import threading
import typing as tp

from . import check as check_module
from . import loggers
from . import compare as compare_module
from . import distributed
from .bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from .checkpoint import LoadedCheckpoint, add_checkpoint_arguments, resolve_checkpoint
from .config import LibriLightConfig, ModelSource, RunConfig, from_values
from .distributed import from_environment, rank_device
from .data import AudioReadError, Book, DataError, book_seconds, discover_books, select_books
from .errors import EXIT_INTERRUPTED, MoshiEvalError, UsageError
from .hashing import FileHasher
from .loss import DEFAULT_FIRST_CODEBOOK_WEIGHT
from .metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT
from .run import MIMI_FRAME_RATE, EvalJob, _raise_interrupt, run_eval
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
    parser.add_argument("--no-verify-streaming", dest="verify_streaming", action="store_false",
                        help="skip the check made first on a model with streaming layers this project does not "
                             "know (their chunked path against one frame per call, a few seconds)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"Mimi code cache (default {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the code cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=_positive_int, default=threads,
                        help="torch CPU threads (torch.set_num_threads; default: "
                             f"{threads or 'torch default'}). Small models on a CPU run fastest on 1 thread")


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb", default=None, metavar="PROJECT[/RUN]",
                        help="log the metrics (librilight: and the curve) to this Weights & Biases project "
                             "(and run name) at the end (needs: pip install 'moshi-patch[wandb]'; "
                             "WANDB_MODE=offline works)")
    parser.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                        help="log the metrics (librilight: and the curve plot) to a TensorBoard event file in DIR at "
                             "the end (needs: pip install 'moshi-patch[tensorboard]')")
    parser.add_argument("--log-step", type=_non_negative_int, default=None,
                        help="step of the logged values (default: NNNNNN of a --checkpoint-dir checkpoint_NNNNNN, "
                             "else 0)")


def _eval_and_log(job: EvalJob, args: argparse.Namespace) -> int:
    """`run_eval`, then (rank 0, a finished run) the results to --wandb / --tensorboard. A missing logging
    package stops the command before anything is scored."""
    _check_loggers(args)
    code = run_eval(job)
    if code == 0:
        _log_run(job.out, args)
    return code


def _check_loggers(args: argparse.Namespace) -> None:
    """A missing logging package or a bad --wandb value stops the command before anything is scored."""
    if args.wandb is not None:
        loggers.require("wandb", "--wandb")
        loggers.parse_wandb_target(args.wandb)
    if args.tensorboard is not None:
        loggers.require("tensorboard", "--tensorboard")


def _log_run(out: Path, args: argparse.Namespace) -> None:
    """A finished run's results to --wandb / --tensorboard, from rank 0 (which wrote them)."""
    logging = args.wandb is not None or args.tensorboard is not None
    if logging and os.environ.get("RANK", "0") == "0":
        step = args.log_step if args.log_step is not None else loggers.checkpoint_step(
            getattr(args, "checkpoint_dir", None))
        loggers.log_run(out, args.wandb, args.tensorboard, step)


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
    _add_logging_arguments(libri)
    libri.set_defaults(func=run_librilight)

    demo = subparsers.add_parser("demo", help="the librilight job on embedded defaults (no download)",
                                 description="Runs the librilight eval on a small seeded Moshi-shaped model, "
                                             "a small seeded Mimi and a short shipped audiobook (random "
                                             "weights: the numbers show the plumbing, not a trained model).")
    # The demo model is tiny: intra-op threads only add synchronization (7x slower on a busy 2-core box).
    _add_scoring_arguments(demo, (125, 250, 500), 25, 100, batch_size=2, threads=1)
    _add_logging_arguments(demo)
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo model (and of its codec by default)")
    demo.add_argument("--codec-seed", type=int, default=None,
                      help="seed of the demo codec (default: --seed); runs of one codec seed can be compared")
    demo.set_defaults(func=run_demo)

    compare = subparsers.add_parser(
        "compare", help="paired comparison of finished runs on the books they share",
        description=compare_module.__doc__.split("\n\n")[1].replace("\n", " "))
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="--out folders of finished runs")
    compare.add_argument("--out", required=True, type=Path, help="folder for compare.json, .md, .csv, .png")
    compare.add_argument("--names", default=None,
                         help="comma-separated names of the runs (default: folder names, with as many parent "
                              "folders as make them distinct)")
    compare.add_argument("--reference", default=None, help="run the others are compared to (default: the first)")
    compare.add_argument("--report-at", type=_frame_list, default=None,
                         help="report positions in frames (default: the reference run's own --report-at)")
    compare.add_argument("--report-window", type=_positive_int, default=None,
                         help="half width of the window means (default: the reference run's own --report-window)")
    compare.add_argument("--bucket", type=_positive_int, default=DEFAULT_BUCKET,
                         help=f"frames per bucket in the plot (default {DEFAULT_BUCKET})")
    _add_report_arguments(compare)
    compare.set_defaults(func=run_compare)

    _add_likelihood_parser(subparsers)
    check_module.add_parser(subparsers)
    subparsers.choices["check-streaming"].set_defaults(func=run_check_streaming)
    return parser


def _add_likelihood_parser(subparsers: tp.Any) -> None:
    from .benchmark_data import SALMON_PARTS, SPLITS, TASKS
    p = subparsers.add_parser(
        "likelihood", help="sWUGGY, sBLIMP, spoken/topic StoryCloze, SALMon from the streaming state",
        description="Zero-shot likelihood benchmarks: each audio file's log-likelihood under the streaming model "
                    "(its codes teacher forced in the model's audio stream), pairs compared, accuracies "
                    "aggregated as the official scorers do.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, type=Path,
                   help="swuggy/sblimp: the ZeroSpeech 2021 root (lexical/, syntactic/); sstorycloze/tstorycloze: "
                        "the folder of <n>_<uuid>_correct.wav / _incorrect.wav; salmon: the SALMon root")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--split", choices=SPLITS, default="dev", help="swuggy/sblimp split (test: no gold, "
                                                                  "submission only)")
    p.add_argument("--parts", default=None,
                   help=f"salmon: comma-separated parts (default all: {','.join(SALMON_PARTS)})")
    add_checkpoint_arguments(p)
    p.add_argument("--text", choices=TEXT_MODES, default="predicted",
                   help="text stream: the model's argmax (default), the padding token, or zero (-1, no input)")
    p.add_argument("--user-stream", choices=USER_STREAMS, default="silence",
                   help="user audio stream: Mimi codes of digital silence (default), or zero (-1, no input)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="files scored together, batched by length")
    p.add_argument("--chunk", type=_positive_int, default=DEFAULT_CHUNK, help="frames per streaming call")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"Mimi code cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the code cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--bootstrap", type=_non_negative_int, default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples of the averaging units (ids, stories, samples); 0: no interval")
    p.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap resamples")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N pairs only: a smoke run")
    p.add_argument("--strict", action="store_true", help="fail on any skipped file or pair instead of listing it")
    _add_logging_arguments(p)
    p.set_defaults(func=run_likelihood)


def run_likelihood(args: argparse.Namespace) -> int:
    import torch
    from .likelihood import LikelihoodConfig, run_likelihood as likelihood_run
    from .run import command_line
    run = run_config(args)
    source = from_values(ModelSource, args)
    source.device = rank_device(source.device, from_environment())   # cuda:LOCAL_RANK under torchrun
    config = LikelihoodConfig(
        task=args.task, data=args.data, split=args.split,
        parts=tuple(x for x in args.parts.split(",") if x) if args.parts else None, text=args.text,
        user_stream=args.user_stream, batch_size=args.batch_size, chunk=args.chunk, limit=args.limit,
        strict=args.strict, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
        progress=not args.no_progress, cache_dir=None if run.no_cache else run.cache_dir)
    _check_loggers(args)
    hasher = _hasher(run)
    resolved = resolve_checkpoint(source, hasher)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:     # SIGTERM raises KeyboardInterrupt too: `main` installs the handler for every command
        likelihood_run(config, args.out, resolved.load, resolved.identity, command_line(args.argv), hasher)
        _log_run(args.out, args)
    except KeyboardInterrupt:
        print(f"\nmoshi-eval: interrupted. Finished batches are kept in {args.out / 'items'}. Resume with the same "
              f"command:\n  {command_line(args.argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)
    return 0


def select_librilight_books(args: LibriLightConfig) -> list[Book]:
    """The first `--num-books` books (cut to `--max-chapters`) that can reach `--min-frames`.

    The length filter runs before counting the books and before encoding, on the durations of the file
    headers, so that `--num-books 50 --min-frames 24000` scores 50 long books without encoding the short
    ones. The exact frame count is checked again after encoding. A book whose header cannot be read is
    kept: its encoding reports it (skipped and listed, or the run fails with --strict).
    """
    books = select_books(discover_books(tp.cast(Path, args.audio_dir)), None, args.max_chapters)
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


def _hasher(args: RunConfig) -> FileHasher:
    """Content hashes of weights and chapters, cached beside the code cache (none with --no-cache)."""
    return FileHasher(None if args.no_cache else tp.cast(Path, args.cache_dir) / "hashes")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The `RunConfig` of parsed arguments (the default code cache filled in)."""
    run = from_values(RunConfig, args)
    run.cache_dir = run.cache_dir or default_cache_dir()
    return run


def run_librilight(args: argparse.Namespace) -> int:
    config, run = from_values(LibriLightConfig, args), run_config(args)
    source = from_values(ModelSource, args)
    source.device = rank_device(source.device, from_environment())   # cuda:LOCAL_RANK under torchrun
    hasher = _hasher(run)
    resolved = resolve_checkpoint(source, hasher)
    job = EvalJob(argv=run.argv, out=run.out, audio_dir=tp.cast(Path, config.audio_dir),
                  select=lambda: select_librilight_books(config), load=resolved.load, identity=resolved.identity,
                  config=config, run=run, hasher=hasher, device=source.device)
    return _eval_and_log(job, args)


def run_demo(args: argparse.Namespace) -> int:
    from . import demo
    run = run_config(args)
    audio_dir = run.out / "demo_audio" / "librilight_demo"   # where `demo_audiobook` puts it
    config = from_values(LibriLightConfig, dict(vars(args), audio_dir=audio_dir))
    identity = {"demo": True, "seed": args.seed, "lm_kwargs": demo.DEMO_LM_KWARGS,
                "mimi_config": demo.DEMO_MIMI_CONFIG, "dtype": "float32"}
    codec_seed = args.seed if args.codec_seed is None else args.codec_seed
    if codec_seed != args.seed:      # Only then: the configuration of earlier demo runs stays the same.
        identity["codec_seed"] = codec_seed

    def select() -> list[Book]:
        # Written once --out is locked and its configuration checked: never into a foreign --out.
        demo.demo_audiobook(audio_dir.parent)
        return select_books(discover_books(audio_dir), config.num_books, config.max_chapters)

    def load() -> LoadedCheckpoint:
        return LoadedCheckpoint(demo.demo_lm(args.seed), demo.demo_mimi(codec_seed), None, identity)

    job = EvalJob(argv=run.argv, out=run.out, audio_dir=audio_dir, select=select, load=load,
                  identity=identity, config=config, run=run, hasher=_hasher(run))
    code = _eval_and_log(job, args)
    return code if code != 0 else _demo_likelihood(args, run, codec_seed)


def run_check_streaming(args: argparse.Namespace) -> int:
    return check_module.run_check_streaming(from_values(check_module.CheckStreamingConfig, args))


def run_names(paths: list[Path]) -> list[str]:
    """Distinct names for run folders: the folder name, with as many parent folders as needed to tell
    runs apart (`a/run` and `b/run`); the same folder given twice keeps one name plus its position."""
    resolved = [p.resolve() for p in paths]
    distinct = sorted(set(resolved))
    depth = 1
    while len({"/".join(p.parts[-depth:]) for p in distinct}) < len(distinct):
        depth += 1
    names = ["/".join(p.parts[-depth:]).lstrip("/") or "/" for p in resolved]
    if len(set(names)) != len(names):       # The same folder twice (a run against itself).
        names = [f"{name}#{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]
    return names


def _demo_likelihood(args: argparse.Namespace, run: RunConfig, codec_seed: int) -> int:
    """The demo's likelihood part: generated minimal pairs (StoryCloze layout) scored by the demo model."""
    from . import demo
    from .likelihood import LikelihoodConfig, evaluate_likelihood
    data = demo.demo_minimal_pairs(run.out / "demo_audio")
    config = LikelihoodConfig("sstorycloze", data, text="pad", user_stream=args.user_stream, batch_size=3,
                              chunk=args.chunk, bootstrap=min(args.bootstrap, 1000), progress=False,
                              cache_dir=None if run.no_cache else run.cache_dir)
    result = evaluate_likelihood(demo.demo_lm(args.seed), demo.demo_mimi(codec_seed), config)
    result.write(run.out / "likelihood", {"demo": True, "seed": args.seed})
    acc = result.accuracies["sum"]["overall"]
    print(f"moshi-eval demo likelihood: {len(result.data.pairs)} generated minimal pairs (right vs reversed "
          f"ending), accuracy {acc['accuracy']:.3f} (random weights: plumbing, not a trained model); "
          f"results in {run.out / 'likelihood'}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise UsageError(f"compare needs at least 2 run folders, got {len(args.runs)}.")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory: give a folder for compare.json, .md, "
                         ".csv and .png.")
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(args.runs) or len(set(names)) != len(names) or not all(names):
            raise UsageError(f"--names: expected {len(args.runs)} distinct non-empty names, one per run folder, "
                             f"got {names}.")
    else:
        names = run_names(args.runs)
    if args.bootstrap < 1:
        raise UsageError("compare needs --bootstrap >= 1: its intervals are what it reports.")
    from . import likelihood_compare
    if all(likelihood_compare.is_likelihood_run(p) for p in args.runs):      # `moshi-eval likelihood` runs
        lik = likelihood_compare.run_compare(args.runs, names, args.out, args.bootstrap, args.bootstrap_seed)
        print(likelihood_compare.markdown(lik) + f"\nwritten: {args.out / 'compare.json'}, {args.out / 'compare.md'}")
        return 0
    runs = [compare_module.load_run(path, name) for path, name in zip(args.runs, names)]
    own_at, own_window = compare_module.default_report_positions(runs)
    report_at = args.report_at or own_at or DEFAULT_REPORT_AT
    window = args.report_window or own_window or DEFAULT_HALF_WINDOW
    result = compare_module.compare(runs, args.reference or names[0], report_at, window,
                                    args.bucket, args.bootstrap, args.bootstrap_seed)
    paths = compare_module.write(args.out, runs, result, args.log_x)
    left_out = {name: len(ids) for name, ids in result["left_out"].items() if ids}
    print(f"moshi-eval compare: {len(result['shared_books'])} shared books"
          + (f" (left out, not in every run: {left_out})" if left_out else "") + "\n")
    print(compare_module.markdown_table(result))
    for note in result["notes"] + ([result["few_books"]] if result["few_books"] else []):
        print(f"moshi-eval compare: note: {note}", file=sys.stderr)
    print("written: " + ", ".join(map(str, paths)))
    return 0


def main(argv: tp.Sequence[str] | None = None) -> int:
    """Entry point of the `moshi-eval` console script. Returns (and, as a script, exits with) the code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    # SIGTERM stops the run like Ctrl-C from the first instruction on, before any file is touched (hashing
    # weights, reading chapters) or a torchrun rendezvous is joined; run_eval turns it into a resume hint.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args)
    except MoshiEvalError as exc:   # a message, no traceback; anything else is a bug and keeps its traceback
        print(f"moshi-eval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nmoshi-eval: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()     # a process group joined before an error must still be torn down
