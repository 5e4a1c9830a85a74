"""Tokens/s of `DialogueEvaluator` (streaming, teacher forced) against a batched `LMModel.forward` on the same batches.

The in-house way scores a batch of dialogue windows with one `LMModel.forward` and a masked cross-entropy (no
streaming state: moshi-finetune's eval). `DialogueEvaluator` streams each batch through `step_with_logits` in chunks
of `--chunk` frames and sums the same cross-entropies at the same positions. Both get the same random batches
(`--batches` of `--batch-size` x `--frames` frames, text / model audio / user audio all present, as a full
moshi-finetune window). Printed: scored tokens (text + audio targets) per second for each, their ratio, and the
largest relative difference of the metrics (text / audio CE) between the two, all taken in one run. Each figure
is the fastest of `--rounds` interleaved runs.

    python bench/dialogue.py [--models tiny,moshi-118M] [--frames 256] [--batch-size 4] [--threads 2]
"""
import argparse
import os
import sys
import time
import typing as tp
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunk_scoring import MODELS as CHUNK_MODELS  # noqa: E402
from step_overhead import MODELS as STEP_MODELS, moshi_like  # noqa: E402

from moshi_eval.scoring.sequences import DEFAULT_CHUNK  # noqa: E402
from moshi_eval.tasks.dialogue import DialogueEvaluator  # noqa: E402

MODELS: dict[str, tp.Callable[[str], tp.Any]] = {
    # Moshi's streams and delays (n_q 16, dep_q 8), dim 64, 2 layers, card 64, text card 100.
    "tiny": lambda device: moshi_like(**STEP_MODELS["tiny"], device=device),
    **CHUNK_MODELS,    # demo, moshi-118M
}


def random_batches(lm_model: tp.Any, count: int, batch_size: int, frames: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` batches `[B, 1 + n_q, T]` of random tokens, a third of the text the padding id (a weighted target)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        text = torch.randint(0, lm_model.text_card, (batch_size, 1, frames), generator=gen)
        text[torch.rand(text.shape, generator=gen) < 0.3] = lm_model.text_padding_token_id
        audio = torch.randint(0, lm_model.card, (batch_size, lm_model.n_q, frames), generator=gen)
        out.append(torch.cat([text, audio], dim=1))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_scores(lm_model: tp.Any, batches: list[torch.Tensor]) -> tuple[float, dict[str, float], int]:
    """Seconds, {text_ce, audio_ce} and the scored tokens of one batched `LMModel.forward` per batch."""
    device = lm_model.device
    sums = {"text": 0.0, "audio": 0.0}
    counts = {"text": 0, "audio": 0}
    _sync(device)
    start = time.perf_counter()
    for codes in batches:
        codes = codes.to(device)
        out = lm_model(codes)
        for name, logits, target, mask in (("text", out.text_logits, codes[:, :1], out.text_mask),
                                           ("audio", out.logits, codes[:, 1:1 + lm_model.dep_q], out.mask)):
            ce = F.cross_entropy(logits.float().flatten(0, 2), target.clamp(min=0).flatten(), reduction="none")
            ce = torch.where(mask.flatten(), ce, 0.0)
            sums[name] += float(ce.double().sum())
            counts[name] += int(mask.sum())
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, {f"{k}_ce": sums[k] / counts[k] for k in sums}, counts["text"] + counts["audio"]


def evaluator_scores(lm_model: tp.Any, evaluator: DialogueEvaluator) -> tuple[float, dict[str, float], int]:
    _sync(lm_model.device)
    start = time.perf_counter()
    m = evaluator(lm_model).metrics
    _sync(lm_model.device)
    seconds = time.perf_counter() - start
    return (seconds, {"text_ce": m["dialogue/text_ce"], "audio_ce": m["dialogue/audio_ce"]},
            int(m["dialogue/text_tokens"] + m["dialogue/audio_tokens"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help=f"comma separated, among {list(MODELS)}")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=256, help="frames per window (100 s windows: 1250)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="frames per streaming call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.batches} batches of {args.batch_size} x {args.frames} frames, chunk {args.chunk}, best of "
          f"{args.rounds} rounds")
    for name in args.models.split(","):
        lm_model = MODELS[name](args.device).to(getattr(torch, args.dtype))
        params = sum(p.numel() for p in lm_model.parameters()) / 1e6
        batches = random_batches(lm_model, args.batches, args.batch_size, args.frames)
        evaluator = DialogueEvaluator(batches, chunk=args.chunk)
        with no_compile():
            runs = []
            for round_index in range(args.rounds):      # interleaved: interference only adds time to both
                runs.append(("forward", *forward_scores(lm_model, batches)))
                runs.append(("evaluator", *evaluator_scores(lm_model, evaluator)))
        best = {kind: min((r for r in runs if r[0] == kind), key=lambda r: r[1]) for kind in ("forward", "evaluator")}
        (_, f_s, f_m, f_n), (_, e_s, e_m, e_n) = best["forward"], best["evaluator"]
        assert f_n == e_n, (f_n, e_n)
        diff = max(abs(e_m[k] - f_m[k]) / abs(f_m[k]) for k in f_m)
        print(f"\n{name}: {params:.1f}M parameters, {e_n} scored tokens per pass")
        print(f"  {'LMModel.forward (batched)':<28}{f_n / f_s:>12.0f} tokens/s")
        print(f"  {'DialogueEvaluator (stream)':<28}{e_n / e_s:>12.0f} tokens/s   {f_s / e_s:.3f}x forward   "
              f"max rel. metric diff {diff:.1e}")


if __name__ == "__main__":
    main()
