"""`moshi-eval zr2021-submission RUN_DIR ... --out DIR`: the arguments, and the ZeroSpeech 2021 submission folder
(`moshi_eval.zr2021`) they ask for."""
import argparse
from pathlib import Path
import typing as tp

from .. import zr2021

DESCRIPTION = ("A ZeroSpeech 2021 submission folder, as zerospeech2021-validate accepts it, from finished "
               "`moshi-eval likelihood` runs of swuggy (lexical) and sblimp (syntactic), dev and test splits: "
               "meta.yaml (its fields from the runs; author, affiliation, training set and GPU budget from the "
               "options or left empty to fill), the runs' scores, and the empty phonetic/ and semantic/ folders "
               "the validator wants. Prints the validation command that applies.")


def _gpu_hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPU hours, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GPU hours >= 0, got {text!r}")
    return value


def add_parser(subparsers: tp.Any) -> None:
    """Register the `zr2021-submission` subcommand on the `moshi-eval` subparsers."""
    p = subparsers.add_parser("zr2021-submission", help="a ZeroSpeech 2021 submission folder from likelihood runs",
                              description=DESCRIPTION)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="--out folders of finished likelihood runs (swuggy / sblimp, dev / test)")
    p.add_argument("--out", required=True, type=Path, help="the submission folder to write (new or empty)")
    p.add_argument("--author", default="", help="meta.yaml author (default: empty, to fill)")
    p.add_argument("--affiliation", default="", help="meta.yaml affiliation (default: empty, to fill)")
    p.add_argument("--train-set", default="", help="meta.yaml train_set: what the model was trained on")
    p.add_argument("--gpu-budget", type=_gpu_hours, default=None,
                   help="meta.yaml gpu_budget: GPU hours of the model's training (default: empty, to fill)")
    p.add_argument("--description", default=None,
                   help="meta.yaml description (default: one made from the runs: model, scoring)")
    p.add_argument("--visually-grounded", action="store_true", help="meta.yaml visually_grounded: true")
    p.add_argument("--code", type=Path, default=None,
                   help="a folder copied to code/: the submission is then open source (open_source: true)")
    p.add_argument("--zip", action="store_true", help="also write OUT.zip, laid out as the validator unpacks it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta = zr2021.SubmissionMeta(author=args.author, affiliation=args.affiliation, train_set=args.train_set,
                                 gpu_budget=args.gpu_budget, description=args.description,
                                 visually_grounded=args.visually_grounded)
    config = zr2021.SubmissionConfig(runs=list(args.runs), out=args.out, meta=meta, code=args.code, zip=args.zip)
    zr2021.print_submission(zr2021.write_submission(config))
    return 0
