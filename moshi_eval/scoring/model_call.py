"""What every evaluator does around a call with a model in memory (`LibriLightEvaluator`, `LikelihoodEvaluator`).

- `caller_ranks()`: the ranks of the caller's process group (a torchrun training job), never initialised here;
- `check_model(lm_model)`: a moshi LMModel, not streaming already;
- `scoring_mode(lm_model)`: eval mode, no autograd and `requires_grad` on for every floating point parameter for
  the call, every module's training flag and every parameter's `requires_grad` restored after, also when it raises;
- `raise_if_any_failed(ranks, error, what)`: an error on one rank raised on every rank (a `RankFailedError`
  naming it on the others), instead of the others waiting forever in the next collective step; `on_every_rank`
  and `score_model` wrap a step in it (`score_model` also sets torch's CPU threads for the call, `torch_threads`).
"""
from contextlib import contextmanager
import os
import typing as tp

import torch
from moshi.models.lm import LMModel

from .. import distributed
from ..errors import MoshiEvalError


class ModelStreamingError(MoshiEvalError, ValueError):
    """The model given to an evaluator is streaming already: streams cannot be nested."""


class RankFailedError(MoshiEvalError, RuntimeError):
    """Another rank of the caller's process group failed during a collective step of the evaluator."""


def caller_ranks() -> distributed.Ranks:
    """The ranks of the caller's process group if one is initialised (never initialised here), else one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return distributed.Ranks()
    world = torch.distributed.get_world_size()
    if world <= 1:
        return distributed.Ranks()
    return distributed.Ranks(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def raise_if_any_failed(ranks: distributed.Ranks, error: Exception | None, what: str) -> None:
    """Raise `error` on its rank and a RankFailedError naming it on the others (one process: `error`).

    Every rank must call it at the same point (it is a collective step)."""
    if not ranks.active:
        if error is not None:
            raise error
        return
    messages = ranks.gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailedError(f"{ranks.tag}rank {rank} failed while {what}: {message}")


T = tp.TypeVar("T")


def on_every_rank(ranks: distributed.Ranks, what: str, fn: tp.Callable[[], T]) -> T:
    """`fn()`, whose error on any rank is raised on every rank (`raise_if_any_failed`): a collective step."""
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:    # every rank learns it (else the others would wait for this one forever)
        error = exc
    raise_if_any_failed(ranks, error, what)
    return tp.cast(T, result)


def score_model(ranks: distributed.Ranks, lm_model: torch.nn.Module, fn: tp.Callable[[], T],
                threads: int | None = None) -> T:
    """`fn()` with `lm_model` in `scoring_mode` and torch's CPU threads set to `threads` (None: as they are), on
    every rank (`on_every_rank`, "scoring")."""
    def scored() -> T:
        with torch_threads(threads), scoring_mode(lm_model):
            return fn()
    return on_every_rank(ranks, "scoring", scored)


@contextmanager
def torch_threads(threads: int | None) -> tp.Iterator[None]:
    """torch's intra-op CPU threads set to `threads` for the block (None: unchanged), restored after. torch does
    not promise the same numbers for another count (here, scoring with 1 to 8 threads gave bitwise the same), and
    the speed depends on it: pinning it lets a CLI rerun run as the training loop's eval did."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_model(lm_model: tp.Any) -> None:
    """TypeError if `lm_model` is not a moshi LMModel, ValueError if it is streaming already."""
    if not isinstance(lm_model, LMModel):
        raise TypeError(f"lm_model: expected a moshi LMModel, got {type(lm_model).__name__} (for an FSDP or "
                        "DDP wrapper, pass its .module, with FSDP inside FSDP.summon_full_params).")
    if lm_model.is_streaming:
        raise ModelStreamingError("lm_model: the model is already streaming (inside a `streaming()` context): the "
                                  "evaluator opens and closes its own streaming state; call it outside that context.")


@contextmanager
def scoring_mode(lm_model: torch.nn.Module) -> tp.Iterator[None]:
    """`lm_model` in eval mode (dropout off) under `torch.no_grad()`, with `requires_grad` on for every floating
    point parameter, for the block; every module's training flag and every parameter's `requires_grad` are
    restored on exit, also on an exception (a model in training mode, or frozen, is not an error here).

    The flags are made the same for every caller because torch picks its matmul kernel by them, even under
    `no_grad`: the scores of a model in the middle of a training run (frozen base, trainable LoRA) are then bitwise
    those of the same weights loaded frozen by the CLI. They are set on, not off, because `torch.matmul` folds a
    `[N, T, D]` input that is not viewable as `[N * T, D]` (the depformer's per-codebook slices `x[:, k:k + 1]`
    in its multi-linear layers) into one matrix product only for a weight that requires grad; for a frozen one it
    multiplies by the weight expanded `N` times (`bmm`), much slower on a CPU (bench/dialogue.py, 118M model: the
    whole evaluation at 0.51x of a batched forward with the flags off, 0.89x with them on).

    Parameters made under `torch.inference_mode()` (inference tensors) are left as they are: torch refuses the
    flag on outside that mode, and takes its other kernels for them whatever the flag, so such a model scores
    like a frozen one (equal to a normal model up to float rounding, not bitwise; slower on a CPU)."""
    modes = [(module, module.training) for module in lm_model.modules()]
    flags = [(param, param.requires_grad) for param in lm_model.parameters() if not param.is_inference()]
    try:
        lm_model.eval()
        for param, _ in flags:
            param.requires_grad_(param.is_floating_point() or param.is_complex())
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


__all__ = ["RankFailedError", "caller_ranks", "check_model", "on_every_rank", "raise_if_any_failed", "score_model",
           "scoring_mode", "torch_threads"]
