"""`MoshiInferenceModel`: SALMon's `InferenceModel` interface (slp-rl/salmon, `baselines/inference.py`) for a Moshi
checkpoint, so that SALMon's own `salmon.py` scores Moshi unchanged, with the numbers of `moshi-eval likelihood`.

SALMon calls `log_likelihood(wavs)` with the files of a batch as `torchaudio.load` returns them (`[C, S]` tensors
at the file's rate: SALMon's release is 16 kHz, which is the default `sample_rate`) and compares the returned
values pairwise; `to(device)` moves the model. Register it in SALMon's `InferenceModelFactory.get_model`:

    if config["model_type"] == "moshi":
        from moshi_eval.salmon import MoshiInferenceModel
        return MoshiInferenceModel.from_config(config)

with a config such as `{"model_type": "moshi", "hf_repo": "kyutai/moshiko-pytorch-bf16", "text": "zero"}`.
"""
import typing as tp

import numpy as np
import torch

from moshi_patch import LMGen

from .codes import encode_audio, silence_codes
from .data import resample
from .likelihood import NORMALIZATIONS, SILENCE_FRAMES, kv_sized_to
from .scoring import DEFAULT_CHUNK, TEXT_MODES, USER_STREAMS, score_sequences


class MoshiInferenceModel:
    """Log-likelihood of whole recordings under a streaming Moshi model (SALMon's `InferenceModel`).

    Args:
        lm_model: moshi `LMModel`, eval mode. mimi: its codec (`num_codebooks == lm_model.dep_q`).
        sample_rate: rate of the tensors SALMon passes (its files': 16 kHz).
        text, user_stream, chunk: as `moshi-eval likelihood --text --user-stream --chunk`.
        normalization: "sum" (log-likelihood, nats) or "mean" (per token: SALMon's `mean_nll`).
    """

    def __init__(self, lm_model: tp.Any, mimi: tp.Any, sample_rate: int = 16000, text: str = "predicted",
                 user_stream: str = "silence", chunk: int = DEFAULT_CHUNK, normalization: str = "sum") -> None:
        if text not in TEXT_MODES:
            raise ValueError(f"text: expected one of {TEXT_MODES}, got {text!r}.")
        if user_stream not in USER_STREAMS:
            raise ValueError(f"user_stream: expected one of {USER_STREAMS}, got {user_stream!r}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}.")
        if not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"sample_rate: expected a positive integer (Hz), got {sample_rate!r}.")
        self.lm_model, self.mimi = lm_model, mimi
        self.sample_rate, self.text, self.user_stream = sample_rate, text, user_stream
        self.chunk, self.normalization = chunk, normalization
        self._silence: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: tp.Mapping[str, tp.Any]) -> "MoshiInferenceModel":
        """From a SALMon inference config: `hf_repo` and/or local `moshi_weight`, `mimi_weight`, `config`
        (paths), `device`, `dtype`, and the constructor's keyword arguments."""
        from moshi.models import loaders
        from .checkpoint import resolve_device, resolve_dtype
        device = resolve_device(config.get("device"))
        dtype = resolve_dtype(config.get("dtype"), device)
        info = loaders.CheckpointInfo.from_hf_repo(
            config.get("hf_repo", loaders.DEFAULT_REPO), moshi_weights=config.get("moshi_weight"),
            mimi_weights=config.get("mimi_weight"), config_path=config.get("config"),
            mimi_config_path=config.get("mimi_config"))
        lm_model = info.get_moshi(device=device, dtype=dtype).eval()
        mimi = info.get_mimi(device=device).eval()
        options = {k: config[k] for k in ("sample_rate", "text", "user_stream", "chunk", "normalization")
                   if k in config}
        return cls(lm_model, mimi, **options)

    def _codes(self, wav: torch.Tensor, index: int) -> torch.Tensor:
        if not isinstance(wav, torch.Tensor) or wav.dim() not in (1, 2) or wav.shape[-1] == 0:
            shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise ValueError(f"wavs[{index}]: expected a non-empty [C, S] or [S] audio tensor, got {shape}.")
        mono = wav.float().reshape(-1, wav.shape[-1]).mean(dim=0).cpu().numpy().astype(np.float32)
        if not np.isfinite(mono).all():
            raise ValueError(f"wavs[{index}]: audio holds NaN or inf.")
        audio = resample(mono, self.sample_rate, int(self.mimi.sample_rate))
        return encode_audio(self.mimi, audio)[: self.lm_model.dep_q]

    @torch.no_grad()
    def log_likelihood(self, wavs: tp.List[torch.Tensor]) -> torch.Tensor:
        """`[B]` float64 (CPU): each recording's log-likelihood (or per token, with normalization "mean")."""
        if len(wavs) == 0:
            raise ValueError("wavs: expected at least one recording, got an empty list.")
        codes = [self._codes(w, i) for i, w in enumerate(wavs)]
        if self.user_stream == "silence" and self._silence is None:
            n = self.lm_model.n_q - self.lm_model.dep_q
            self._silence = silence_codes(self.mimi, SILENCE_FRAMES)[:n]
        out = torch.empty(len(codes), dtype=torch.float64)
        lm_gen = LMGen(self.lm_model, use_sampling=False)
        with kv_sized_to(self.lm_model, max(int(c.shape[-1]) for c in codes) + lm_gen.max_delay):
            results = list(score_sequences(lm_gen, codes, user_stream=self.user_stream, text=self.text,
                                           silence=self._silence if self.user_stream == "silence" else None,
                                           progress=False, chunk=self.chunk))
        for s in results:
            ce = s.codebook_ce.astype(np.float64)
            total = -float(ce.sum())
            out[s.index] = total if self.normalization == "sum" else total / ce.size
        return out

    def to(self, device: tp.Any) -> "MoshiInferenceModel":
        self.lm_model = self.lm_model.to(device)
        self.mimi = self.mimi.to(device)
        self._silence = None
        return self

    def __str__(self) -> str:
        return f"moshi (text={self.text}, user_stream={self.user_stream}, {self.normalization})"


__all__ = ["MoshiInferenceModel"]
