"""Embedded defaults for `moshi-eval demo`: a small seeded Moshi-shaped LM, a small seeded Mimi, and a
short shipped audiobook. No download, no weights: the whole eval runs end to end on a CPU in seconds.

The models are built with moshi's own classes (`LMModel`, and `moshi.models.loaders.get_mimi` with a
smaller config) so that the demo goes through the same code paths as Moshi 7B and the real Mimi. Their
weights are random (seeded): the numbers the demo reports show the plumbing, not a trained model.

The seeds are local: building a demo model leaves torch's global random state as it was (its weights are those
of `torch.manual_seed(seed)` then the build, bitwise).

Training a model of this size on CPU: moshi compiles a few functions (RMS norm, RoPE, gating) with `torch.compile`
on their first call, about 90 s for the first step; `NO_TORCH_COMPILE=1` in the environment before moshi is
imported skips it (scoring runs without compilation anyway).

The audiobook (`moshi_eval/assets/`) is speech synthesized with espeak-ng from original text, 16 kHz FLAC, two
speakers x one book x three chapters; `assets/make_demo_audiobook.py` regenerates it (dev time only).
"""
import contextlib
import copy
import json
from pathlib import Path
import shutil
import typing as tp

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

ASSETS_DIR = Path(__file__).parent / "assets"

DEMO_LM_KWARGS: dict[str, tp.Any] = {
    # Moshi's structure (loaders._lm_kwargs) at a size that steps at ~50 frames/s on one CPU core.
    "dim": 64,
    "text_card": 1000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 250,  # 20 s at 12.5 Hz: the demo books are longer, so the curve crosses the context mark
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 64,
    "depformer_dim_feedforward": int(4.125 * 64),
    "depformer_num_heads": 4,
    "depformer_num_layers": 1,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


def small_mimi_config(n_filters: int = 8, dimension: int = 32, num_layers: int = 1,
                      codebook_dim: int = 16, bins: int = 2048, n_q: int = 8) -> dict:
    """A Mimi config in moshi's format (`loaders._mimi_config`), smaller: same 24 kHz sample rate, 12.5 Hz
    frame rate, SEANet ratios and split RVQ, fewer channels and transformer layers. Usable as the
    `--mimi-config` JSON of moshi's loaders."""
    cfg = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(n_filters=n_filters, dimension=dimension)
    cfg["quantizer"].update(dimension=codebook_dim, n_q=n_q, bins=bins,
                            input_dimension=dimension, output_dimension=dimension)
    cfg["transformer"].update(d_model=dimension, num_heads=2, num_layers=num_layers,
                              dim_feedforward=4 * dimension, input_dimension=dimension,
                              output_dimensions=[dimension])
    return cfg


DEMO_MIMI_CONFIG = small_mimi_config()


@contextlib.contextmanager
def _seeded(seed: int, device: str | torch.device) -> tp.Iterator[None]:
    """torch's generators of the CPU (and of `device`, if a CUDA one) seeded with `seed` for the block, then put
    back as they were: what `torch.manual_seed(seed)` gives the block, without its effect on the caller's RNG."""
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def demo_lm(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LMModel:
    """Small seeded Moshi-shaped LMModel (`DEMO_LM_KWARGS`: n_q=16, dep_q=8, card=2048, text_card=1000,
    Moshi delays, rope, silu, rms_norm_f32, context 250 frames, depformer multi-linear with weights per
    step), in eval mode. ~4.8M parameters. Torch's global random state is left as it was (`_seeded`)."""
    with _seeded(seed, device):
        model = LMModel(device=device, dtype=dtype, **DEMO_LM_KWARGS)
    return model.eval()


def _calibration_audio(seed: int, seconds: float, sample_rate: int) -> np.ndarray:
    """Deterministic speech-like signal `[S]`: voiced harmonic segments with gliding pitch, noise bursts
    (fricatives) and pauses, so that the codebooks see the kinds of frames real speech produces."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    total = int(seconds * sample_rate)
    while sum(len(o) for o in out) < total:
        n = int(rng.uniform(0.08, 0.4) * sample_rate)
        kind = rng.choice(3, p=[0.6, 0.25, 0.15])
        t = np.arange(n) / sample_rate
        if kind == 0:
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.3, 0.3) * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            seg = sum(np.sin(k * phase) / k * rng.uniform(0.3, 1.0) for k in range(1, 12))
        elif kind == 1:
            seg = rng.standard_normal(n) * np.hanning(n)
        else:
            seg = np.zeros(n)
        out.append(seg * rng.uniform(0.02, 0.3))
    return np.concatenate(out)[:total].astype(np.float32)


@torch.no_grad()
def _init_codebooks(mimi: MimiModel, seed: int) -> None:
    """Fill the (all-zero, uninitialized) codebooks of a fresh Mimi so that it gives varied codes.

    Each residual level's 2048 entries are latent residuals of a calibration signal at that level, plus
    noise: the kmeans-style initialization of moshi's trainer without the iterations (which would need
    more frames than entries). Without this every code would be 0."""
    gen = torch.Generator().manual_seed(seed)
    wav = _calibration_audio(seed, 20.0, mimi.sample_rate)
    emb = mimi.encode_to_latent(torch.from_numpy(wav)[None, None], quantize=False)  # [1, D, T]
    quantizer = mimi.quantizer
    for rvq, n_levels in ((quantizer.rvq_first, quantizer.rvq_first.max_n_q),
                          (quantizer.rvq_rest, quantizer.rvq_rest.max_n_q)):
        residual = rvq.input_proj(emb)  # [1, d, T]
        for level in range(n_levels):
            layer = rvq.vq.layers[level]
            codebook = layer._codebook
            frames = residual[0].t()  # [T, d]
            picks = torch.randint(0, frames.shape[0], (codebook.codebook_size,), generator=gen)
            noise = torch.randn(codebook.codebook_size, frames.shape[1], generator=gen)
            entries = frames[picks] + 0.3 * frames.std(dim=0, keepdim=True) * noise
            codebook.embedding_sum.copy_(entries)
            codebook.cluster_usage.fill_(1.0)
            codebook._initialized.fill_(1.0)
            # moshi caches embedding_sum / cluster_usage in `_embedding`; drop it as its own EMA update does.
            codebook.register_buffer("_embedding", None, persistent=False)
            residual = residual - layer.decode(layer.encode(residual))


def demo_mimi(seed: int = 0, device: str | torch.device = "cpu") -> MimiModel:
    """Small seeded Mimi (`DEMO_MIMI_CONFIG` through moshi's `loaders.get_mimi`): 24 kHz, 12.5 Hz,
    8 codebooks of 2048 (fits `demo_lm`), codebooks initialized from a calibration signal; eval mode.
    Encodes ~50x faster than real time on one CPU core. Torch's global random state is left as it was."""
    with _seeded(seed, "cpu"):
        mimi = loaders.get_mimi(None, DEMO_MIMI_CONFIG, device="cpu", num_codebooks=8)
        _init_codebooks(mimi, seed)
    return mimi.to(device).eval()


def demo_audiobook(dest: str | Path) -> Path:
    """Copy the shipped demo audiobook into `dest/librilight_demo` in LibriLight layout
    (`<speaker>/<book>/<chapter>.flac` + `.json`) and return that root (to pass as `--audio-dir`).

    Shipped files are flat, named `<speaker>__<book>__<chapter>.flac|.json`, so that the package data is
    one glob. A file already there with the shipped content is left as it is (its mtime too, so that a
    rerun of the demo into the same folder resumes instead of seeing changed chapters); any other is
    replaced by the shipped one.

    Raises:
        FileNotFoundError: the package's assets are missing (a broken install).
    """
    files = sorted(ASSETS_DIR.glob("*__*__*.flac"))
    if not files:
        raise FileNotFoundError(f"demo audiobook assets missing from {ASSETS_DIR} (broken install?)")
    root = Path(dest) / "librilight_demo"
    for audio in files:
        speaker, book, chapter = audio.stem.split("__")
        target = root / speaker / book
        target.mkdir(parents=True, exist_ok=True)
        _copy_if_different(audio, target / f"{chapter}.flac")
        meta = audio.with_suffix(".json")
        if meta.is_file():
            _copy_if_different(meta, target / f"{chapter}.json")
    return root


def _copy_if_different(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` unless `dst` is a regular file with the same bytes already (left untouched)."""
    if dst.is_file() and not dst.is_symlink() and dst.stat().st_size == src.stat().st_size:
        if dst.read_bytes() == src.read_bytes():
            return
    dst.unlink(missing_ok=True)            # a link is replaced, never written through
    shutil.copyfile(src, dst)


def demo_audiobook_manifest() -> list[dict]:
    """The shipped chapters' metadata (one dict per chapter, in file-name order)."""
    return [json.loads(p.read_text()) for p in sorted(ASSETS_DIR.glob("*__*__*.json"))]


def demo_minimal_pairs(dest: str | Path, stories: int = 3, seconds: float = 1.5, sample_rate: int = 16000) -> Path:
    """Generated minimal pairs in the spoken StoryCloze layout, in `dest/likelihood_demo`: `<n>_demo_correct.wav`
    is a speech-like signal, `<n>_demo_incorrect.wav` the same beginning with its last third time-reversed (a wrong
    ending). 16 kHz, as the benchmarks' releases. A file already there with these bytes is left as it is (its mtime
    too: a rerun into the same folder resumes). Returns the folder (to pass as `--data`)."""
    import sphn
    root = Path(dest) / "likelihood_demo"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(stories):
        right = _calibration_audio(1000 + n, seconds, sample_rate)
        cut = 2 * len(right) // 3
        wrong = np.concatenate([right[:cut], right[cut:][::-1]])
        for kind, audio in (("correct", right), ("incorrect", np.ascontiguousarray(wrong))):
            tmp = root / f".{n}_demo_{kind}.tmp.wav"
            sphn.write_wav(str(tmp), audio, sample_rate)
            _copy_if_different(tmp, root / f"{n}_demo_{kind}.wav")
            tmp.unlink()
    return root


__all__ = ["ASSETS_DIR", "DEMO_LM_KWARGS", "DEMO_MIMI_CONFIG", "demo_audiobook", "demo_audiobook_manifest",
           "demo_lm", "demo_mimi", "demo_minimal_pairs", "small_mimi_config"]
