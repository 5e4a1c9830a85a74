"""`MoshiInferenceModel`: SALMon's `InferenceModel` interface (slp-rl/salmon, `baselines/inference.py`) for a Moshi
checkpoint, so that SALMon's own `salmon.py` scores Moshi unchanged, with the numbers of `moshi-eval likelihood`.

SALMon calls `log_likelihood(wavs)` with the files of a batch as `torchaudio.load` returns them (`[C, S]` tensors
at the file's rate: SALMon's release is 16 kHz, which is the default `sample_rate`) and compares the returned
values pairwise; `to(device)` moves the model. Register it in SALMon's `InferenceModelFactory.get_model`:

    if config["model_type"] == "moshi":
        from moshi_eval.salmon import MoshiInferenceModel
        return MoshiInferenceModel.from_config(config)

with a config such as `{"model_type": "moshi", "hf_repo": "kyutai/moshiko-pytorch-bf16", "text": "zero"}` (every
option: `MoshiInferenceModel.from_config`). The checkpoint is loaded as `moshi-eval` loads it
(`moshi_eval.checkpoint`: frozen, LoRA adapters merged in float32); a config whose files are all local never
touches the network.
"""
import typing as tp

import numpy as np
import torch

from moshi_patch import LMGen

from .data.codes import encode_audio, silence_codes
from .data.librilight import resample
from .files.hashing import FileHasher
from .tasks.likelihood import NORMALIZATIONS, SILENCE_FRAMES, kv_sized_to
from .scoring.model_call import scoring_mode
from .scoring.sequences import DEFAULT_CHUNK, TEXT_MODES, USER_STREAMS, score_sequences


_SOURCE_KEYS = ("hf_repo", "moshi_weight", "mimi_weight", "tokenizer", "config", "mimi_config", "lora_weight",
                "fuse_lora", "checkpoint_dir", "device", "dtype")


class _NoDigests(FileHasher):
    """SALMon keeps no run identity: no sha256 of the weight files (a minute for a 15 GB checkpoint)."""

    def sha256(self, path: tp.Any, st: tp.Any) -> str:
        return "not computed"


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
        """From a SALMon inference config (a JSON object; `model_type` and unknown keys are ignored).

        The checkpoint, loaded as `moshi-eval` loads it (`moshi_eval.checkpoint.resolve_checkpoint`: each file
        given here, or else from `hf_repo`):

        - `hf_repo`: Hugging Face repo of the files not given below; default `kyutai/moshiko-pytorch-bf16`,
          except when `moshi_weight`, `mimi_weight` and `config` are all given (or with `null`): then every
          file is local and nothing is fetched (the network is never touched).
        - `moshi_weight`: the LM weights (a local path, or `hf://owner/repo/file`).
        - `mimi_weight`: the Mimi codec weights.
        - `config`: the LM config, the repo's `config.json`.
        - `mimi_config`: the Mimi config JSON, needed for a codec other than the default Mimi (otherwise its
          weights do not fit moshi's default config).
        - `tokenizer`: the text tokenizer (sentencepiece `.model`). Scoring does not use it: given, it is not
          downloaded from `hf_repo`; with all files local it is not needed at all.
        - `lora_weight`: LoRA adapters (moshi-finetune's `lora.safetensors`; `config` then says `lora: true`).
        - `fuse_lora`: merge the adapters into the weights (default true, in float32, rounded once to `dtype`).
        - `checkpoint_dir`: a moshi-finetune checkpoint folder (config.json and lora.safetensors or
          consolidated.safetensors), instead of `config` and `lora_weight` / `moshi_weight`.
        - `device`: torch device (default cuda if available, else cpu).
        - `dtype`: "float32", "bfloat16" or "float16" (default bfloat16 on cuda, float32 on cpu).

        The scoring options, the constructor's keyword arguments: `sample_rate` (Hz of the tensors SALMon passes,
        default 16000), `text` ("predicted", or a forced text mode, see `TEXT_MODES`), `user_stream`
        ("silence" or "zero"), `chunk` (frames per streaming call), `normalization` ("sum" or "mean").

        Raises:
            CheckpointError: a file missing or unreadable, a download failure, a config that does not fit the
                weights; the message names the config key.
            ValueError: a scoring option out of range.
        """
        from .checkpoint import CheckpointError, check_codec_fits, resolve_checkpoint
        from .config import ModelSource, from_values
        from moshi.models import loaders
        values = dict(config)
        local = all(values.get(key) is not None for key in ("moshi_weight", "mimi_weight", "config"))
        if "hf_repo" not in values and not local:
            values["hf_repo"] = loaders.DEFAULT_REPO
        source = from_values(ModelSource, values)
        try:
            loaded = resolve_checkpoint(source, _NoDigests()).load()
            check_codec_fits(loaded.lm_model, loaded.mimi)
        except CheckpointError as exc:      # the messages name moshi-eval's flags: name the config keys
            message = str(exc)
            for key in sorted(_SOURCE_KEYS, key=len, reverse=True):
                message = message.replace("--" + key.replace("_", "-"), key)
            raise CheckpointError(f"SALMon config: {message}") from exc
        options = {k: config[k] for k in ("sample_rate", "text", "user_stream", "chunk", "normalization")
                   if k in config}
        return cls(loaded.lm_model, loaded.mimi, **options)

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
        with scoring_mode(self.lm_model), \
                kv_sized_to(self.lm_model, max(int(c.shape[-1]) for c in codes) + lm_gen.max_delay):
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
