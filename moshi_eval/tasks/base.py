"""What every task shares: the task protocol, the run's versions and chunk statistics, and `Evaluators`.

A task is a library object with
- an identity: what its numbers depend on besides the model (`identity(device) -> dict`, stored in `config.json`);
- an evaluator, prepared once from the codec (`evaluator(mimi, ranks, cache_dir, hasher, progress)`), that a
  model is passed to (`evaluator(lm_model, store=None) -> result`) as often as wanted;
- a unit of resume (`unit`: a book, a batch), kept by its store in the output folder (`store(folder, ranks)`);
- a result that knows how to become flat metrics (`result.metrics`) and files (`result.write(out_dir)`, or
  `result.write_files(folder, command, identity)` into a folder the runner holds).
`runner.run_task` runs any of them the same way.
"""
from dataclasses import dataclass
import platform
import time
import typing as tp

import numpy as np
import torch
from moshi.models.lm import LMModel

from moshi_patch import LMGen


class Result(tp.Protocol):
    """What a task's result offers (`EvalResult`, `LikelihoodResult`, `DialogueResult`)."""
    metrics: dict[str, float]
    task: str

    def write(self, out_dir: tp.Any) -> tp.Any: ...


class Evaluator(tp.Protocol):
    """A task prepared once and called with a model."""

    def __call__(self, lm_model: LMModel) -> Result: ...


def versions() -> dict:
    """The versions results.json records."""
    import moshi
    import moshi_patch
    from importlib import metadata
    try:
        moshi_version = metadata.version("moshi")
    except metadata.PackageNotFoundError:
        moshi_version = getattr(moshi, "__version__", None)
    return {"moshi": moshi_version, "torch": torch.__version__, "moshi_patch": moshi_patch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def chunk_summary(lm_gen: LMGen) -> dict:
    """What chunked scoring did in a call: passes per chunk and, for predicted text, the guesses."""
    stats = lm_gen.chunk_stats
    return {"chunked_calls": stats.calls, "frames": stats.frames, "passes": stats.passes,
            "passes_per_chunk": stats.passes_per_call, "text_guesses": stats.guesses,
            "text_guesses_accepted": stats.guesses_right, "text_guess_accepted_share": stats.guess_accuracy}


def sum_chunk_summaries(summaries: list[dict]) -> dict:
    """The chunk counts of every rank, summed, with the ratios recomputed."""
    keys = ("chunked_calls", "frames", "passes", "text_guesses", "text_guesses_accepted")
    total = {k: sum(s[k] for s in summaries) for k in keys}
    total["passes_per_chunk"] = total["passes"] / total["chunked_calls"] if total["chunked_calls"] else None
    total["text_guess_accepted_share"] = (total["text_guesses_accepted"] / total["text_guesses"]
                                          if total["text_guesses"] else None)
    return total


def task_name(evaluator: tp.Any) -> str:
    """The metric prefix of an evaluator's results: `librilight`, the likelihood task (`sblimp`, ...), `dialogue`."""
    name = getattr(evaluator, "metric_prefix", None)
    if not isinstance(name, str) or not callable(evaluator):
        raise TypeError(f"evaluators: expected moshi_eval evaluators (LibriLightEvaluator, LikelihoodEvaluator, "
                        f"DialogueEvaluator), got {type(evaluator).__name__}.")
    return name


@dataclass
class EvalResults:
    """One call of `Evaluators`: each task's result and their metrics merged.

    Attributes:
        results: `{name: result}` in the evaluators' order.
        metrics: every result's flat metrics under its name (`librilight/audio_ce@8000`, `sblimp/accuracy`, ...),
            straight into `wandb.log` or `add_scalar`.
        seconds: wall time of the call.
    """
    results: dict[str, tp.Any]
    metrics: dict[str, float]
    seconds: float

    def write(self, out_dir: tp.Any) -> dict[str, tp.Any]:
        """Each result's files (as its CLI command writes them) in `out_dir/<name>/`; returns their paths (on a
        rank other than 0 of a torch.distributed job: nothing written, None for each)."""
        from pathlib import Path
        return {name: result.write(Path(out_dir) / name) for name, result in self.results.items()}


class Evaluators:
    """Several evaluators called as one, for a training loop's numbers in one dict:

        evaluate_all = Evaluators([LibriLightEvaluator(mimi, libri_config),
                                   LikelihoodEvaluator(mimi, LikelihoodConfig("sblimp", zr_root))])
        wandb.log(evaluate_all(lm_model).metrics, step=step)

    Args:
        evaluators: a sequence (each named by its task: `librilight`, `sblimp`, ...) or `{name: evaluator}` (the
            name replaces the task as the metric prefix, e.g. two sWUGGY splits). Names must differ, so metric names
            never collide.
    Raises ValueError on two evaluators of one name. A call runs them in order on the model (each returns the model
    as it was given) and raises the first error.
    """

    def __init__(self, evaluators: tp.Sequence[tp.Any] | tp.Mapping[str, tp.Any]) -> None:
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
        self.evaluators: dict[str, tp.Any] = dict(pairs)

    def __call__(self, lm_model: LMModel) -> EvalResults:
        start = time.perf_counter()
        results: dict[str, tp.Any] = {}
        metrics: dict[str, float] = {}
        for name, evaluator in self.evaluators.items():
            result = results[name] = evaluator(lm_model)
            prefix = task_name(evaluator)
            for key, value in result.metrics.items():
                metrics[name + key[len(prefix):]] = value    # every key starts with `prefix/`
        return EvalResults(results, metrics, time.perf_counter() - start)


__all__ = ["EvalResults", "Evaluator", "Evaluators", "Result", "chunk_summary", "sum_chunk_summaries", "task_name",
           "versions"]
