"""moshi_eval.scoring.loss against a cross-entropy computed by hand and against torch's weighted cross_entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from moshi_eval.scoring.loss import audio_cross_entropy, codebook_weights


def _hand_ce(logits: torch.Tensor, target: int) -> float:
    """-log softmax(logits)[target] with explicit exp/sum in float64."""
    x = logits.double()
    m = x.max()
    return float(m + torch.log(torch.exp(x - m).sum()) - x[target])


def test_one_frame_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    B, K, card = 3, 8, 50
    logits = torch.randn(B, K, card, generator=gen) * 3
    targets = torch.randint(0, card, (B, K), generator=gen)
    out = audio_cross_entropy(logits, targets, first_codebook_weight=100.)
    for b in range(B):
        ces = [_hand_ce(logits[b, k], int(targets[b, k])) for k in range(K)]
        for k in range(K):
            assert out.codebook_ce[b, k].item() == pytest.approx(ces[k], abs=1e-5)
        assert out.audio_ce[b].item() == pytest.approx(sum(ces) / K, abs=1e-5)
        weighted = (100. * ces[0] + sum(ces[1:])) / (100. + K - 1)
        assert out.audio_ce_weighted[b].item() == pytest.approx(weighted, abs=1e-5)
    assert out.codebook_ce.dtype == torch.float32


def test_low_precision_logits_are_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 8, 300, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 300, (2, 8), generator=gen)
    out = audio_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.float().reshape(-1, 300), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(out.codebook_ce.reshape(-1), ref, atol=1e-6, rtol=0)


def test_sequence_with_masks_matches_weighted_torch_cross_entropy():
    """[B, K, T, card] with invalid targets (-1) and a length mask, against F.cross_entropy pooled per frame."""
    gen = torch.Generator().manual_seed(2)
    B, K, T, card = 2, 8, 7, 33
    logits = torch.randn(B, K, T, card, generator=gen)
    targets = torch.randint(0, card, (B, K, T), generator=gen)
    targets[0, 3, 2] = -1          # one codebook of one frame missing
    targets[1, :, 5] = -1          # a whole frame missing
    lengths = torch.tensor([T, 4])
    frame_ok = torch.arange(T)[None, :] < lengths[:, None]            # [B, T]
    # Logits of invalid entries must not leak into the result.
    logits[1, :, 4:] = float("nan")
    logits[0, 3, 2] = float("inf")
    w0 = 7.5
    out = audio_cross_entropy(logits, targets, first_codebook_weight=w0, mask=frame_ok[:, None, :])

    valid = (targets >= 0) & frame_ok[:, None, :]
    assert torch.equal(out.valid, valid)
    for b in range(B):
        for t in range(T):
            ks = [k for k in range(K) if valid[b, k, t]]
            if not ks:
                assert math.isnan(out.audio_ce[b, t].item())
                assert math.isnan(out.audio_ce_weighted[b, t].item())
                assert torch.isnan(out.codebook_ce[b, :, t]).all()
                continue
            lg = logits[b, ks, t]
            tg = targets[b, ks, t]
            plain = F.cross_entropy(lg, tg)
            # moshi-finetune style: per-entry weights (w0 for codebook 0), sum(w * ce) / sum(w).
            w = torch.tensor([w0 if k == 0 else 1. for k in ks])
            per = F.cross_entropy(lg, tg, reduction="none")
            weighted = (per * w).sum() / w.sum()
            assert out.audio_ce[b, t].item() == pytest.approx(plain.item(), abs=1e-5)
            assert out.audio_ce_weighted[b, t].item() == pytest.approx(weighted.item(), abs=1e-5)
            for k in range(K):
                if k in ks:
                    assert out.codebook_ce[b, k, t].item() == pytest.approx(
                        per[ks.index(k)].item(), abs=1e-5)
                else:
                    assert math.isnan(out.codebook_ce[b, k, t].item())
    assert torch.isfinite(out.audio_ce[0]).all()


def test_weight_one_equals_plain_mean_and_weight_changes_result():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 8, 20, generator=gen)
    targets = torch.randint(0, 20, (4, 8), generator=gen)
    one = audio_cross_entropy(logits, targets, first_codebook_weight=1.)
    torch.testing.assert_close(one.audio_ce_weighted, one.audio_ce)
    heavy = audio_cross_entropy(logits, targets, first_codebook_weight=1e6)
    torch.testing.assert_close(heavy.audio_ce_weighted, heavy.codebook_ce[:, 0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=torch.zeros(2, 8, dtype=torch.long) + 20), "card=20"),
    (dict(targets=torch.zeros(2, 7, dtype=torch.long)), "targets must have shape"),
    (dict(targets=torch.zeros(2, 8)), "integer"),
    (dict(first_codebook_weight=0.), "first_codebook_weight"),
])
def test_bad_inputs_raise_named_errors(kwargs, match):
    args = dict(audio_logits=torch.zeros(2, 8, 20), targets=torch.zeros(2, 8, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        audio_cross_entropy(**args)


def test_codebook_weights():
    assert codebook_weights(8, 100.).tolist() == [100.] + [1.] * 7
    with pytest.raises(ValueError, match="first_codebook_weight"):
        codebook_weights(8, float("nan"))
