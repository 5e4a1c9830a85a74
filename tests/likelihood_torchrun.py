"""Run by tests/test_likelihood_evaluator_distributed.py under `torchrun`: a training job's process initialises
the process group itself, then calls a LikelihoodEvaluator. Writes each rank's metrics and per-file scores."""
import json
from pathlib import Path
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint_factory import load_tiny_checkpoint  # noqa: E402
from moshi_eval import LikelihoodConfig, LikelihoodEvaluator  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")       # the caller's group, as a torchrun training job makes it
    rank = dist.get_rank()
    lm, mimi, _ = load_tiny_checkpoint(spec["ckpt"])
    evaluator = LikelihoodEvaluator(mimi, LikelihoodConfig(**spec["config"]))
    result = evaluator(lm)
    mine = [k for i in evaluator._mine for k in evaluator.batches[i]]
    still = dist.is_initialized()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)                # the group is still usable
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
    summary = {"metrics": result.metrics, "scores": {k: s.log_likelihood for k, s in result.scores.items()},
               "mine": mine, "initialized": still, "all_reduce": total.item(), "failure": failure}
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
