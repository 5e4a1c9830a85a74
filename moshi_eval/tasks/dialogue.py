"""Text and audio cross-entropy of a streaming Moshi model on two-speaker dialogues: moshi-finetune's loss, exact.

A batch is codes `[B, 1 + n_q, T]` laid out as `LMModel.forward` takes them (row 0 the text stream, rows
1 .. dep_q the model's audio codebooks, the rest the user's audio), `-1` where a stream has no token. Each batch is
streamed through `moshi_patch.teacher_force` (`LMGen.step_with_logits`, `chunk` frames per call): the model's
text and audio teacher forced with the batch's own tokens, the user's audio as the user input. The logits are
those of `LMModel.forward` on the same codes (the model in its streaming state: KV cache, TTT weights), and the
positions scored are exactly those of forward's masks:

    text_mask[b, t]     = codes[b, 0, t] != -1          and t < T - delays[0]
    audio_mask[b, k, t] = codes[b, 1 + k, t] != -1      and t < T - delays[1 + k]      (T: the batch's width)

The numbers are token-weighted means over the whole set (a sum of cross-entropies over a count of tokens, nats),
not a mean of batch means:
- `text_ce`, `audio_ce`, `codebook_{k}_ce`: plain means; `text_perplexity`, `audio_perplexity`: their exp;
- `text_ce_weighted`: targets equal to the text padding id or the end-of-padding id weigh `text_padding_weight`,
  `audio_ce_weighted`: codebook 0 weighs `first_codebook_weight`: moshi-finetune's `compute_loss_with_mask`
  (sum(ce * w) / sum(w)) over the set; `loss` = their sum, its training loss;
- `text_accuracy`: argmax == target over the non-padding text targets;
- `text_tokens`, `audio_tokens`, `sequences` (items with a target); `audio_ce@F`, `text_ce@F` at `report_at`;
- `batch_mean_loss`: the mean over batches of each batch's own `loss`, what moshi-finetune's `evaluate()` averages
  (docs/dialogues.md: how to get its very batches).
The per-frame curve (`DialogueResult.curve`) is the mean over the items reaching each frame.
"""
from dataclasses import dataclass, field, replace
import csv
import datetime
import hashlib
import io
import json
import math
import os
from pathlib import Path
import sys
import time
import typing as tp
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moshi_patch import LMGen, teacher_force

from .. import distributed
from ..config import DialogueConfig, frame_list, positive_float, positive_int
from ..data.codes import device_kind, encoding_setting
from ..data.dialogues import DialogueBatches
from ..data.librilight import DataError
from ..files.folder import OutputFolder, folder_command
from ..files.hashing import FileHasher
from ..scoring.model_call import caller_ranks, check_model, score_model
from ..scoring.sequences import DEFAULT_CHUNK, NonFiniteLossError
from ..scoring.streaming import StreamingVerifier
from .base import chunk_summary, sum_chunk_summaries, versions
from .likelihood import kv_sized_to

TASK = "dialogue"
UNITS_DIR = "dialogues"
CURVE_CSV = "curve.csv"
# `audio_ce@F` and `text_ce@F`: token means over frames F - 12 .. F + 12 (2 s at 12.5 Hz), steadier than one frame.
REPORT_HALF_WINDOW = 12


# --- sums over tokens --------------------------------------------------------------------------------------------

@dataclass
class DialogueSums:
    """What scored tokens add up to, per frame index `t` (F frames): cross-entropy sums (nats, float64) and
    token counts, from which every metric follows for any weights. Batches and ranks add (`+`)."""
    text_ce: np.ndarray              # [F] sum of text CE over the valid text targets at t
    text_tokens: np.ndarray          # [F] their count
    text_padding_ce: np.ndarray      # [F] the part of `text_ce` on padding / end-of-padding targets
    text_padding_tokens: np.ndarray  # [F] their count
    text_correct: np.ndarray         # [F] argmax == target, non-padding targets only
    audio_ce: np.ndarray             # [K, F] sum of audio CE per codebook
    audio_tokens: np.ndarray         # [K, F] their count
    items: np.ndarray                # [F] items with a target at or after t (those "reaching" t)
    sequences: int = 0               # items with a target
    batches: int = 0

    ARRAYS: tp.ClassVar[tuple[str, ...]] = ("text_ce", "text_tokens", "text_padding_ce", "text_padding_tokens",
                                            "text_correct", "audio_ce", "audio_tokens", "items")

    @classmethod
    def empty(cls, num_codebooks: int, frames: int = 0) -> "DialogueSums":
        f, i = (lambda *s: np.zeros(s, np.float64)), (lambda *s: np.zeros(s, np.int64))
        return cls(f(frames), i(frames), f(frames), i(frames), i(frames), f(num_codebooks, frames),
                   i(num_codebooks, frames), i(frames))

    @property
    def num_frames(self) -> int:
        return int(self.text_ce.shape[-1])

    def padded(self, frames: int) -> "DialogueSums":
        """The same sums over `frames >= num_frames` frames (zeros after)."""
        pad = frames - self.num_frames
        if pad == 0:
            return self
        arrays = {name: np.pad(getattr(self, name), [(0, 0)] * (getattr(self, name).ndim - 1) + [(0, pad)])
                  for name in self.ARRAYS}
        return replace(self, **arrays)

    def __add__(self, other: "DialogueSums") -> "DialogueSums":
        if self.audio_ce.shape[0] != other.audio_ce.shape[0]:
            raise ValueError(f"sums of {self.audio_ce.shape[0]} and {other.audio_ce.shape[0]} audio codebooks.")
        frames = max(self.num_frames, other.num_frames)
        a, b = self.padded(frames), other.padded(frames)
        return DialogueSums(**{name: getattr(a, name) + getattr(b, name) for name in self.ARRAYS},
                            sequences=a.sequences + b.sequences, batches=a.batches + b.batches)

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{name: getattr(self, name) for name in self.ARRAYS},
                "counts": np.array([self.sequences, self.batches], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: tp.Mapping[str, np.ndarray]) -> "DialogueSums":
        sequences, batches = (int(v) for v in arrays["counts"])
        return cls(**{name: np.asarray(arrays[name]) for name in cls.ARRAYS}, sequences=sequences, batches=batches)

    def checksum(self) -> str:
        h = hashlib.sha256()
        for name, value in sorted(self.arrays().items()):
            h.update(f"{name}|{value.dtype}|{value.shape}|".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()


@dataclass
class DialogueCurve:
    """Per frame index: the items reaching it and the token-mean text and audio CE there (NaN: no token)."""
    items: np.ndarray          # [F] int64
    text_tokens: np.ndarray    # [F] int64
    text_ce: np.ndarray        # [F] float64
    audio_tokens: np.ndarray   # [F] int64 (all codebooks)
    audio_ce: np.ndarray       # [F] float64 (all codebooks, unweighted)

    @classmethod
    def of(cls, sums: DialogueSums) -> "DialogueCurve":
        audio_tokens = sums.audio_tokens.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return cls(sums.items.copy(), sums.text_tokens.copy(), sums.text_ce / sums.text_tokens, audio_tokens,
                       sums.audio_ce.sum(0) / audio_tokens)

    def csv(self) -> bytes:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["frame", "items", "text_tokens", "text_ce", "audio_tokens", "audio_ce"])
        for t in range(self.items.shape[0]):
            writer.writerow([t, int(self.items[t]), int(self.text_tokens[t]), _csv_float(self.text_ce[t]),
                             int(self.audio_tokens[t]), _csv_float(self.audio_ce[t])])
        return buf.getvalue().encode()


def _csv_float(value: float) -> str:
    return "" if not math.isfinite(value) else repr(float(value))


def dialogue_metrics(sums: DialogueSums, text_padding_weight: float = 1.0, first_codebook_weight: float = 1.0,
                     report_at: tp.Sequence[int] = (), half_window: int = REPORT_HALF_WINDOW) -> dict[str, float]:
    """The flat `dialogue/...` metrics of `sums` (see the module docstring). A mean with no token is absent, never
    NaN; `loss` needs both weighted means."""
    m: dict[str, float] = {}
    text_n, audio_n = int(sums.text_tokens.sum()), int(sums.audio_tokens.sum())
    if text_n:
        ce, pad_ce = float(sums.text_ce.sum()), float(sums.text_padding_ce.sum())
        pad_n = int(sums.text_padding_tokens.sum())
        m[f"{TASK}/text_ce"] = ce / text_n
        m[f"{TASK}/text_perplexity"] = math.exp(ce / text_n)
        weight = (text_n - pad_n) + text_padding_weight * pad_n
        m[f"{TASK}/text_ce_weighted"] = ((ce - pad_ce) + text_padding_weight * pad_ce) / weight
        if text_n > pad_n:
            m[f"{TASK}/text_accuracy"] = int(sums.text_correct.sum()) / (text_n - pad_n)
    if audio_n:
        per_codebook_ce, per_codebook_n = sums.audio_ce.sum(1), sums.audio_tokens.sum(1)
        m[f"{TASK}/audio_ce"] = float(per_codebook_ce.sum()) / audio_n
        m[f"{TASK}/audio_perplexity"] = math.exp(m[f"{TASK}/audio_ce"])
        w = np.ones(per_codebook_ce.shape[0])
        w[0] = first_codebook_weight
        m[f"{TASK}/audio_ce_weighted"] = float((w * per_codebook_ce).sum() / (w * per_codebook_n).sum())
        for k in range(per_codebook_ce.shape[0]):
            if per_codebook_n[k]:
                m[f"{TASK}/codebook_{k}_ce"] = float(per_codebook_ce[k] / per_codebook_n[k])
    if f"{TASK}/text_ce_weighted" in m and f"{TASK}/audio_ce_weighted" in m:
        m[f"{TASK}/loss"] = m[f"{TASK}/text_ce_weighted"] + m[f"{TASK}/audio_ce_weighted"]
    for frame in report_at:
        lo, hi = max(0, frame - half_window), frame + half_window + 1
        for stream, total, count in (("audio", sums.audio_ce.sum(0), sums.audio_tokens.sum(0)),
                                     ("text", sums.text_ce, sums.text_tokens)):
            n = int(count[lo:hi].sum())
            if frame < sums.num_frames and n:
                m[f"{TASK}/{stream}_ce@{frame}"] = float(total[lo:hi].sum()) / n
    m[f"{TASK}/text_tokens"] = float(text_n)
    m[f"{TASK}/audio_tokens"] = float(audio_n)
    m[f"{TASK}/sequences"] = float(sums.sequences)
    return m


# --- one batch ---------------------------------------------------------------------------------------------------

@dataclass
class _Batch:
    """A batch checked and laid out for `teacher_force`: the items with a target, and forward's masks."""
    text: torch.Tensor           # [B', T] CPU: forced text (-1: no input)
    audio: torch.Tensor          # [B', dep_q, T] CPU: the model's audio
    user: torch.Tensor           # [B', Ku, T] CPU: the user's audio (-1: no input)
    lengths: list[int]           # frames of the model's audio of each row
    rows: int                    # B'' <= B': the real items (a last row may only lengthen the stream)
    text_mask: torch.Tensor      # [B'', T] bool: forward's text_mask
    audio_mask: torch.Tensor     # [B'', dep_q, T] bool: forward's mask
    reach: torch.Tensor          # [B''] 1 + the last frame with a target
    frames: int                  # frames to stream: max(reach)


def _prepare(lm_model: tp.Any, codes: tp.Any, name: str) -> _Batch | None:
    """Check a batch (ValueError / TypeError naming it) and lay it out; None if no item has a target."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of codes [B, 1 + n_q, T], got {type(codes).__name__}.")
    K = 1 + lm_model.n_q
    if codes.dim() != 3 or codes.shape[1] != K or codes.shape[0] == 0 or codes.shape[2] == 0:
        raise ValueError(f"{name}: expected codes [B, {K}, T] (text, the model's {lm_model.dep_q} audio codebooks, "
                         f"the user's {lm_model.n_q - lm_model.dep_q}), got shape {tuple(codes.shape)}.")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"{name}: codes must hold integer tokens, got dtype {codes.dtype}.")
    codes = codes.detach().to("cpu", torch.long)
    B, _, T = codes.shape
    dep_q = lm_model.dep_q
    for rows, card, what in ((slice(0, 1), lm_model.text_card, "text"), (slice(1, K), lm_model.card, "audio")):
        part = codes[:, rows]
        if part.min() < -1 or part.max() >= card:
            raise ValueError(f"{name}: {what} tokens must be -1 (no token) or in [0, {card}), got values in "
                             f"[{int(part.min())}, {int(part.max())}] (a tokenizer or codec that does not fit the "
                             "model?).")
    text, audio, user = codes[:, 0], codes[:, 1:1 + dep_q], codes[:, 1 + dep_q:]
    present = audio != -1                                                      # [B, dep_q, T]
    lengths = present.all(dim=1).long().cumprod(dim=-1).sum(-1)              # leading frames with every codebook
    frame = torch.arange(T)
    inside = frame[None, :] < lengths[:, None]
    wrong = present != inside[:, None, :]
    if wrong.any():
        b, k, t = (int(i) for i in wrong.nonzero()[0])
        hole = int(lengths[b])
        k0 = int((~present[b, :, hole]).nonzero()[0, 0])
        raise ValueError(f"{name}: item {b}: the model's audio has no token (-1) at codebook {k0}, frame {hole}, but "
                         f"a token after it (codebook {k}, frame {t}): the streaming model's audio must be tokens up "
                         "to the item's length and -1 after (padding at the end only).")
    delays = torch.tensor(lm_model.delays[:1 + dep_q])
    text_mask = (text != -1) & (frame[None, :] < T - int(delays[0]))
    audio_mask = present & (frame[None, None, :] < T - delays[1:, None])
    targets = text_mask | audio_mask.any(dim=1)                               # [B, T]
    keep = targets.any(dim=1).nonzero()[:, 0]
    if keep.numel() == 0:
        return None
    for b in keep.tolist():
        if int(lengths[b]) == 0:
            raise ValueError(f"{name}: item {b} has text targets but none of the model's audio: an item needs at "
                             "least its first frame of audio to be streamed.")
    reach = T - targets[keep].flip(-1).int().argmax(dim=-1)                 # 1 + the last frame with a target
    frames = int(reach.max())
    text, audio, user = text[keep], audio[keep], user[keep]
    lens = [int(lengths[b]) for b in keep.tolist()]
    rows = len(lens)
    if max(lens) < frames:
        # Text targets after every item's audio (moshi-finetune's text length quirk): the driver streams up to the
        # longest audio, so a last row with `frames` frames of audio (its outputs never read) streams them all.
        # The rows of a batch never see each other.
        text = torch.cat([text, torch.full((1, T), -1, dtype=torch.long)])
        audio = torch.cat([audio, torch.zeros((1, dep_q, T), dtype=torch.long)])
        user = torch.cat([user, torch.full((1,) + tuple(user.shape[1:]), -1, dtype=torch.long)])
        lens.append(frames)
    return _Batch(text, audio, user, lens, rows, text_mask[keep], audio_mask[keep], reach, frames)


def score_batch(lm_gen: LMGen, codes: torch.Tensor, chunk: int = DEFAULT_CHUNK, name: str = "batch",
                text_padding_id: int | None = None, end_of_padding_id: int | None = None) -> DialogueSums:
    """The sums of one batch `[B, 1 + n_q, T]` streamed through `lm_gen.step_with_logits` (`chunk` frames per
    call), the model's streams teacher forced with the batch's tokens. `lm_gen` must not be streaming; the caller
    puts the model in eval mode under no_grad.

    Raises:
        TypeError / ValueError naming `name` for a bad batch; NonFiniteLossError: a non-finite cross-entropy.
    """
    lm_model = lm_gen.lm_model
    K = lm_model.dep_q
    plan = _prepare(lm_model, codes, name)
    if plan is None:
        return replace(DialogueSums.empty(K), batches=1)
    pad_id = lm_model.text_padding_token_id if text_padding_id is None else text_padding_id
    eop_id = lm_model.end_of_text_padding_id if end_of_padding_id is None else end_of_padding_id
    device = lm_model.device
    n, L = plan.rows, plan.frames
    text_target = plan.text[:n].to(device)
    audio_target = plan.audio[:n].to(device)
    text_mask, audio_mask = plan.text_mask.to(device), plan.audio_mask.to(device)
    padding = text_mask & ((text_target == pad_id) | (text_target == eop_id))
    f64 = dict(dtype=torch.float64, device=device)
    text_ce, text_pad_ce = torch.zeros(L, **f64), torch.zeros(L, **f64)
    audio_ce = torch.zeros(K, L, **f64)
    text_correct = torch.zeros(L, dtype=torch.long, device=device)
    with kv_sized_to(lm_model, L + lm_gen.max_delay):
        for c in teacher_force(lm_gen, plan.audio, text=plan.text, user=plan.user, lengths=plan.lengths, chunk=chunk):
            s, e = c.start, min(c.stop, L)
            if s >= L:
                continue
            m, tgt = text_mask[:, s:e], text_target[:, s:e]
            logits = c.logits.text_logits[:n, 0, :e - s]                          # [n, f, V]
            ce = _masked_ce(logits, tgt, m)
            text_ce[s:e] += ce.double().sum(0)
            text_pad_ce[s:e] += torch.where(padding[:, s:e], ce, 0.0).double().sum(0)
            hit = (logits.argmax(-1) == tgt) & m & ~padding[:, s:e]
            text_correct[s:e] += hit.sum(0)
            if K:
                audio = c.logits.audio_logits[:n, :, :e - s]                       # [n, K, f, card]
                audio_ce[:, s:e] += _masked_ce(audio, audio_target[:, :, s:e], audio_mask[:, :, s:e]).double().sum(0)
    frame = torch.arange(L)
    sums = DialogueSums(
        text_ce=text_ce.cpu().numpy(), text_tokens=plan.text_mask[:, :L].sum(0).numpy(),
        text_padding_ce=text_pad_ce.cpu().numpy(), text_padding_tokens=padding[:, :L].sum(0).cpu().numpy(),
        text_correct=text_correct.cpu().numpy(), audio_ce=audio_ce.cpu().numpy(),
        audio_tokens=plan.audio_mask[:, :, :L].sum(0).numpy(),
        items=(frame[None, :] < plan.reach[:, None]).sum(0).numpy(), sequences=n, batches=1)
    bad = ~np.isfinite(sums.text_ce) | ~np.isfinite(sums.audio_ce).all(0)
    if bad.any():
        t = int(np.nonzero(bad)[0][0])
        stream = "text" if not math.isfinite(sums.text_ce[t]) else \
            f"audio codebook {int(np.nonzero(~np.isfinite(sums.audio_ce[:, t]))[0][0])}"
        raise NonFiniteLossError(f"non-finite cross-entropy in {name} at frame {t} ({stream}). Check the model "
                                 "weights and dtype.", sequence_id=name, frame=t)
    return sums


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy float32 `[...]` of logits `[..., V]` (any float dtype, computed in float32 as moshi-finetune)
    against `target [...]`, 0 where `mask` is False (masked targets may be -1, their logits anything)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.clamp(min=0).reshape(-1),
                         reduction="none").view(target.shape)
    return torch.where(mask, ce, 0.0)


def batch_digest(codes: torch.Tensor) -> str:
    """sha256 of a batch's shape and tokens: what identifies in-memory batches in results and resume units."""
    c = codes.detach().to("cpu", torch.long).contiguous()
    return hashlib.sha256(f"{tuple(c.shape)}|".encode() + c.numpy().tobytes()).hexdigest()


# --- the evaluator -----------------------------------------------------------------------------------------------

@dataclass
class DialogueResult:
    """The dialogue task's numbers: flat `metrics` (`dialogue/...`), the `sums` they come from, the per-frame
    `curve`, the `config` they depend on and the `runtime`. `resumed`: batches a store held already."""
    metrics: dict[str, float]
    sums: DialogueSums
    config: dict
    runtime: dict
    resumed: int = 0
    is_main: bool = True
    curve: DialogueCurve = field(init=False)

    task = TASK

    def __post_init__(self) -> None:
        self.curve = DialogueCurve.of(self.sums)

    def to_dict(self) -> dict:
        s = self.sums
        return {
            "config": self.config,
            "conventions": {
                "scoring": "each batch streamed through LMGen.step_with_logits (moshi_patch.teacher_force), the "
                           "model's text and audio teacher forced with the batch's tokens, the user's audio as input",
                "positions": "those of LMModel.forward's text_mask and mask: target != -1 and t < T - delay",
                "means": "token-weighted over the whole set (sum of cross-entropy / count), nats",
                "weighted": "moshi-finetune compute_loss_with_mask: text padding and end-of-padding targets weigh "
                            "text_padding_weight, audio codebook 0 weighs first_codebook_weight; loss = "
                            "text_ce_weighted + audio_ce_weighted",
                "text_accuracy": "argmax == target over the non-padding text targets",
                "curve": f"{CURVE_CSV}: per frame, the token mean over the items reaching it",
            },
            "counts": {"sequences": s.sequences, "batches": s.batches, "text_tokens": int(s.text_tokens.sum()),
                       "text_padding_tokens": int(s.text_padding_tokens.sum()),
                       "audio_tokens": int(s.audio_tokens.sum()),
                       "audio_tokens_per_codebook": [int(v) for v in s.audio_tokens.sum(1)],
                       "frames": s.num_frames},
            "metrics": self.metrics,
            "runtime": self.runtime,
        }

    def write(self, out_dir: str | Path, extra: dict | None = None) -> list[Path] | None:
        """`results.json` and `curve.csv` into `out_dir` (locked while writing; new, or holding a dialogue run of
        this same configuration: `folder.ConfigMismatchError` otherwise). `extra`: more keys for results.json
        (`model`: what identifies the model, default `{"in_memory": True}`). Returns the paths written; on a rank
        other than 0 of a torch.distributed job, writes nothing and returns None (rank 0 writes the same result)."""
        if not self.is_main:
            return None
        extra = dict(extra or {})
        identity = extra.pop("model", None) or {"in_memory": True}
        command = folder_command(out_dir, "DialogueResult.write")
        with OutputFolder(out_dir, TASK, command) as folder:
            folder.check_config({"model": identity, **self.config})
            path = self.write_files(folder, command, identity, extra)
        return [path, folder.path / CURVE_CSV]

    def write_files(self, folder: OutputFolder, command: str, identity: dict, extra: dict | None = None) -> Path:
        """Into `folder` (entered, its configuration checked): curve.csv, then results.json naming its sha256."""
        body = dict(extra or {}, command=command,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    resumed=self.resumed > 0, model=identity, versions=versions(), **self.to_dict())
        return folder.write_results(body, {CURVE_CSV: self.curve.csv()})

    def print_summary(self, out: Path) -> None:
        m, s = self.metrics, self.sums
        lines = [f"moshi-eval dialogues: {s.sequences} sequences in {s.batches} batches, "
                 f"{int(m[f'{TASK}/text_tokens'])} text and {int(m[f'{TASK}/audio_tokens'])} audio tokens"]
        for name in ("loss", "batch_mean_loss", "text_ce", "text_ce_weighted", "text_accuracy", "audio_ce",
                     "audio_ce_weighted", "text_perplexity", "audio_perplexity"):
            if f"{TASK}/{name}" in m:
                lines.append(f"  {TASK}/{name} = {m[f'{TASK}/{name}']:.4f}")
        print("\n".join(lines) + f"\nresults in {Path(out) / 'results.json'}", file=sys.stderr)


class DialogueStore:
    """The dialogue task's resume units in an `OutputFolder`: `dialogues/batch_<i>.npz`, written atomically as each
    batch is scored: the batch's sums, its origin (the folder's configuration digest and model identity), the
    identity of its data (windows and file hashes, or the tokens' digest) and the checksum of its sums. Reused only
    if all of them match; otherwise the batch is scored again and the run says why."""

    def __init__(self, folder: OutputFolder, tag: str = "") -> None:
        self.folder = folder
        self.tag = tag

    def path(self, index: int) -> Path:
        return self.folder.path / UNITS_DIR / f"batch_{index:06d}.npz"

    def load(self, index: int, identity: tp.Any) -> DialogueSums | None:
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                sums = DialogueSums.from_arrays({k: stored[k] for k in stored.files if k != "meta"})
            why = self.folder.why_not_reusable(meta.get("origin"), meta.get("sums_sha256"), sums.checksum())
            if why is None and meta.get("data") != json.loads(json.dumps(identity)):
                why = "its data changed since it was scored (replaced or edited audio, another window)"
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            why, sums = f"unreadable ({type(exc).__name__}: {exc})", None
        if why is not None:
            print(f"moshi-eval: {self.tag}{path}: {why}: scoring the batch again.", file=sys.stderr)
            return None
        return sums

    def save(self, index: int, identity: tp.Any, sums: DialogueSums, meta: dict) -> None:
        document = {"origin": self.folder.origin(), "data": identity, "sums_sha256": sums.checksum(), **meta}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(document)), **sums.arrays())
        self.folder.write_unit(self.path(index).relative_to(self.folder.path), buf.getvalue())


class DialogueEvaluator:
    """Dialogue batches prepared once, scored by every call with a model (as often as wanted, e.g. each eval step
    of a training loop):

        evaluator = DialogueEvaluator(load_dialogues("eval.jsonl", mimi, tokenizer, duration=100.0, batch_size=4),
                                      text_padding_weight=0.5, first_codebook_weight=100.0)
        result = evaluator(lm_model)          # DialogueResult
        wandb.log(result.metrics, step=step)  # dialogue/loss, dialogue/text_ce, dialogue/audio_ce, ...

    Every call scores every batch (the numbers of two calls are comparable), with the model in scoring mode (eval,
    no autograd, restored after, also on an exception). Under torch.distributed (the caller's process group or
    `ranks`) build it and call it on every rank: each rank scores its share of the batches and every rank returns
    the whole set's result; an error on one rank is raised on every rank.

    Args:
        batches: a list (or any re-iterable: not a one-shot iterator or generator) of codes `[B, 1 + n_q, T]` in
            `LMModel.forward`'s layout, `-1` where a stream has no token (the model's audio: padding at the end
            only). `data.dialogues.DialogueBatches` encodes a moshi-finetune jsonl lazily.
        text_padding_weight: weight of padding and end-of-padding text targets in `text_ce_weighted`.
        first_codebook_weight: weight of audio codebook 0 in `audio_ce_weighted`.
        chunk: frames per `step_with_logits` call (the numbers agree across chunks up to float rounding).
        ranks: the ranks to share the batches over (default: the caller's process group, if any).
        verify_streaming: a model with streaming layers this project does not know has its chunked path checked
            against one frame per call first (once per model structure).
        progress: a tqdm bar over the batches (rank 0).
        report_at: frames at which `audio_ce@F` and `text_ce@F` are reported (means over F +- 12 frames).
        threads: torch CPU threads for the call (None: as they are; restored after; `runtime.threads` records it),
            as `LibriLightConfig.threads`.
    Raises:
        TypeError: `batches` is a one-shot iterator or not iterable; ValueError: no batch; ConfigError: a bad option.
    """

    metric_prefix = TASK

    def __init__(self, batches: tp.Iterable[torch.Tensor], *, text_padding_weight: float = 1.0,
                 first_codebook_weight: float = 1.0, chunk: int = DEFAULT_CHUNK,
                 ranks: distributed.Ranks | None = None, verify_streaming: bool = True, progress: bool = False,
                 report_at: tp.Sequence[int] = (), threads: int | None = None) -> None:
        if isinstance(batches, torch.Tensor):
            raise TypeError("batches: expected a list of code tensors [B, 1 + n_q, T], got one tensor: pass "
                            "[codes] for a single batch.")
        if isinstance(batches, tp.Iterator):
            raise TypeError(f"batches: expected a list or another re-iterable of code tensors, got a one-shot "
                            f"{type(batches).__name__}: every call scores every batch again, which a generator "
                            "cannot give twice. Pass list(batches).")
        if not isinstance(batches, tp.Iterable):
            raise TypeError(f"batches: expected a list of code tensors [B, 1 + n_q, T], got "
                            f"{type(batches).__name__}.")
        if isinstance(batches, tp.Sized) and len(batches) == 0:
            raise ValueError("batches: expected at least one batch of codes, got none.")
        self.batches = batches
        self.text_padding_weight = positive_float("text_padding_weight", text_padding_weight)
        self.first_codebook_weight = positive_float("first_codebook_weight", first_codebook_weight)
        self.chunk = tp.cast(int, positive_int("chunk", chunk))
        self.report_at = frame_list("report_at", report_at) if report_at else ()
        self.ranks = ranks if ranks is not None else caller_ranks()
        self.verify_streaming = verify_streaming
        self.progress = progress
        self.threads = positive_int("threads", threads, optional=True)
        self._verify = StreamingVerifier()

    def identity(self) -> dict:
        """What the numbers depend on besides the model and the data's digest (results.json's `config`)."""
        return {"text_padding_weight": self.text_padding_weight, "first_codebook_weight": self.first_codebook_weight,
                "chunk": self.chunk, "report_at": list(self.report_at)}

    def _mine(self) -> tp.Iterator[tuple[int, tp.Callable[[], torch.Tensor], tp.Any]]:
        """This rank's batches: (index, the batch when asked, its data identity for the store or None)."""
        batches, ranks = self.batches, self.ranks
        if isinstance(batches, tp.Sequence):
            shape = getattr(batches, "batch_shape", None)
            costs = [math.prod(shape(i)) if callable(shape) else math.prod(batches[i].shape[::2])
                     for i in range(len(batches))]
            owners = distributed.assign(costs, ranks.world)
            unit = getattr(batches, "unit_identity", None)
            for i, owner in enumerate(owners):
                if owner == ranks.rank:
                    yield i, (lambda i=i: batches[i]), (unit(i) if callable(unit) else None)
        else:
            # Only iterable: the batches are not known before they come, so they go round-robin.
            for i, batch in enumerate(batches):
                if i % ranks.world == ranks.rank:
                    yield i, (lambda batch=batch: batch), None

    def __call__(self, lm_model: tp.Any, store: DialogueStore | None = None) -> DialogueResult:
        """Score every batch with `lm_model` (a moshi LMModel). `store`: finished batches kept across runs (resume).

        Raises:
            TypeError / ValueError: not an LMModel, streaming already, or a bad batch (named); DataError: no batch
            has a target; NonFiniteLossError; RankFailedError: another rank failed; StreamingCheckError: a
            streaming layer this project does not know streams in chunks otherwise than frame by frame.
        """
        check_model(lm_model)
        start = time.perf_counter()
        gathered = self.ranks.gather(score_model(self.ranks, lm_model, lambda: self._score(lm_model, store),
                                                 self.threads))
        sums = DialogueSums.empty(lm_model.dep_q)
        digests: dict[int, str] = {}
        runtime: dict[str, tp.Any] = {"score_seconds": 0.0, "encode_seconds": 0.0, "batches_scored_this_run": 0,
                                      "batches_resumed": 0}
        chunks = []
        losses: dict[int, float] = {}
        for part_sums, part_digests, part_runtime, part_chunks, part_losses in gathered:
            sums = sums + part_sums
            digests.update(part_digests)
            losses.update(part_losses)
            for key, value in part_runtime.items():
                runtime[key] = max(runtime[key], value) if key.endswith("seconds") else runtime[key] + value
            chunks.append(part_chunks)
        if sums.sequences == 0:
            raise DataError(f"batches: no item of the {sums.batches} batch(es) has a text or audio target (every "
                            "token -1).")
        data_identity = getattr(self.batches, "identity", None)
        data = data_identity() if callable(data_identity) else {
            "batches": sums.batches,
            "sha256": hashlib.sha256("".join(digests[i] for i in sorted(digests)).encode()).hexdigest()}
        tokens = int(sums.text_tokens.sum() + sums.audio_tokens.sum())
        seconds = runtime["score_seconds"]
        runtime.update(processes=self.ranks.world, device=str(lm_model.device),
                       threads=self.threads or torch.get_num_threads(), tokens_per_s=tokens / seconds
                       if seconds and runtime["batches_scored_this_run"] else None,
                       chunks=sum_chunk_summaries(chunks), total_seconds=time.perf_counter() - start)
        metrics = dialogue_metrics(sums, self.text_padding_weight, self.first_codebook_weight, self.report_at)
        if losses:
            # What moshi-finetune's evaluate() averages: each batch's own weighted loss, batches weighing the same.
            metrics[f"{TASK}/batch_mean_loss"] = math.fsum(losses[i] for i in sorted(losses)) / len(losses)
        return DialogueResult(metrics, sums, {**self.identity(), "data": data}, runtime,
                              resumed=runtime["batches_resumed"], is_main=self.ranks.is_main)

    def _score(self, lm_model: tp.Any, store: DialogueStore | None
               ) -> tuple[DialogueSums, dict[int, str], dict, dict, dict[int, float]]:
        """This rank's batches: their sums, the digest of each in-memory batch, runtime counts, chunk statistics and
        each batch's own weighted loss (moshi-finetune's per-batch eval loss)."""
        if self.verify_streaming:
            # Text is forced here: the path checked is the forced-text one.
            verified = self._verify(lm_model, self.chunk, "forced")
            if verified and self.ranks.is_main and store is not None:
                print(f"moshi-eval: {verified}", file=sys.stderr)
        lm_gen = LMGen(lm_model, use_sampling=False)
        sums = DialogueSums.empty(lm_model.dep_q)
        digests: dict[int, str] = {}
        losses: dict[int, float] = {}
        counts: dict[str, tp.Any] = {"score_seconds": 0.0, "encode_seconds": 0.0, "batches_scored_this_run": 0,
                                     "batches_resumed": 0}
        mine = list(self._mine()) if isinstance(self.batches, tp.Sequence) else None
        total = len(mine) if mine is not None else None
        with tqdm(total=total, unit="batch", desc=f"{self.ranks.tag}{TASK}", dynamic_ncols=True,
                  disable=not self.progress or not self.ranks.is_main) as bar:
            for index, get, unit in (mine if mine is not None else self._mine()):
                name = f"batch {index}"
                identity = unit
                if store is not None:
                    if identity is None:
                        t0 = time.perf_counter()
                        batch = get()
                        counts["encode_seconds"] += time.perf_counter() - t0
                        identity = digests[index] = batch_digest(batch)
                    done = store.load(index, identity)
                    if done is not None:
                        self._batch_loss(losses, index, done)
                        sums = sums + done
                        counts["batches_resumed"] += 1
                        bar.update(1)
                        continue
                t0 = time.perf_counter()
                batch = get()
                t1 = time.perf_counter()
                counts["encode_seconds"] += t1 - t0
                if unit is None and index not in digests:
                    digests[index] = batch_digest(batch)
                part = score_batch(lm_gen, batch, self.chunk, name)
                counts["score_seconds"] += time.perf_counter() - t1
                counts["batches_scored_this_run"] += 1
                if store is not None:
                    store.save(index, identity, part, {"batch": index, "device": str(lm_model.device)})
                self._batch_loss(losses, index, part)
                sums = sums + part
                bar.update(1)
        if store is not None and counts["batches_resumed"]:
            print(f"moshi-eval: {self.ranks.tag}resuming in {store.folder.path}: {counts['batches_resumed']} "
                  f"batches already scored.", file=sys.stderr)
        return sums, digests, counts, chunk_summary(lm_gen), losses

    def _batch_loss(self, losses: dict[int, float], index: int, sums: DialogueSums) -> None:
        loss = dialogue_metrics(sums, self.text_padding_weight, self.first_codebook_weight).get(f"{TASK}/loss")
        if loss is not None:        # moshi-finetune would get NaN (0 / 0) from a batch without text or audio target
            losses[index] = loss


# --- configuration and the runner's task ---------------------------------------------------------------------------

def _load_tokenizer(text_tokenizer: tp.Any) -> tp.Any:
    if isinstance(text_tokenizer, (str, os.PathLike)):
        import sentencepiece
        path = Path(text_tokenizer)
        if not path.is_file():
            raise DataError(f"text_tokenizer: the sentencepiece model {path} does not exist.")
        try:
            return sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        except Exception as exc:     # sentencepiece raises OSError / RuntimeError with its own message
            raise DataError(f"text_tokenizer: cannot load the sentencepiece model {path}: {exc}.") from exc
    if not callable(getattr(text_tokenizer, "encode", None)):
        raise TypeError(f"text_tokenizer: expected a sentencepiece.SentencePieceProcessor or the path of its model, "
                        f"got {type(text_tokenizer).__name__}.")
    return text_tokenizer


class DialogueTask:
    """The dialogue task as the runner runs it (`moshi-eval dialogues`): its identity, its evaluator (batches
    encoded as they are scored; those finished in `--out` never) and its unit of resume (a batch).

    Args:
        config: the data and the scoring options.
        text_tokenizer: the model's sentencepiece processor, or the path of its `.model` file.
    """

    name = TASK
    unit = "batch"
    units_dir = UNITS_DIR

    def __init__(self, config: DialogueConfig, text_tokenizer: tp.Any) -> None:
        if not isinstance(config, DialogueConfig):
            raise TypeError(f"config: expected a DialogueConfig, got {type(config).__name__}.")
        config.validate()
        self.config = config
        self.tokenizer = _load_tokenizer(text_tokenizer)

    def identity(self, device: str | torch.device) -> dict:
        proto = getattr(self.tokenizer, "serialized_model_proto", None)
        return {**self.config.identity(),
                "tokenizer_sha256": hashlib.sha256(proto()).hexdigest() if callable(proto) else None,
                "device": device_kind(device), "encoding": encoding_setting(device)}

    def evaluator(self, mimi: tp.Any, ranks: distributed.Ranks, cache_dir: Path | None, hasher: FileHasher,
                  progress: bool) -> DialogueEvaluator:
        c = self.config
        batches = DialogueBatches(c.jsonl, mimi, self.tokenizer, duration=c.duration, batch_size=c.batch_size,
                                  text_length=c.text_length, drop_last=c.drop_last, max_batches=c.max_batches,
                                  cache_dir=cache_dir, keep=False, hasher=hasher)
        return DialogueEvaluator(batches, text_padding_weight=c.text_padding_weight,
                                 first_codebook_weight=c.first_codebook_weight, chunk=c.chunk, ranks=ranks,
                                 verify_streaming=c.verify_streaming, progress=progress, report_at=c.report_at,
                                 threads=c.threads)

    def store(self, folder: OutputFolder, ranks: distributed.Ranks) -> DialogueStore:
        return DialogueStore(folder, ranks.tag)


__all__ = ["CURVE_CSV", "DialogueConfig", "DialogueCurve", "DialogueEvaluator", "DialogueResult", "DialogueStore",
           "DialogueSums", "DialogueTask", "batch_digest", "dialogue_metrics", "score_batch"]
