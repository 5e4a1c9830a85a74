"""Files/s of `moshi-eval likelihood` scoring against a batched `LMModel.forward` on the same files, in one run.

The in-house way scores each batch of files with one `LMModel.forward` (no streaming state). `moshi-eval
likelihood` streams each batch through `step_with_logits` in chunks (`score_sequences`, as `LikelihoodEvaluator` does).
Both get the same files: random codes of 1 to 5 s (13 to 63 frames at 12.5 Hz; Mimi encoding is cached by the
CLI and left out here), batched by length longest first, zero user stream; text `pad` or `zero` forced in both,
`predicted` (the model's argmax: no forward equivalent, its speed only). Printed: files/s, the ratio to forward,
and the largest difference of a file's log-likelihood between the two (text pad / zero). Each figure is the
fastest of `--rounds` runs.

    python bench/likelihood.py [--files 64] [--batch-size 16] [--threads 2] [--models demo,moshi-118M]
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
from step_overhead import moshi_like  # noqa: E402

from moshi_eval.tasks.likelihood import kv_sized_to  # noqa: E402
from moshi_eval.scoring.sequences import DEFAULT_CHUNK, score_sequences  # noqa: E402
from moshi_patch import LMGen  # noqa: E402

MODELS: dict[str, tp.Callable[[str], tp.Any]] = {
    **CHUNK_MODELS,    # demo, moshi-118M
    "moshi-7B": lambda device: moshi_like(dim=4096, num_layers=32, depformer_dim=1024, depformer_num_layers=6,
                                          card=2048, text_card=32000, device=device, num_heads=32),
}


def batches(codes: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(codes)), key=lambda i: -codes[i].shape[-1])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_scoring(lm_model, codes, groups, text: str, chunk: int, sized: bool = True) -> tuple[float, list[float]]:
    lm_gen = LMGen(lm_model, use_sampling=False)
    out = [0.0] * len(codes)
    sync(lm_model.device)
    start = time.perf_counter()
    for group in groups:
        # As `moshi-eval likelihood` (LikelihoodEvaluator): the temporal KV caches sized to the batch unless --full-kv.
        steps = max(codes[i].shape[-1] for i in group) + lm_gen.max_delay
        with kv_sized_to(lm_model, steps if sized else 10**9):
            for s in score_sequences(lm_gen, [codes[i] for i in group], user_stream="zero", text=text,
                                     progress=False, chunk=chunk):
                out[group[s.index]] = -float(s.codebook_ce.astype("float64").sum())
    sync(lm_model.device)
    return time.perf_counter() - start, out


@torch.no_grad()
def time_forward(lm_model, codes, groups, text: str) -> tuple[float, list[float]]:
    """One forward per batch: audio padded with -1 (+ max_delay frames), CE of each file's frames summed."""
    d = max(lm_model.delays)
    text_value = lm_model.text_padding_token_id if text == "pad" else lm_model.zero_token_id
    out = [0.0] * len(codes)
    sync(lm_model.device)
    start = time.perf_counter()
    for group in groups:
        T = max(codes[i].shape[-1] for i in group) + d
        full = torch.full((len(group), lm_model.num_codebooks, T), lm_model.zero_token_id, dtype=torch.long)
        full[:, 0] = text_value
        for b, i in enumerate(group):
            full[b, 1:1 + lm_model.dep_q, :codes[i].shape[-1]] = codes[i]
        full = full.to(lm_model.device)
        logits = lm_model(full).logits.float()                               # [B, K, T, card]
        targets = full[:, 1:1 + lm_model.dep_q]
        logp = -F.cross_entropy(logits.permute(0, 3, 1, 2), targets.clamp(min=0), reduction="none")
        lengths = torch.tensor([codes[i].shape[-1] for i in group], device=full.device)
        valid = torch.arange(T, device=full.device)[None] < lengths[:, None]
        # forward's logits are NaN where it has no valid position (past a shorter file's end): select, not multiply.
        totals = torch.where(valid[:, None], logp, 0.0).double().sum(dim=(1, 2)).cpu()
        for b, i in enumerate(group):
            out[i] = float(totals[b])
    sync(lm_model.device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", default="demo,moshi-118M", help=f"comma separated, among {list(MODELS)}")
    parser.add_argument("--texts", default="pad,zero,predicted")
    parser.add_argument("--full-kv", action="store_true",
                        help="also time scoring with KV caches of the model's whole context (before kv_sized_to)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.files} files of 13-63 frames, batch {args.batch_size}, chunk {args.chunk}, "
          f"best of {args.rounds} rounds")
    for name in args.models.split(","):
        lm_model = MODELS[name](args.device).to(getattr(torch, args.dtype))
        params = sum(p.numel() for p in lm_model.parameters()) / 1e6
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(13, 64, (args.files,), generator=gen).tolist()
        codes = [torch.randint(0, lm_model.card, (lm_model.dep_q, n), generator=gen) for n in lengths]
        groups = batches(codes, args.batch_size)
        print(f"\n{name}: {params:.1f}M parameters")
        print(f"  {'text':<10}{'likelihood files/s':>20}{'forward files/s':>17}{'x forward':>11}{'max |dLL|':>11}"
              f"{'max |dLL|/|LL|':>16}")
        with no_compile():
            for text in args.texts.split(","):
                scored = min((time_scoring(lm_model, codes, groups, text, args.chunk) for _ in range(args.rounds)),
                             key=lambda r: r[0])
                if args.full_kv:
                    full = min((time_scoring(lm_model, codes, groups, text, args.chunk, sized=False)
                                for _ in range(args.rounds)), key=lambda r: r[0])
                    print(f"  {text + ' full KV':<10}{args.files / full[0]:>20.1f}")
                if text == "predicted":
                    print(f"  {text:<10}{args.files / scored[0]:>20.1f}{'-':>17}{'-':>11}{'-':>11}{'-':>16}")
                    continue
                forward = min((time_forward(lm_model, codes, groups, text) for _ in range(args.rounds)),
                              key=lambda r: r[0])
                diff = max(abs(a - b) for a, b in zip(scored[1], forward[1]))
                rel = max(abs(a - b) / abs(b) for a, b in zip(scored[1], forward[1]))
                print(f"  {text:<10}{args.files / scored[0]:>20.1f}{args.files / forward[0]:>17.1f}"
                      f"{forward[0] / scored[0]:>11.3f}{diff:>11.2e}{rel:>16.2e}")


if __name__ == "__main__":
    main()
