"""LMGen's audio hooks (`on_audio_logits_hook`, `on_audio_token_hook`) on a small seeded model."""
import torch

from moshi.models.lm import LMGen, LMModel


def _model() -> LMModel:
    torch.manual_seed(0)
    model = LMModel(
        delays=[0, 0, 1, 0, 1], n_q=4, dep_q=2, card=32, text_card=24, dim=32, num_heads=2, num_layers=2,
        hidden_scale=2, causal=True, context=16, gating="silu", norm="rms_norm_f32",
        positional_embedding="rope", depformer_dim=16, depformer_num_heads=2, depformer_num_layers=2,
        depformer_weights_per_step=True, depformer_pos_emb="sin")
    return model.eval()


def _codes(model: LMModel, frames: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, model.text_card, (2, 1, frames), generator=gen)
    audio = torch.randint(0, model.card, (2, model.n_q, frames), generator=gen)
    return torch.cat([text, audio], dim=1)


def test_hooks_force_tokens_and_see_the_logits_of_forward():
    """Teacher forcing through the hooks alone: the audio logits they see are those of `LMModel.forward`."""
    model = _model()
    codes = _codes(model, 12)
    B, _, T = codes.shape
    dep_q, delays = model.dep_q, model.delays
    seen = torch.full((B, dep_q, T, model.card), float("nan"))
    step = 0

    def on_text(token: torch.Tensor) -> None:
        if step < T:
            token.copy_(codes[:, 0, step])

    def on_audio_token(cb_index: int, token: torch.Tensor) -> None:
        frame = step - delays[1 + cb_index]
        if 0 <= frame < T:
            token.copy_(codes[:, 1 + cb_index, frame])

    def on_audio_logits(cb_index: int, logits: torch.Tensor) -> None:
        frame = step - delays[1 + cb_index]
        if 0 <= frame < T:
            seen[:, cb_index, frame] = logits[:, 0, 0]

    lm_gen = LMGen(model, use_sampling=False, on_text_hook=on_text, on_audio_logits_hook=on_audio_logits,
                   on_audio_token_hook=on_audio_token)
    with lm_gen.streaming(B):
        for step in range(T + 1):
            frame = min(max(step - 1, 0), T - 1)
            lm_gen.step(codes[:, dep_q + 1:, frame:frame + 1])
    with torch.no_grad():
        reference = model(codes)
    mask = reference.mask
    assert mask.any()
    assert (seen[mask] - reference.logits[mask]).abs().max() < 1e-4


def test_hooks_that_change_nothing_leave_the_tokens_unchanged():
    model = _model()
    user = _codes(model, 10)[:, model.dep_q + 1:]

    def run(hooked: bool) -> torch.Tensor:
        hooks = {}
        if hooked:
            hooks = dict(on_audio_logits_hook=lambda cb_index, logits: None,
                         on_audio_token_hook=lambda cb_index, token: None)
        lm_gen = LMGen(model, use_sampling=False, **hooks)
        outs = []
        with lm_gen.streaming(2):
            for step in range(user.shape[-1]):
                out = lm_gen.step(user[:, :, step:step + 1])
                if out is not None:
                    outs.append(out)
        return torch.cat(outs, dim=2)

    assert torch.equal(run(True), run(False))
