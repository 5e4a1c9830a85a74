"""`moshi-eval`: the numbers speech-LM papers report, from the streaming state of a Moshi model.

Subcommands:
- `librilight --audio-dir DIR --out DIR [checkpoint options]`: every book of a LibriLight-layout folder
  (`<root>/<speaker>/<book>/<chapter>.flac`) is one sequence; its Mimi codes are teacher forced in the
  model's audio stream and the per-frame cross-entropy of the 8 codebooks is saved, then aggregated.
- `demo --out DIR`: the same job on the embedded defaults (a small seeded model and codec, a short shipped
  audiobook): no download, well under a minute on a CPU.
- `check-streaming`: streaming logits against `LMModel.forward` (moshi_eval.scoring.streaming).
- `compare RUN_DIR RUN_DIR ... --out DIR`: paired comparison of finished runs of one task (moshi_eval.compare).
- `likelihood --task {swuggy,sblimp,sstorycloze,tstorycloze,salmon} --data DIR --out DIR`: zero-shot
  likelihood benchmarks (moshi_eval.tasks.likelihood).
- `dialogues --jsonl eval.jsonl --out DIR`: text and audio cross-entropy on moshi-finetune data
  (moshi_eval.tasks.dialogue).
- `zr2021-submission RUN_DIR ... --out DIR`: a ZeroSpeech 2021 submission folder from likelihood runs
  (moshi_eval.zr2021).

No finished work is lost: each unit (book, batch) is written as soon as it is scored; rerunning the same
command with the same `--out` skips finished units, and Ctrl-C / SIGTERM prints the command to resume.
"""
import argparse
from dataclasses import replace
import difflib
from pathlib import Path
import re
import signal
import sys
import threading
import typing as tp

from .. import distributed, loggers
from ..checkpoint import LoadedCheckpoint, resolve_checkpoint
from ..config import (DEFAULT_DURATION, TEXT_LENGTHS, CheckStreamingConfig, ConfigError, DialogueConfig,
                      LibriLightConfig, LikelihoodConfig, ModelSource, RunConfig, default_cache_dir, frame_list,
                      from_values, non_negative_int, positive_float, positive_int)
from ..distributed import from_environment, rank_device
from ..errors import EXIT_INTERRUPTED, MoshiEvalError, UsageError
from ..files.hashing import FileHasher
from ..scoring.loss import DEFAULT_FIRST_CODEBOOK_WEIGHT
from ..scoring.sequences import DEFAULT_CHUNK, TEXT_MODES, USER_STREAMS
from ..stats.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from ..stats.metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT
from ..tasks.librilight import LibriLightTask
from ..tasks.dialogue import DialogueTask
from ..tasks.likelihood import LikelihoodTask
from ..tasks.runner import TaskRun, raise_interrupt, run_task
from . import check_streaming as check_module
from . import compare as compare_command
from . import zr2021 as zr2021_command
from .checkpoint_arguments import add_checkpoint_arguments


T = tp.TypeVar("T")


def _argument_type(parse: tp.Callable[[str], T], validate: tp.Callable[[str, T], tp.Any],
                   expected: str) -> tp.Callable[[str], T]:
    """An argparse type: the text parsed by `parse`, then checked by the configuration's own validator (one
    owner per rule: `moshi_eval.config`), so that a flag refuses what its configuration field refuses."""
    def convert(text: str) -> T:
        try:
            value = parse(text)
            validate("value", value)
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return value
    return convert


def _frames(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


_positive_int = _argument_type(int, positive_int, "a positive integer")
_non_negative_int = _argument_type(int, non_negative_int, "an integer >= 0")
_positive_float = _argument_type(float, positive_float, "a finite positive number")
_frame_list = _argument_type(_frames, frame_list, "comma-separated non-negative frame counts like 8000,16000")


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
    _add_run_arguments(parser, threads)


def _add_run_arguments(parser: argparse.ArgumentParser, threads: int | None = None) -> None:
    """The flags of how a scoring command runs, the same for every task (`RunConfig`, `verify_streaming`)."""
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


def _check_loggers(args: argparse.Namespace) -> None:
    """Loggers that cannot log stop the command before anything is scored (`loggers.check_targets`)."""
    loggers.check_targets(args.wandb, args.tensorboard)


def _logger(args: argparse.Namespace) -> tp.Callable[[tp.Any], None] | None:
    """What the runner does with a finished run's result on rank 0: log it to --wandb / --tensorboard."""
    if args.wandb is None and args.tensorboard is None:
        return None
    step = args.log_step if args.log_step is not None else \
        loggers.checkpoint_step(getattr(args, "checkpoint_dir", None))
    return lambda result: loggers.log_run(args.out, args.wandb, args.tensorboard, step)


def _add_report_arguments(parser: argparse.ArgumentParser, units: str = "the books") -> None:
    parser.add_argument("--bootstrap", type=_non_negative_int, default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples of {units} for the intervals (default {DEFAULT_RESAMPLES}; "
                             "0: no interval)")
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap resamples")
    parser.add_argument("--log-x", action="store_true", help="logarithmic time axis in the plots")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest name: a mistyped subcommand or choice (`invalid
    choice: 'likelihod'`), and, through `parse`, a mistyped flag (`--chunks`), in the subcommand's own usage."""

    def error(self, message: str) -> tp.NoReturn:
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if found:
            # Quoted choices up to Python 3.12.7, bare ones after (CPython gh-117766).
            choices = [c.strip().strip("'") for c in found.group(2).split(", ")]
            close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean '{close[0]}'?"
        super().error(message)

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """`parse_args`, but an unknown flag is reported by its subcommand with the closest flag it has."""
        args, unknown = self.parse_known_args(argv)
        if unknown:
            sub = getattr(args, "subparser", self)
            flags = [flag for action in sub._actions for flag in action.option_strings]
            said = []
            for token in unknown:
                close = difflib.get_close_matches(token.split("=")[0], flags, n=1, cutoff=0.6) \
                    if token.startswith("--") else []
                said.append(f"{token} (did you mean {close[0]}?)" if close else token)
            sub.error(f"unrecognized arguments: {' '.join(said)}")
        return args


def build_parser() -> Parser:
    parser = Parser(
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
        "compare", help="paired comparison of finished runs of one task (LibriLight books, likelihood pairs)",
        description=compare_command.DESCRIPTION)
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="--out folders of finished runs")
    compare.add_argument("--out", required=True, type=Path, help="folder for compare.json, .md, .csv, .png")
    compare.add_argument("--names", default=None,
                         help="comma-separated names of the runs (default: folder names, with as many parent "
                              "folders as make them distinct)")
    compare.add_argument("--reference", default=None, help="run the others are compared to (default: the first)")
    compare.add_argument("--report-at", type=_frame_list, default=None,
                         help="LibriLight: report positions in frames (default: the reference run's own --report-at)")
    compare.add_argument("--report-window", type=_positive_int, default=None,
                         help="LibriLight: half width of the window means (default: the reference run's own "
                              "--report-window)")
    compare.add_argument("--bucket", type=_positive_int, default=DEFAULT_BUCKET,
                         help=f"LibriLight: frames per bucket in the plot (default {DEFAULT_BUCKET})")
    _add_report_arguments(compare, "the books (LibriLight) or the averaging units (likelihood: ids, stories)")
    compare.set_defaults(func=run_compare)

    _add_likelihood_parser(subparsers)
    _add_dialogues_parser(subparsers)
    check_module.add_parser(subparsers)
    subparsers.choices["check-streaming"].set_defaults(func=run_check_streaming)
    zr2021_command.add_parser(subparsers)
    for sub in subparsers.choices.values():
        sub.set_defaults(subparser=sub)      # whose usage and flags an unknown flag is reported with
    return parser


def _add_likelihood_parser(subparsers: tp.Any) -> None:
    from ..data.benchmarks import SALMON_PARTS, SPLITS, TASKS
    p = subparsers.add_parser(
        "likelihood", help="sWUGGY, sBLIMP, spoken/topic StoryCloze, SALMon from the streaming state",
        description="Zero-shot likelihood benchmarks: each audio file's log-likelihood under the streaming model "
                    "(its codes teacher forced in the model's audio stream), pairs compared, accuracies "
                    "aggregated as the official scorers do.")
    p.add_argument("--task", choices=TASKS, default=None, help="the benchmark (required unless --demo)")
    p.add_argument("--data", type=Path, default=None,
                   help="swuggy/sblimp: the ZeroSpeech 2021 root (lexical/, syntactic/); sstorycloze/tstorycloze: "
                        "the folder of <n>_<uuid>_correct.wav / _incorrect.wav; salmon: the SALMon root "
                        "(required unless --demo)")
    p.add_argument("--demo", action="store_true",
                   help="score generated minimal pairs (StoryCloze layout, written in OUT/demo_audio) with the "
                        "small seeded demo model and codec: no download, no checkpoint flag")
    p.add_argument("--seed", type=int, default=None, help="--demo: seed of the demo model and codec (default 0)")
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
    p.add_argument("--bootstrap", type=_non_negative_int, default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples of the averaging units (ids, stories, samples); 0: no interval")
    p.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap resamples")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N pairs only: a smoke run")
    p.add_argument("--strict", action="store_true", help="fail on any skipped file or pair instead of listing it")
    _add_run_arguments(p)
    _add_logging_arguments(p)
    p.set_defaults(func=run_likelihood)


def _add_dialogues_parser(subparsers: tp.Any) -> None:
    p = subparsers.add_parser(
        "dialogues", help="text and audio cross-entropy on moshi-finetune dialogue data, from the streaming state",
        description="moshi-finetune's loss (text and audio cross-entropy, plain and weighted) of a streaming Moshi "
                    "model on a moshi-finetune jsonl (stereo audio: left the model, right the user; word alignments "
                    "beside each file), at LMModel.forward's positions, token-weighted over the whole set.")
    p.add_argument("--jsonl", required=True, type=Path, help="moshi-finetune manifest: {\"path\", \"duration\"} lines")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; reused to resume)")
    add_checkpoint_arguments(p)
    p.add_argument("--duration", type=_positive_float, default=DEFAULT_DURATION,
                   help="window seconds (moshi-finetune's duration_sec)")
    p.add_argument("--whole-files", action="store_true", help="one item per file instead of windows")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="consecutive windows per batch")
    p.add_argument("--text-padding-weight", type=_positive_float, default=1.0,
                   help="weight of padding / end-of-padding text targets in text_ce_weighted (moshi-finetune: 0.5)")
    p.add_argument("--first-codebook-weight", type=_positive_float, default=1.0,
                   help="weight of audio codebook 0 in audio_ce_weighted (moshi-finetune example config: 100)")
    p.add_argument("--chunk", type=_positive_int, default=DEFAULT_CHUNK, help="frames per streaming call")
    p.add_argument("--text-length", choices=TEXT_LENGTHS, default="finetune",
                   help="finetune: moshi-finetune's text length quirk on partial windows; audio: text over the audio")
    p.add_argument("--drop-last", action="store_true", help="drop a trailing batch smaller than --batch-size")
    p.add_argument("--max-batches", type=_positive_int, default=None, help="first N batches only (moshi-finetune: 40)")
    p.add_argument("--report-at", type=_frame_list, default=(), help="frames of dialogue/audio_ce@F")
    _add_run_arguments(p)
    _add_logging_arguments(p)
    p.set_defaults(func=run_dialogues)


def run_dialogues(args: argparse.Namespace) -> int:
    run = run_config(args)
    config = DialogueConfig(
        jsonl=args.jsonl, duration=None if args.whole_files else args.duration, batch_size=args.batch_size,
        text_padding_weight=args.text_padding_weight, first_codebook_weight=args.first_codebook_weight,
        chunk=args.chunk, text_length=args.text_length, drop_last=args.drop_last, max_batches=args.max_batches,
        report_at=args.report_at, verify_streaming=args.verify_streaming, threads=args.threads)
    source, hasher, resolved = _checkpoint(args, run)
    task = DialogueTask(config, resolved.info.tokenizer)
    return run_task(_task_run(task, run, resolved.load, resolved.identity, source.device, hasher, args))


def run_likelihood(args: argparse.Namespace) -> int:
    run = run_config(args)
    if args.demo:
        return _run_likelihood_demo(args, run)
    if args.seed is not None:
        raise UsageError("likelihood: --seed seeds the demo model: it goes with --demo (a checkpoint has its weights).")
    missing = [flag for flag, value in (("--task", args.task), ("--data", args.data)) if value is None]
    if missing:
        raise UsageError(f"likelihood: {' and '.join(missing)} required (or --demo for generated pairs and the "
                         "demo model).")
    source, hasher, resolved = _checkpoint(args, run)
    return run_task(_task_run(LikelihoodTask(_likelihood_config(args, args.task, args.data)), run, resolved.load,
                              resolved.identity, source.device, hasher, args))


def _likelihood_config(args: argparse.Namespace, task: str, data: Path, **fixed: tp.Any) -> LikelihoodConfig:
    values = dict(vars(args), **fixed)
    return LikelihoodConfig(
        task=task, data=data, split=values["split"],
        parts=tuple(x for x in values["parts"].split(",") if x) if values["parts"] else None,
        text=values["text"], user_stream=values["user_stream"], batch_size=values["batch_size"],
        chunk=values["chunk"], limit=values["limit"], strict=values["strict"], bootstrap=values["bootstrap"],
        bootstrap_seed=values["bootstrap_seed"], verify_streaming=values["verify_streaming"],
        threads=values["threads"])


def _checkpoint(args: argparse.Namespace, run: RunConfig) -> tuple[ModelSource, FileHasher, tp.Any]:
    """What every scoring command does before its task: the checkpoint flags as a `ModelSource` (on
    `cuda:LOCAL_RANK` under torchrun), the loggers checked, the checkpoint located and identified (not loaded)."""
    source = from_values(ModelSource, args)
    source.device = rank_device(source.device, from_environment())
    _check_loggers(args)
    hasher = _hasher(run)
    return source, hasher, resolve_checkpoint(source, hasher)


def _task_run(task: tp.Any, run: RunConfig, load: tp.Callable[[], LoadedCheckpoint], identity: dict,
              device: str | None, hasher: FileHasher, args: argparse.Namespace) -> TaskRun:
    return TaskRun(task=task, out=run.out, load=load, identity=identity, device=device, argv=run.argv,
                   cache_dir=None if run.no_cache else run.cache_dir, hasher=hasher, threads=run.threads,
                   progress=not run.no_progress, after=_logger(args))


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
    source, hasher, resolved = _checkpoint(args, run)
    return run_task(_task_run(LibriLightTask(config), run, resolved.load, resolved.identity, source.device, hasher,
                              args))


def run_demo(args: argparse.Namespace) -> int:
    from .. import demo
    run = run_config(args)
    audio_dir = run.out / "demo_audio" / "librilight_demo"   # where `demo_audiobook` puts it
    config = from_values(LibriLightConfig, dict(vars(args), audio_dir=audio_dir))
    codec_seed = args.seed if args.codec_seed is None else args.codec_seed
    identity, load = _demo_model(args.seed, codec_seed)
    _check_loggers(args)
    # The book is written once --out is locked and its configuration checked: never into a foreign --out.
    task = LibriLightTask(config, prepare_data=lambda: demo.demo_audiobook(audio_dir.parent))
    code = run_task(_task_run(task, run, load, identity, "cpu", _hasher(run), args))
    if code != 0:
        return code
    # The likelihood part: generated minimal pairs (StoryCloze layout) scored by the same model, in OUT/likelihood.
    pairs = LikelihoodConfig("sstorycloze", run.out / "demo_audio" / "likelihood_demo", text="pad",
                             user_stream=args.user_stream, batch_size=3, chunk=args.chunk,
                             bootstrap=min(args.bootstrap, 1000), verify_streaming=args.verify_streaming,
                             threads=args.threads)
    code, result = _run_demo_pairs(args, replace(run, out=run.out / "likelihood"), pairs, args.seed, codec_seed,
                                   log=False)      # the loggers get the demo's LibriLight run, as before
    if result is not None:
        acc = result.accuracies["sum"]["overall"]
        print(f"moshi-eval demo likelihood: {len(result.data.pairs)} generated minimal pairs (right vs reversed "
              f"ending), accuracy {acc['accuracy']:.3f} (random weights: plumbing, not a trained model); "
              f"results in {run.out / 'likelihood'}")
    return code


def _demo_model(seed: int, codec_seed: int) -> tuple[dict, tp.Callable[[], LoadedCheckpoint]]:
    """The identity and the loader of the seeded demo model and codec."""
    from .. import demo
    identity = {"demo": True, "seed": seed, "lm_kwargs": demo.DEMO_LM_KWARGS,
                "mimi_config": demo.DEMO_MIMI_CONFIG, "dtype": "float32"}
    if codec_seed != seed:      # Only then: the configuration of earlier demo runs stays the same.
        identity["codec_seed"] = codec_seed

    def load() -> LoadedCheckpoint:
        return LoadedCheckpoint(demo.demo_lm(seed), demo.demo_mimi(codec_seed), None, identity)

    return identity, load


def _run_demo_pairs(args: argparse.Namespace, run: RunConfig, config: LikelihoodConfig, seed: int,
                    codec_seed: int, log: bool = True) -> tuple[int, tp.Any]:
    """A likelihood run of the demo model on generated minimal pairs, written into `config.data` once the output
    folder is locked and checked (`log`: to the loggers of the flags). Returns the exit code and the result (None
    unless 0)."""
    from .. import demo
    identity, load = _demo_model(seed, codec_seed)
    task = LikelihoodTask(config, prepare_data=lambda: demo.demo_minimal_pairs(Path(config.data).parent))
    task_run = _task_run(task, run, load, identity, "cpu", _hasher(run), args)
    return run_task(task_run if log else replace(task_run, after=None), keep_result=True)


def _run_likelihood_demo(args: argparse.Namespace, run: RunConfig) -> int:
    """`likelihood --demo`: the command's scoring flags on generated pairs and the demo model."""
    given = [flag for flag, value in (("--data", args.data), ("--hf-repo", args.hf_repo),
                                      ("--moshi-weight", args.moshi_weight), ("--mimi-weight", args.mimi_weight),
                                      ("--tokenizer", args.tokenizer), ("--config", args.config),
                                      ("--mimi-config", args.mimi_config), ("--lora-weight", args.lora_weight),
                                      ("--checkpoint-dir", args.checkpoint_dir), ("--device", args.device),
                                      ("--dtype", args.dtype), ("--parts", args.parts)) if value is not None]
    given += ["--no-fuse-lora"] if not args.fuse_lora else []
    given += [f"--split {args.split}"] if args.split != "dev" else []      # StoryCloze has no split
    if args.task not in (None, "sstorycloze"):
        given.insert(0, f"--task {args.task}")
    if given:
        raise UsageError(f"likelihood --demo scores generated StoryCloze pairs with the demo model (float32, CPU): "
                         f"drop {', '.join(given)}.")
    _check_loggers(args)
    config = _likelihood_config(args, "sstorycloze", run.out / "demo_audio" / "likelihood_demo")
    seed = 0 if args.seed is None else args.seed
    return _run_demo_pairs(args, run, config, seed, seed)[0]


def run_check_streaming(args: argparse.Namespace) -> int:
    return check_module.run_check_streaming(from_values(CheckStreamingConfig, args))


def run_compare(args: argparse.Namespace) -> int:
    return compare_command.run(from_values(compare_command.CompareConfig, args))


def main(argv: tp.Sequence[str] | None = None) -> int:
    """Entry point of the `moshi-eval` console script. Returns (and, as a script, exits with) the code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse(argv)
    args.argv = argv
    # SIGTERM stops the run like Ctrl-C from the first instruction on, before any file is touched (hashing
    # weights, reading chapters) or a torchrun rendezvous is joined; the runner turns it into a resume hint.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
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
