"""Cost of `step_with_logits` against upstream `LMGen.step()`, on the same model, in one run.

For each model it times, per frame (ms), on the same inputs:
  - `step`:             upstream `moshi.models.lm.LMGen.step()`, greedy;
  - `moshi_patch step`: `moshi_patch.LMGen.step()` in a stream that never calls `step_with_logits` (it must
                        cost what upstream's costs: <= 1.01x);
  - `swl free`:         `step_with_logits` with nothing forced (same tokens as `step()`);
  - `swl forced`:       text predicted, every audio codebook forced: the LibriLight scoring setting
                        (one parallel depformer call);
  - `swl forced seq`:   the same with the parallel depformer disabled (dep_q sequential calls),
and prints the ratios against `step`. Methods are timed in interleaved rounds (the order reversed every
other round) and the fastest round of each is kept: interference from the rest of the machine only ever
adds time, so the minimum is the steadiest estimate of a method's own cost (the median is printed too).
On CPU the time is the process's CPU time with one thread (`--threads`).

    python bench/step_overhead.py [--frames 32] [--rounds 7] [--batch-size 1] [--device cpu]
"""
import argparse
import os
import statistics
import time
import typing as tp

# moshi compiles a few small functions with torch.compile even on CPU; the time is spent in both methods alike,
# but keeping it out makes the CPU figures steadier. Set NO_TORCH_COMPILE=0 to keep moshi's default.
if os.environ.get("NO_TORCH_COMPILE") == "0":
    del os.environ["NO_TORCH_COMPILE"]
else:
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models import lm as upstream_lm
from moshi.models.lm import LMModel  # noqa: E402

from moshi_patch import LMGen  # noqa: E402


def moshi_like(dim: int, num_layers: int, depformer_dim: int, depformer_num_layers: int, card: int,
               text_card: int, n_q: int = 16, dep_q: int = 8, context: int = 3000, device: str = "cpu",
               num_heads: int = 8) -> LMModel:
    """A random model with Moshi 7B's structure (streams, delays, depformer layout), other sizes."""
    torch.manual_seed(0)
    stream = [0] + [1] * (dep_q - 1)
    model = LMModel(
        delays=[0] + stream + stream, n_q=n_q, dep_q=dep_q, card=card, text_card=text_card,
        dim=dim, num_heads=num_heads, num_layers=num_layers, hidden_scale=4.125, causal=True,
        context=context, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
        depformer_dim=depformer_dim, depformer_dim_feedforward=int(4.125 * depformer_dim),
        depformer_num_heads=max(1, depformer_dim // 64), depformer_num_layers=depformer_num_layers,
        depformer_multi_linear=True, depformer_weights_per_step=True, depformer_pos_emb="none",
        device=device)
    return model.eval()


MODELS: dict[str, dict[str, tp.Any]] = {
    "tiny": dict(dim=64, num_layers=2, depformer_dim=32, depformer_num_layers=2, card=64, text_card=100,
                 num_heads=4),
    "moshi-100M": dict(dim=512, num_layers=8, depformer_dim=256, depformer_num_layers=4, card=2048,
                       text_card=32000),
}


def time_method(lm_model: LMModel, method: str, codes: torch.Tensor, warmup: int) -> float:
    """Seconds per frame of one method over the frames of `codes [B, K, T]` (after `warmup` frames)."""
    dep_q = lm_model.dep_q
    B, _, T = codes.shape
    if method == "step":
        lm_gen: tp.Any = upstream_lm.LMGen(lm_model, use_sampling=False)
    elif method == "moshi_patch step":
        lm_gen = LMGen(lm_model, use_sampling=False)
    else:
        lm_gen = LMGen(lm_model, use_sampling=False)
        lm_gen.parallel_forced_depformer = method != "swl forced seq"
    forced = codes[:, :1 + dep_q].clone()
    forced[:, 0] = lm_model.ungenerated_token_id  # Text: the model's own prediction.
    on_cuda = codes.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    clock = time.perf_counter if on_cuda else time.process_time
    with lm_gen.streaming(B):
        for step in range(T):
            if step == warmup:
                sync()
                start = clock()
            user = codes[:, dep_q + 1:, max(step - 1, 0)][..., None]
            if method in ("step", "moshi_patch step"):
                lm_gen.step(user)
            elif method == "swl free":
                lm_gen.step_with_logits(user)
            else:
                lm_gen.step_with_logits(user, forced[:, :, step:step + 1])
        sync()
    return (clock() - start) / (T - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32, help="frames timed per round and method")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma separated, among {list(MODELS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = ["step", "moshi_patch step", "swl free", "swl forced", "swl forced seq"]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.frames} frames x {args.rounds} rounds (fastest, and median)")
    for name in args.models.split(","):
        lm_model = moshi_like(device=args.device, **MODELS[name])
        params = sum(p.numel() for p in lm_model.parameters()) / 1e6
        gen = torch.Generator().manual_seed(0)
        T = args.frames + args.warmup
        codes = torch.cat([
            torch.randint(0, lm_model.text_card, (args.batch_size, 1, T), generator=gen),
            torch.randint(0, lm_model.card, (args.batch_size, lm_model.n_q, T), generator=gen)], dim=1)
        codes = codes.to(args.device)
        per_method: dict[str, list[float]] = {m: [] for m in methods}
        for round_index in range(args.rounds):
            for method in (methods if round_index % 2 == 0 else methods[::-1]):
                per_method[method].append(time_method(lm_model, method, codes, args.warmup))
        best = min(per_method["step"])
        median = statistics.median(per_method["step"])
        print(f"\n{name}: {params:.1f}M parameters")
        print(f"  {'method':<18}{'ms/frame':>10}{'x step()':>10}{'median ms':>11}{'x step()':>10}")
        for method in methods:
            ms, ms_median = min(per_method[method]), statistics.median(per_method[method])
            print(f"  {method:<18}{ms * 1e3:>10.2f}{ms / best:>10.2f}{ms_median * 1e3:>11.2f}"
                  f"{ms_median / median:>10.2f}")


if __name__ == "__main__":
    main()
