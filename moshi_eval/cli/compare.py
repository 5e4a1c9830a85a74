"""`moshi-eval compare RUN_DIR RUN_DIR ... --out DIR`: the arguments, checked, and the comparison of the runs' task."""
from dataclasses import dataclass, field
from pathlib import Path
import sys

from ..compare import librilight, likelihood, run_tasks
from ..errors import UsageError
from ..stats.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from ..stats.metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT

DESCRIPTION = ("Paired comparison of finished runs of one task: LibriLight runs on the books they share (per-book "
               "differences of window means and slopes, paired bootstrap intervals), likelihood runs on the pairs "
               "they share (accuracy differences, paired bootstrap over the averaging units). Runs are read at rest "
               "(a run being written is refused) and paired on the audio they scored.")


@dataclass
class CompareConfig:
    """`moshi-eval compare`'s options."""
    runs: list[Path]
    out: Path
    names: str | None = None
    reference: str | None = None
    report_at: tuple[int, ...] | None = None
    report_window: int | None = None
    bucket: int = DEFAULT_BUCKET
    bootstrap: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_SEED
    log_x: bool = False
    argv: list[str] = field(default_factory=list)


def run_names(paths: list[Path]) -> list[str]:
    """Distinct names for run folders: the folder name, with as many parent folders as needed to tell runs apart
    (`a/run` and `b/run`); the same folder given twice keeps one name plus its position."""
    resolved = [p.resolve() for p in paths]
    distinct = sorted(set(resolved))
    depth = 1
    while len({"/".join(p.parts[-depth:]) for p in distinct}) < len(distinct):
        depth += 1
    names = ["/".join(p.parts[-depth:]).lstrip("/") or "/" for p in resolved]
    if len(set(names)) != len(names):       # The same folder twice (a run against itself).
        names = [f"{name}#{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]
    return names


def run(config: CompareConfig) -> int:
    if len(config.runs) < 2:
        raise UsageError(f"compare needs at least 2 run folders, got {len(config.runs)}.")
    if config.out.exists() and not config.out.is_dir():
        raise UsageError(f"--out {config.out} exists and is not a directory: give a folder for compare.json, .md, "
                         ".csv and .png.")
    if config.names:
        names = [n.strip() for n in config.names.split(",")]
        if len(names) != len(config.runs) or len(set(names)) != len(names) or not all(names):
            raise UsageError(f"--names: expected {len(config.runs)} distinct non-empty names, one per run folder, "
                             f"got {names}.")
    else:
        names = run_names(config.runs)
    if config.bootstrap < 1:
        raise UsageError("compare needs --bootstrap >= 1: its intervals are what it reports.")
    task = run_tasks(config.runs)[0]
    if task == "likelihood":
        result = likelihood.run_compare(config.runs, names, config.out, config.bootstrap, config.bootstrap_seed)
        print(likelihood.markdown(result) + f"\nwritten: {config.out / 'compare.json'}, {config.out / 'compare.md'}")
        for note in result["notes"]:
            print(f"moshi-eval compare: note: {note}", file=sys.stderr)
        return 0
    if task != "librilight":
        raise UsageError(f"compare does not compare {task} runs yet: their results.json holds the metrics.")
    runs = [librilight.load_run(path, name) for path, name in zip(config.runs, names)]
    own_at, own_window = librilight.default_report_positions(runs)
    report_at = config.report_at or own_at or DEFAULT_REPORT_AT
    window = config.report_window or own_window or DEFAULT_HALF_WINDOW
    result = librilight.compare(runs, config.reference or names[0], report_at, window,
                                config.bucket, config.bootstrap, config.bootstrap_seed)
    paths = librilight.write(config.out, runs, result, config.log_x)
    left_out = {name: len(ids) for name, ids in result["left_out"].items() if ids}
    print(f"moshi-eval compare: {len(result['shared_books'])} shared books"
          + (f" (left out, not in every run: {left_out})" if left_out else "") + "\n")
    print(librilight.markdown_table(result))
    for note in result["notes"] + ([result["few_books"]] if result["few_books"] else []):
        print(f"moshi-eval compare: note: {note}", file=sys.stderr)
    print("written: " + ", ".join(map(str, paths)))
    return 0
