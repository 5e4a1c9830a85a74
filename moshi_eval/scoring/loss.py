"""Cross-entropy of Moshi's audio codebooks, per codebook, plain mean and first-codebook weighted.

The weighted mean follows moshi-finetune's `compute_loss_with_mask` (finetune/loss.py): each valid
(codebook, position) entry gets the weight 1, codebook 0 gets `first_codebook_weight_multiplier`
(100 in moshi-finetune's example config), and the loss is `sum_k w_k * ce_k / sum_k w_k` over the valid
entries. Here the sums run over the codebooks of one frame of one sequence, so that every frame has its
own value.
"""
from dataclasses import dataclass

import torch

DEFAULT_FIRST_CODEBOOK_WEIGHT = 100.0


@dataclass
class AudioCE:
    """Cross-entropy of the audio codebooks. Leading dims `[B]` (one frame) or `[B, T]` (several frames).

    Invalid entries hold NaN, never 0.0: a frame with no valid codebook has NaN means.
    """
    codebook_ce: torch.Tensor        # [B, K(, T)] float32: -log p(target) of each codebook
    audio_ce: torch.Tensor           # [B(, T)] float32: plain mean over the valid codebooks
    audio_ce_weighted: torch.Tensor  # [B(, T)] float32: codebook 0 weighted by `first_codebook_weight`
    valid: torch.Tensor              # [B, K(, T)] bool: which entries were counted


def codebook_weights(num_codebooks: int, first_codebook_weight: float = DEFAULT_FIRST_CODEBOOK_WEIGHT,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Weights `[K]` float32: `first_codebook_weight` for codebook 0, 1 for the others."""
    if not first_codebook_weight > 0 or first_codebook_weight == float("inf"):
        raise ValueError(f"first_codebook_weight must be a finite positive number, got {first_codebook_weight}.")
    weights = torch.ones(num_codebooks, dtype=torch.float32, device=device)
    weights[0] = first_codebook_weight
    return weights


def audio_cross_entropy(audio_logits: torch.Tensor, targets: torch.Tensor,
                        first_codebook_weight: float = DEFAULT_FIRST_CODEBOOK_WEIGHT,
                        mask: torch.Tensor | None = None, check_targets: bool = True) -> AudioCE:
    """Cross-entropy of audio logits against target tokens, per codebook and reduced over codebooks.

    Args:
        audio_logits: `[B, K, card]` (one frame, e.g. `StepLogits.audio_logits[:, :, 0]`) or
            `[B, K, T, card]` (as `LMOutput.logits`), any float dtype: computed in float32.
        targets: `[B, K]` or `[B, K, T]` int tokens. A negative target (e.g. -1, Moshi's zero token)
            marks an entry as invalid.
        first_codebook_weight: weight of codebook 0 in `audio_ce_weighted`; the others weigh 1.
        mask: optional bool, broadcastable to `targets`: False marks an entry as invalid (e.g. frames
            beyond a sequence's length). Logits of invalid entries are never read (they may be NaN).
        check_targets: raise on a valid target >= card. The check reads a value on the host (a device
            sync): callers that validated their targets once pass False in their per-step loop.
    Returns:
        AudioCE, invalid entries NaN.
    Raises:
        ValueError: shapes do not match, or a valid target is out of `[0, card)`.
    """
    if audio_logits.dim() not in (3, 4):
        raise ValueError(f"audio_logits must be [B, K, card] or [B, K, T, card], got shape "
                         f"{tuple(audio_logits.shape)}.")
    if tuple(targets.shape) != tuple(audio_logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(audio_logits.shape[:-1])} to match audio_logits "
                         f"{tuple(audio_logits.shape)}, got {tuple(targets.shape)}.")
    if targets.dtype.is_floating_point:
        raise ValueError(f"targets must hold integer tokens, got dtype {targets.dtype}.")
    card = audio_logits.shape[-1]
    valid = targets >= 0
    if mask is not None:
        valid = valid & mask.to(device=targets.device, dtype=torch.bool)
    if check_targets:
        too_big = valid & (targets >= card)
        if too_big.any():
            bad = int(targets[too_big].max())
            raise ValueError(f"targets must be in [0, card={card}) where valid, got token {bad}.")

    logits = audio_logits.float()
    # Invalid entries may hold NaN logits (exec-masked items, undelayed forward outputs): zero them so
    # that nothing non-finite flows through log_softmax, then mark the result NaN.
    logits = torch.where(valid[..., None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    index = torch.where(valid, targets, torch.zeros_like(targets)).long()
    log_probs = torch.log_softmax(logits, dim=-1)
    ce = -log_probs.gather(-1, index[..., None])[..., 0]
    nan = torch.full((), float("nan"), dtype=ce.dtype, device=ce.device)
    codebook_ce = torch.where(valid, ce, nan)

    K = targets.shape[1]
    weights = codebook_weights(K, first_codebook_weight, device=ce.device)
    weights = weights.view(1, K, *([1] * (targets.dim() - 2)))
    valid_f = valid.float()
    ce_or_zero = torch.where(valid, ce, torch.zeros_like(ce))
    count = valid_f.sum(dim=1)
    total_weight = (valid_f * weights).sum(dim=1)
    audio_ce = torch.where(count > 0, ce_or_zero.sum(dim=1) / count.clamp(min=1), nan)
    audio_ce_weighted = torch.where(
        total_weight > 0, (ce_or_zero * weights).sum(dim=1) / total_weight.clamp(min=1e-30), nan)
    return AudioCE(codebook_ce=codebook_ce, audio_ce=audio_ce, audio_ce_weighted=audio_ce_weighted,
                   valid=valid)
