"""Tiny on-disk Moshi checkpoints and LibriLight-layout folders for the tests (no download, seconds on CPU).

- `write_tiny_checkpoint(dir)`: everything moshi's own loader needs, in moshi's formats: `config.json`
  (LM kwargs as in `loaders._lm_kwargs`), `model.safetensors` (LM), `mimi.safetensors` + `mimi_config.json`
  (a small Mimi in `loaders._mimi_config` format), `tokenizer.model` (sentencepiece trained on a few lines).
  Load with `CheckpointInfo.from_hf_repo(hf_repo, moshi_weights=..., mimi_weights=..., tokenizer=...,
  config_path=..., mimi_config_path=...)`: all paths local, nothing downloaded.
- `write_librilight_folder(root, ...)`: `<root>/<speaker>/<book>/<chapter>.flac` (+ `.json`), FLAC written
  by the small pure-numpy encoder below (sphn reads FLAC but cannot write it).
- `make_tiny_mimi(...)`: a small random Mimi with Gaussian codebooks (no near-ties between entries, so
  codes are stable under float noise: exact code comparisons in tests are meaningful).
"""
import hashlib
import json
from pathlib import Path
import typing as tp

import numpy as np
import sentencepiece
from safetensors.torch import save_file
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from moshi_eval.demo import small_mimi_config

TINY_HF_REPO = "local/tiny-moshi"  # never resolved: every file is passed explicitly

TEXT_CARD = 64  # sentencepiece vocab size == LM text_card, as for Moshi (32000)


def tiny_lm_config(card: int = 64, text_card: int = TEXT_CARD, context: int = 24) -> dict:
    """LM kwargs in moshi's config.json format (keys of `loaders._lm_kwargs`), Moshi-shaped and tiny:
    n_q=16, dep_q=8, Moshi delays, rope, silu, rms_norm_f32, depformer multi-linear + weights per step."""
    return {
        "dim": 32, "text_card": text_card, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8,
        "card": card, "num_heads": 2, "num_layers": 2, "hidden_scale": 2, "causal": True,
        "layer_scale": None, "context": context, "max_period": 10000, "gating": "silu",
        "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 16,
        "depformer_dim_feedforward": 32, "depformer_num_heads": 2, "depformer_num_layers": 1,
        "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 8,
        "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    }


def tiny_mimi_config(bins: int = 64, context: int = 20) -> dict:
    """A Mimi config in moshi's format: 24 kHz, 12.5 Hz, split RVQ with 8 codebooks of `bins`, tiny.

    `context`: the encoder/decoder transformer's attention span in encoder steps (25 Hz); 20 steps
    (0.8 s) instead of Mimi's 250 so that a few seconds of audio already go past it."""
    cfg = small_mimi_config(n_filters=4, dimension=16, num_layers=1, codebook_dim=8, bins=bins, n_q=8)
    cfg["transformer"]["context"] = context
    return cfg


@torch.no_grad()
def gaussian_codebooks(mimi: MimiModel, seed: int = 0, scale: float = 0.05) -> None:
    """Give every codebook of a fresh (all-zero) Mimi i.i.d. Gaussian entries, decreasing with the level."""
    gen = torch.Generator().manual_seed(seed)
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        for level, layer in enumerate(rvq.vq.layers):
            cb = layer._codebook
            cb.embedding_sum.copy_(torch.randn(cb.embedding_sum.shape, generator=gen) * scale * 0.7 ** level)
            cb.cluster_usage.fill_(1.0)
            cb._initialized.fill_(1.0)
            cb.register_buffer("_embedding", None, persistent=False)  # drop moshi's cached embedding


def make_tiny_mimi(seed: int = 0, bins: int = 64, config: dict | None = None) -> MimiModel:
    """A tiny random Mimi through moshi's `loaders.get_mimi`, 8 active codebooks, eval mode."""
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, config or tiny_mimi_config(bins), num_codebooks=8)
    gaussian_codebooks(mimi, seed)
    return mimi.eval()


_TOKENIZER_TEXT = """\
The lamp on the northern rock had burned every night for ninety years.
She climbed the spiral stairs at dusk and wound the clockwork.
In winter the supply boat came only twice, bringing oil and flour.
The river rises in a field of reeds and gathers three streams.
Children fish from the bridge in summer and count the passing boats.
Near the sea the river widens and grows brown with silt.
Herons stand in the shallows at low tide, waiting without a sound.
The ferryman says the current is different every single day.
A small boat drifted into the cove with nobody aboard.
Its sail was patched with a map of a coast she did not know.
"""


def write_tokenizer(path: Path, vocab_size: int = TEXT_CARD) -> Path:
    """Train a sentencepiece unigram model on a few lines; ids 0-3 = unk, bos, eos, pad (pad 3 as Moshi)."""
    path = Path(path)
    text = path.parent / "tokenizer_corpus.txt"
    text.write_text(_TOKENIZER_TEXT * 4)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=True, num_threads=1, minloglevel=2)
    text.unlink()
    return path.with_suffix(".model")


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, card: int = 64,
                          context: int = 24) -> dict[str, tp.Any]:
    """Write a tiny Moshi checkpoint loadable by moshi's `CheckpointInfo` into `directory`.

    Returns a dict: `root`, `hf_repo` (a placeholder, never resolved), `config_path`, `moshi_weights`,
    `mimi_weights`, `tokenizer`, `mimi_config_path` (Paths), `lm_config`, `mimi_config` (the dicts), and
    `cli_args` (the `moshi-eval` checkpoint arguments naming these files).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    lm_config = tiny_lm_config(card=card, context=context)
    mimi_config = tiny_mimi_config(bins=card)

    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config, device="cpu", dtype=torch.float32)
    moshi_weights = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(moshi_weights))

    mimi = make_tiny_mimi(seed, config=mimi_config)
    mimi_weights = root / "mimi.safetensors"
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(mimi_weights))
    mimi_config_path = root / "mimi_config.json"
    mimi_config_path.write_text(json.dumps(mimi_config, indent=1))

    tokenizer = write_tokenizer(root / "tokenizer.model", vocab_size=lm_config["text_card"])

    # config.json as in a Moshi HF repo: LM kwargs plus the file names the loader pops.
    raw_config = dict(lm_config, moshi_name=moshi_weights.name, mimi_name=mimi_weights.name,
                      tokenizer_name=tokenizer.name, model_type="moshi")
    config_path = root / "config.json"
    config_path.write_text(json.dumps(raw_config, indent=1))
    return {
        "root": root, "hf_repo": TINY_HF_REPO, "config_path": config_path, "moshi_weights": moshi_weights,
        "mimi_weights": mimi_weights, "tokenizer": tokenizer, "mimi_config_path": mimi_config_path,
        "lm_config": lm_config, "mimi_config": mimi_config,
        "cli_args": ["--hf-repo", TINY_HF_REPO, "--moshi-weight", str(moshi_weights),
                     "--mimi-weight", str(mimi_weights), "--tokenizer", str(tokenizer),
                     "--config", str(config_path), "--mimi-config", str(mimi_config_path)],
    }


def write_lora_adapters(base: dict, root: Path, rank: int, scaling: float, std: float,
                        seed: int = 5) -> tuple[Path, Path, tp.Any]:
    """LoRA adapters for the tiny checkpoint `base` in moshi-finetune's layout: moshi's own
    `replace_all_linear_with_lora` on the base model, every A and B drawn from N(0, std) (seeded), saved as
    `root/lora.safetensors`, with `root/lora_config.json` (the base config saying `lora: true`). Returns the two
    paths and the LoRA model itself."""
    from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora
    lora_config = root / "lora_config.json"
    config = json.loads(base["config_path"].read_text())
    lora_config.write_text(json.dumps(dict(config, lora=True, lora_rank=rank, lora_scaling=scaling)))
    torch.manual_seed(seed)
    model = loaders.get_moshi_lm(str(base["moshi_weights"]), lm_kwargs=base["lm_config"], device="cpu",
                                 dtype=torch.float32)
    replace_all_linear_with_lora(model, rank, scaling, device="cpu")
    adapters = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part).weight
                torch.nn.init.normal_(weight, std=std)
                adapters[f"{name}.{part}.weight"] = weight.detach().clone()
    lora_weights = root / "lora.safetensors"
    save_file(adapters, str(lora_weights))
    return lora_config, lora_weights, model


def load_tiny_checkpoint(files: dict, dtype: torch.dtype = torch.float32):
    """(lm, mimi, tokenizer) from `write_tiny_checkpoint`'s files through moshi's real `CheckpointInfo`."""
    info = loaders.CheckpointInfo.from_hf_repo(
        files["hf_repo"], moshi_weights=files["moshi_weights"], mimi_weights=files["mimi_weights"],
        tokenizer=files["tokenizer"], config_path=files["config_path"],
        mimi_config_path=files["mimi_config_path"])
    return info.get_moshi(device="cpu", dtype=dtype), info.get_mimi(device="cpu"), info.get_text_tokenizer()


# ---------------------------------------------------------------------------------------------------
# FLAC writer: verbatim subframes, 16-bit mono (sphn decodes FLAC but does not encode it).

_FLAC_RATE_CODES = {8000: 0b0100, 16000: 0b0101, 22050: 0b0110, 24000: 0b0111, 32000: 0b1000,
                    44100: 0b1001, 48000: 0b1010, 96000: 0b1011}


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's UTF-8-like coding of the frame number."""
    if n < 0x80:
        return bytes([n])
    for length in range(2, 7):
        if n < 1 << (5 * length + 1):
            out = [0x80 | ((n >> (6 * i)) & 0x3F) for i in range(length - 1)][::-1]
            first = ((0xFF << (8 - length)) & 0xFF) | (n >> (6 * (length - 1)))
            return bytes([first] + out)
    raise ValueError(f"frame number {n} too large")


def write_flac(path: str | Path, pcm: np.ndarray, sample_rate: int, block_size: int = 4096) -> Path:
    """Write `pcm` `[S]` float in [-1, 1] as a 16-bit mono FLAC file (verbatim subframes, valid CRCs/MD5)."""
    path = Path(path)
    samples = (np.clip(np.asarray(pcm, dtype=np.float64), -1, 1) * 32767).round().astype(np.int16)
    if samples.ndim != 1 or samples.shape[0] == 0:
        raise ValueError(f"pcm: expected a non-empty 1-D array, got shape {samples.shape}")
    md5 = hashlib.md5(samples.astype("<i2").tobytes()).digest()
    total = samples.shape[0]
    info = (block_size.to_bytes(2, "big") + block_size.to_bytes(2, "big") + (0).to_bytes(3, "big")
            + (0).to_bytes(3, "big")
            + ((sample_rate << 44) | (0 << 41) | (15 << 36) | total).to_bytes(8, "big") + md5)
    out = bytearray(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)  # last block: STREAMINFO
    rate_code = _FLAC_RATE_CODES.get(sample_rate, 0)
    for number, start in enumerate(range(0, total, block_size)):
        block = samples[start: start + block_size]
        header = bytearray([0xFF, 0xF8, (0b0111 << 4) | rate_code, 0b0000_1000])  # size at end, mono, 16 bit
        header += _utf8_number(number) + (len(block) - 1).to_bytes(2, "big")
        header.append(_crc8(bytes(header)))
        frame = header + bytes([0b0000_0010]) + block.astype(">i2").tobytes()  # VERBATIM subframe
        out += frame + _crc16(bytes(frame)).to_bytes(2, "big")
    path.write_bytes(bytes(out))
    return path


def synthetic_speechlike(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """`[S]` float32: gliding harmonic tones, noise bursts and pauses (seeded)."""
    rng = np.random.default_rng(seed)
    total = int(round(seconds * sample_rate))
    parts, size = [], 0
    while size < total:
        n = int(rng.uniform(0.1, 0.5) * sample_rate)
        t = np.arange(n) / sample_rate
        kind = rng.integers(3)
        if kind == 0:
            f0 = rng.uniform(100, 250) * (1 + 0.2 * t)
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            seg = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2
        elif kind == 1:
            seg = rng.standard_normal(n) * 0.05
        else:
            seg = np.zeros(n)
        parts.append(seg)
        size += n
    return np.concatenate(parts)[:total].astype(np.float32)


def write_librilight_folder(root: str | Path, books: int = 3, chapters: int = 2,
                            seconds: float | tp.Sequence[float] = 3.0, sample_rate: int = 16000,
                            seed: int = 0, metadata: bool = True) -> Path:
    """A LibriLight-layout folder `<root>/<speaker>/<book>/<chapter>.flac` of synthetic 16-bit mono FLAC.

    Speakers `spk<i>` (one book each, `book<i>`), chapters `ch<j>` numbered from 1 (natural order: ch2
    before ch10). `seconds`: one duration for every chapter, or one per chapter (book-major order).
    With `metadata`, a `.json` beside each file (speaker, book, chapter, duration, sample_rate).
    """
    root = Path(root)
    count = books * chapters
    durations = [float(seconds)] * count if isinstance(seconds, (int, float)) else [float(s) for s in seconds]
    if len(durations) != count:
        raise ValueError(f"seconds: expected one value or {count} values, got {len(durations)}")
    for b in range(books):
        folder = root / f"spk{b}" / f"book{b}"
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(chapters):
            duration = durations[b * chapters + c]
            pcm = synthetic_speechlike(duration, sample_rate, seed=seed * 1000 + b * 100 + c)
            audio = write_flac(folder / f"ch{c + 1}.flac", pcm, sample_rate)
            if metadata:
                meta = {"speaker": f"spk{b}", "book": f"book{b}", "chapter": c + 1,
                        "duration": len(pcm) / sample_rate, "sample_rate": sample_rate}
                audio.with_suffix(".json").write_text(json.dumps(meta))
    return root
