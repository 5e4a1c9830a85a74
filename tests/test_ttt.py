"""TTTLinear on its own: the dual form against a naive per-token autograd implementation, and streaming
(token by token, random chunks, exec_mask, reset) against the whole-sequence computation."""
import pytest
import torch
from torch.nn import functional as F
from moshi.utils.compile import no_compile

from moshi_patch.ttt import TTTLinear, add_ttt_layers, ttt_layers

from helpers.lm_factory import make_lm

DIM, HEADS = 16, 2


def make_block(mini_batch_size: int = 4, seed: int = 0, **kwargs) -> TTTLinear:
    torch.manual_seed(seed)
    block = TTTLinear(DIM, HEADS, mini_batch_size=mini_batch_size, **kwargs).eval()
    # Non-trivial learned values everywhere, so that every term of the update shows in the outputs.
    with torch.no_grad():
        block.inner_w.normal_(std=0.3)
        block.inner_b.normal_(std=0.3)
        block.inner_ln_weight.add_(torch.randn_like(block.inner_ln_weight) * 0.2)
        block.inner_ln_bias.normal_(std=0.2)
        block.token_scale_offset.normal_(std=0.05)
        block.lr_gate.bias.normal_(std=1.0)
        block.o_proj.weight.normal_(std=0.3)
    return block


def inputs(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, DIM, generator=torch.Generator().manual_seed(seed))


def stream(block: TTTLinear, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    assert sum(chunks) == x.shape[1]
    outs, start = [], 0
    with torch.no_grad(), block.streaming(x.shape[0]):
        for size in chunks:
            outs.append(block(x[:, start:start + size]))
            start += size
    return torch.cat(outs, dim=1)


def naive_inner(block: TTTLinear, h: torch.Tensor) -> torch.Tensor:
    """Primal form, one token at a time, gradients by autograd: the paper's definition written plainly.
    h: [B, T, C] pre-normed input. Returns the block output before the residual ([B, T, C])."""
    B, T, C = h.shape
    H, D, K = block.num_heads, block.head_dim, block.mini_batch_size
    q = block.q_proj(h).view(B, T, H, D)
    k = block.k_proj(h).view(B, T, H, D)
    v = block.v_proj(h).view(B, T, H, D)
    lr = block.base_lr * torch.sigmoid(block.lr_gate(h)) / D                    # [B, T, H]
    scale = torch.clamp_min(1.0 / torch.arange(1, K + 1) + block.token_scale_offset, 0.0)
    half = D // 2
    freqs = block.rope_theta ** (-torch.arange(half) / half)

    def rope(x: torch.Tensor, p: int) -> torch.Tensor:
        c, s = torch.cos(p * freqs), torch.sin(p * freqs)
        return torch.cat([x[..., :half] * c - x[..., half:] * s, x[..., :half] * s + x[..., half:] * c], -1)

    def ln(z: torch.Tensor, head: int) -> torch.Tensor:
        return F.layer_norm(z, (D,), block.inner_ln_weight[head], block.inner_ln_bias[head], eps=1e-6)

    out = torch.zeros(B, T, H, D)
    for bi in range(B):
        for head in range(H):
            w0, b0 = block.inner_w[head].clone(), block.inner_b[head].clone()
            gw, gb = torch.zeros_like(w0), torch.zeros_like(b0)
            for t in range(T):
                p = t % K
                qt, kt = rope(q[bi, t, head], p), rope(k[bi, t, head], p)
                w = w0.detach().requires_grad_(True)
                b = b0.detach().requires_grad_(True)
                loss = 0.5 * ((ln(kt.detach() @ w + b, head) - (v[bi, t, head] - kt).detach()) ** 2).sum()
                dw, db = torch.autograd.grad(loss, [w, b])
                gw, gb = gw + lr[bi, t, head] * dw, gb + lr[bi, t, head] * db
                wt, bt = w0 - scale[p] * gw, b0 - scale[p] * gb
                out[bi, t, head] = qt + ln(qt @ wt + bt, head)
                if p == K - 1:
                    w0, b0, gw, gb = wt, bt, torch.zeros_like(gw), torch.zeros_like(gb)
    y = F.layer_norm(out.reshape(B, T, C), (C,), block.post_norm.weight, block.post_norm.bias, eps=1e-6)
    y = F.gelu(block.g_proj(h), approximate="tanh") * y
    return block.o_proj(y)


def test_sequence_matches_naive_autograd_primal_form():
    block = make_block(mini_batch_size=4)
    x = inputs(2, 11)            # two full mini-batches and a partial one
    with torch.no_grad():
        got = block(x)
    with no_compile():
        h = block.norm(x)
    expected = x + naive_inner(block, h).detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mini_batch_size", [1, 4, 16])
def test_streaming_token_by_token_and_random_chunks_equal_sequence(mini_batch_size):
    block = make_block(mini_batch_size=mini_batch_size)
    T = 53
    x = inputs(3, T)
    with torch.no_grad():
        whole = block(x)
    by_token = stream(block, x, [1] * T)
    gen = torch.Generator().manual_seed(mini_batch_size)
    chunks: list[int] = []
    while sum(chunks) < T:
        chunks.append(min(int(torch.randint(1, 9, (1,), generator=gen)), T - sum(chunks)))
    by_chunk = stream(block, x, chunks)
    assert (whole - x).abs().max() > 0.1      # the block does something
    torch.testing.assert_close(by_token, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_chunk, whole, atol=1e-5, rtol=0)


def test_streaming_state_is_what_the_issue_says():
    """W0 only changes at mini-batch ends; the position counts tokens within the mini-batch."""
    block = make_block(mini_batch_size=4)
    x = inputs(1, 6)
    with torch.no_grad(), block.streaming(1):
        state = block._streaming_state
        w_start = state.w.clone()
        block(x[:, :3])
        assert int(state.pos) == 3 and torch.equal(state.w, w_start) and state.grad_w.abs().sum() > 0
        block(x[:, 3:5])
        assert int(state.pos) == 1 and not torch.equal(state.w, w_start)


def test_exec_mask_freezes_masked_items():
    block = make_block(mini_batch_size=4)
    T = 14
    x = inputs(2, T)
    with torch.no_grad():
        whole = block(x)
        # Item 1 is masked for steps 5..7 (fed garbage there) and receives its own frames 5.. afterwards.
        outs_1 = []
        with block.streaming(2):
            state = block._streaming_state
            t1 = 0
            for step in range(T + 3):
                masked = 5 <= step < 8
                block.set_exec_mask(torch.tensor([step < T, not masked]))
                frame = torch.stack([x[0, min(step, T - 1)], torch.randn(DIM) if masked else x[1, t1]])
                before = (state.w[1].clone(), state.grad_w[1].clone(), int(state.pos[1]))
                y = block(frame[:, None])
                if masked:
                    assert torch.equal(state.w[1], before[0]) and torch.equal(state.grad_w[1], before[1])
                    assert int(state.pos[1]) == before[2]
                else:
                    outs_1.append(y[1, 0])
                    t1 += 1
    torch.testing.assert_close(torch.stack(outs_1), whole[1], atol=1e-5, rtol=0)


def test_reset_streaming_restarts_selected_items():
    block = make_block(mini_batch_size=4)
    x = inputs(2, 9)
    with torch.no_grad():
        fresh = block(x)
        with block.streaming(2):
            block(inputs(2, 7, seed=5))            # some history, mid mini-batch
            block.reset_streaming(torch.tensor([True, False]))
            y = torch.cat([block(x[:, t:t + 1]) for t in range(9)], dim=1)
            assert int(block._streaming_state.pos[0]) == 9 % 4
    torch.testing.assert_close(y[0], fresh[0], atol=1e-5, rtol=0)
    assert (y[1] - fresh[1]).abs().max() > 1e-3   # item 1 kept its history


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_heads"):
        TTTLinear(16, 3)
    with pytest.raises(ValueError, match="even"):
        TTTLinear(12, 4)
    with pytest.raises(ValueError, match="mini_batch_size"):
        TTTLinear(16, 2, mini_batch_size=0)
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        TTTLinear(16, 2)(torch.zeros(2, 16))


def test_add_ttt_layers_inserts_after_given_temporal_layers_deterministically():
    def build():
        lm = make_lm(num_layers=3, dim=32)
        torch.manual_seed(7)
        return add_ttt_layers(lm, [0, 2], mini_batch_size=8)

    lm = build()
    kinds = [type(layer).__name__ for layer in lm.transformer.layers]
    assert kinds == ["StreamingTransformerLayer", "TTTLinear", "StreamingTransformerLayer",
                     "StreamingTransformerLayer", "TTTLinear"]
    assert all(not isinstance(m, TTTLinear) for m in lm.depformer.modules())
    blocks = ttt_layers(lm)
    assert blocks[0].mini_batch_size == 8 and blocks[0].num_heads == 2 and not blocks[0].training
    again = ttt_layers(build())
    for a, b in zip(blocks, again):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="layer_indices"):
        add_ttt_layers(make_lm(num_layers=2), [2])
    with pytest.raises(ValueError, match="layer_indices"):
        add_ttt_layers(make_lm(num_layers=2), [1, 1])
    with pytest.raises(TypeError, match="LMModel"):
        add_ttt_layers(torch.nn.Linear(2, 2), [0])
