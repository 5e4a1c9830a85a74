"""Frames/s of `moshi_eval` scoring one frame per call against chunks of frames, on the same model, in one run.

For each model it scores the same random codes (teacher-forced audio, zero user stream) with
`moshi_eval.scoring.sequences.score_sequences`:
  - text `pad` (forced) and text `predicted` (the model's argmax, checked guess by guess in a chunk),
  - `--chunk 1` (one streaming step per frame, the 0.1 path) and each chunk length of `--chunks`,
and `LMModel.forward` over the whole sequence (the ceiling: no streaming at all). It prints frames/s and
the ratios against `--chunk 1` and against `forward`, and for predicted text the passes per chunk and the
share of text guesses accepted. `predicted (text emb 0)` is the same model with its text embedding zeroed:
the text stream then cannot change the next frame, every guess checks out, the best case of verification.
Each figure is the fastest of `--rounds` interleaved runs (interference only adds time).

    python bench/chunk_scoring.py [--frames 256] [--chunks 16,64] [--threads 2] [--models demo,moshi-118M]
"""
import argparse
import os
import sys
import time
import typing as tp
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import moshi_like  # noqa: E402

from moshi_eval.demo import demo_lm  # noqa: E402
from moshi_eval.scoring.sequences import score_sequences  # noqa: E402
from moshi_patch import LMGen  # noqa: E402

MODELS: dict[str, tp.Callable[[str], tp.Any]] = {
    "demo": lambda device: demo_lm(0, device=torch.device(device)),
    # The Moshi-shaped model: dim 512, 8 layers, depformer 256 x 4, card 2048, text card 32000.
    "moshi-118M": lambda device: moshi_like(dim=512, num_layers=8, depformer_dim=256, depformer_num_layers=4,
                                            card=2048, text_card=32000, device=device),
}


def time_scoring(lm_model, codes: list[torch.Tensor], text: str, chunk: int) -> tuple[float, tp.Any]:
    """Seconds to score `codes` and the `ChunkStats` of the run."""
    lm_gen = LMGen(lm_model, use_sampling=False)
    sync = torch.cuda.synchronize if lm_model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in score_sequences(lm_gen, codes, user_stream="zero", text=text, progress=False, chunk=chunk):
        pass
    sync()
    return time.perf_counter() - start, lm_gen.chunk_stats


@torch.no_grad()
def time_forward(lm_model, codes: list[torch.Tensor]) -> float:
    B, T = len(codes), codes[0].shape[-1]
    full = torch.full((B, lm_model.num_codebooks, T), lm_model.zero_token_id, dtype=torch.long)
    full[:, 0] = lm_model.text_padding_token_id
    full[:, 1:1 + lm_model.dep_q] = torch.stack(codes)
    full = full.to(lm_model.device)
    sync = torch.cuda.synchronize if lm_model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    lm_model(full)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=256, help="frames per sequence")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--chunks", default="16,64", help="chunk lengths to time besides 1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma separated, among {list(MODELS)}")
    parser.add_argument("--texts", default="pad,predicted,predicted (text emb 0)",
                        help="comma separated text modes: pad, predicted, predicted (text emb 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chunks = [1] + [int(c) for c in args.chunks.split(",")]
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size} x {args.frames} frames, best of {args.rounds} rounds")
    for name in args.models.split(","):
        lm_model = MODELS[name](args.device).to(getattr(torch, args.dtype))
        params = sum(p.numel() for p in lm_model.parameters()) / 1e6
        gen = torch.Generator().manual_seed(0)
        codes = [torch.randint(0, lm_model.card, (lm_model.dep_q, args.frames), generator=gen)
                 for _ in range(args.batch_size)]
        frames = args.batch_size * args.frames
        print(f"\n{name}: {params:.1f}M parameters, context {lm_model.context}")
        print(f"  {'text':<24}{'chunk':>6}{'frames/s':>10}{'x chunk 1':>11}{'x forward':>11}"
              f"{'passes/chunk':>14}{'guesses ok':>12}")
        with no_compile():
            forward = min(time_forward(lm_model, codes) for _ in range(args.rounds))
            modes = [(label, label.split(" ")[0]) for label in args.texts.split(",")]
            for label, text in modes:
                if label.endswith("(text emb 0)"):
                    lm_model.text_emb.weight.data.zero_()
                best: dict[int, tuple[float, tp.Any]] = {}
                for round_index in range(args.rounds):
                    for chunk in (chunks if round_index % 2 == 0 else chunks[::-1]):
                        seconds, stats = time_scoring(lm_model, codes, text, chunk)
                        if chunk not in best or seconds < best[chunk][0]:
                            best[chunk] = (seconds, stats)
                base = best[1][0]
                for chunk in chunks:
                    seconds, stats = best[chunk]
                    passes = "-" if chunk == 1 else f"{stats.passes_per_call:.2f}"
                    ok = "-" if stats.guess_accuracy is None else f"{stats.guess_accuracy:.2f}"
                    print(f"  {label:<24}{chunk:>6}{frames / seconds:>10.1f}{base / seconds:>11.2f}"
                          f"{forward / seconds:>11.3f}{passes:>14}{ok:>12}")
        print(f"  {'LMModel.forward':<24}{'all':>6}{frames / forward:>10.1f}{base / forward:>11.2f}{1:>11.3f}")


if __name__ == "__main__":
    main()
