"""Run by tests/test_evaluator_distributed.py under `torchrun`: a training job's process initialises the
process group itself, then calls the evaluator (a LibriLightEvaluator, or a LikelihoodEvaluator when the spec
says "likelihood"). Writes each rank's metrics and per-book arrays (per-file scores)."""
import json
from pathlib import Path
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: the helpers package
from helpers.checkpoint_factory import load_tiny_checkpoint  # noqa: E402
from moshi_eval import LibriLightConfig, LibriLightEvaluator, LikelihoodConfig, LikelihoodEvaluator  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")       # the caller's group, as a torchrun training job makes it
    rank = dist.get_rank()
    lm, mimi, _ = load_tiny_checkpoint(spec["ckpt"])
    if spec.get("likelihood"):
        evaluator = LikelihoodEvaluator(mimi, LikelihoodConfig(**spec["config"]))
        result = evaluator(lm)
        mine = [k for i in evaluator._mine for k in evaluator.batches[i]]
        flat = {f"{k}|log_likelihood": np.float64(s.log_likelihood) for k, s in result.scores.items()}
    else:
        evaluator = LibriLightEvaluator(mimi, LibriLightConfig(**spec["config"]), cache_dir=spec["cache"])
        result = evaluator(lm)
        mine = [b.sequence_id for batch in evaluator._mine for b in batch]
        flat = {f"{sid}|{name}": value for sid, arrays in result.sequences.items() for name, value in arrays.items()}
    still = dist.is_initialized()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)                # the group is still usable
    np.savez(out / f"rank{rank}.npz", **flat)
    # A failure on one rank (NaN weights on rank 1) is raised on every rank: none waits forever.
    if rank == 1:
        with torch.no_grad():
            for p in lm.parameters():
                p.fill_(float("nan"))
    try:
        evaluator(lm)
        failure = None
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    dist.all_reduce(total)
    summary = {"metrics": result.metrics, "mine": mine, "initialized": still, "all_reduce": total.item(),
               "failure": failure}
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
