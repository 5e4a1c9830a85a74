"""Tiny Moshi language models for the tests: seconds on a CPU, the same code paths as Moshi 7B."""
import typing as tp

import torch
from moshi.models.lm import LMModel


def moshi_delays(n_q: int, dep_q: int, max_delay: int = 1) -> list[int]:
    """Moshi's delay pattern: text 0, first codebook of each audio stream 0, the others `max_delay`.

    With `max_delay=2` the last codebooks of each stream are delayed by 2 (non-decreasing within a stream).
    """
    def stream(n: int) -> list[int]:
        return [0] + [min(max_delay, 1 + (i * max_delay) // max(n - 1, 1)) for i in range(n - 1)]

    return [0] + (stream(dep_q) if dep_q else []) + (stream(n_q - dep_q) if n_q > dep_q else [])


def make_lm(
    n_q: int = 4,
    dep_q: int = 2,
    max_delay: int = 1,
    card: int = 32,
    text_card: int = 24,
    dim: int = 32,
    num_layers: int = 2,
    context: int = 16,
    depformer_multi_linear: bool = False,
    depformer_weights_per_step: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    **kwargs: tp.Any,
) -> LMModel:
    """A small random LMModel in eval mode, shaped like Moshi (rope, silu gating, rms norm).

    The depformer has weights per step by default, as Moshi 7B: in moshi 0.2.13 a depformer without them
    cannot stream (its KV cache has no capacity, `LMModel` forces its context to None).
    """
    torch.manual_seed(seed)
    delays = kwargs.pop("delays", None) or moshi_delays(n_q, dep_q, max_delay)
    params = dict(
        delays=delays,
        n_q=n_q,
        dep_q=dep_q,
        card=card,
        text_card=text_card,
        dim=dim,
        num_heads=2,
        num_layers=num_layers,
        hidden_scale=2,
        causal=True,
        context=context,
        gating="silu",
        norm="rms_norm_f32",
        positional_embedding="rope",
        depformer_dim=16,
        depformer_num_heads=2,
        depformer_num_layers=2,
        depformer_multi_linear=depformer_multi_linear,
        depformer_weights_per_step=depformer_weights_per_step,
        depformer_pos_emb="sin",
        device=device,
        dtype=dtype,
    )
    params.update(kwargs)
    model = LMModel(**params)
    return model.eval()


def ttt_lm(layers: tp.Sequence[int] = (0, 1), mini_batch_size: int = 4, ttt_seed: int = 3,
           **kwargs: tp.Any) -> LMModel:
    """`make_lm(**kwargs)` with TTT-Linear blocks after the temporal layers `layers` (initialised from
    `ttt_seed`): the one TTT model factory of the tests."""
    from moshi_patch.ttt import add_ttt_layers   # not at import: see the package docstring

    lm = make_lm(**kwargs)
    torch.manual_seed(ttt_seed)
    return add_ttt_layers(lm, list(layers), mini_batch_size=mini_batch_size)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None,
                 atol: float = 1e-4) -> float:
    """`actual` and `expected` (same shape) agree within `atol` at every position of `mask` (broadcast to
    the leading dimensions; all positions if None), where both must be finite. Returns the max |diff|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.detach().float() - expected.detach().float()).abs()
    if mask is not None:
        assert mask.any(), "nothing to compare: the mask is empty"
        diff = diff[mask]
    assert torch.isfinite(diff).all(), "non-finite values where the two are compared"
    worst = float(diff.max())
    assert worst < atol, worst
    return worst


def random_codes(model: LMModel, batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    """Random valid codes `[B, K, T]`: text in [0, text_card), audio in [0, card)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, model.text_card, (batch, 1, frames), generator=gen)
    audio = torch.randint(0, model.card, (batch, model.n_q, frames), generator=gen)
    return torch.cat([text, audio], dim=1).to(model.device)


def stream_teacher_forced(lm_gen, codes: torch.Tensor, chunk: int | list[int] = 1, text: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Streams `codes [B, K, T]` (the layout of `LMModel.forward`) through `moshi_patch.teacher_force`,
    `chunk` frames per call: the codes' text (or the text mode `text`), audio and user streams.

    Returns the text logits `[B, 1, T, text_card_out]`, audio logits `[B, dep_q, T, card]` (or None) and
    tokens `[B, 1 + dep_q, T]` of frames 0..T-1, stacked from the calls' outputs.
    """
    from moshi_patch import teacher_force   # not at import: tests of an upstream-patched moshi import this module

    dep_q = lm_gen.lm_model.dep_q
    chunks = list(teacher_force(lm_gen, codes[:, 1:1 + dep_q], text=codes[:, 0] if text is None else text,
                                user=codes[:, dep_q + 1:], chunk=chunk))
    for c in chunks:
        assert c.logits.tokens.shape[-1] == c.logits.text_logits.shape[2] == c.stop - c.start
    audio = [c.logits.audio_logits for c in chunks if c.logits.audio_logits is not None]
    return (torch.cat([c.logits.text_logits for c in chunks], 2), torch.cat(audio, 2) if audio else None,
            torch.cat([c.logits.tokens for c in chunks], 2))
