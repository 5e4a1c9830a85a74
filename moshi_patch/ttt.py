"""Reference Test-Time-Training layer (TTT-Linear) for Moshi's temporal transformer.

TTT-Linear is the layer of Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States" (arXiv:2407.04620). Its hidden state is the weight `W` (and bias `b`) of a small per-head linear
model, trained online on the sequence itself by gradient descent on a self-supervised reconstruction loss:

    f(z; W, b) = z + LN(z W + b)                 inner model: residual + per-head LayerNorm
    loss_t(W, b) = 1/2 || LN(k_t W + b) - (v_t - k_t) ||^2
    out_t = f(q_t; W_t, b_t)

with `q, k, v` learned projections of the (pre-normed) input and a learnable, token-dependent inner learning
rate `eta_t = base_lr * sigmoid(x_t . w_lr + b_lr) / head_dim`. Tokens are grouped in mini-batches of `b`
tokens; every gradient of a mini-batch is taken at `W0`, the weights at the start of that mini-batch, and
token `i` of the mini-batch uses

    W_i = W0 - s_i * sum_{j <= i} eta_j grad_W loss_j(W0)

with `s_i` a learnable per-position scale initialised to `1 / (i + 1)` (so `W_i` follows the running mean
of the gradients). The last token's `W` starts the next mini-batch. Over a whole sequence this is computed
in the "dual form" (one masked, attention-like matmul per mini-batch, no per-token `W`); in streaming mode
the layer keeps `W0`, the running gradient sum and the position inside the mini-batch, so a stream cut in
chunks of any length gives the same outputs as the whole sequence.

Around the inner model, as in the paper's reference implementation: a pre-norm, rotary embedding of `q, k`
by the position inside the mini-batch, a LayerNorm of the concatenated heads, an optional GELU output gate,
an output projection and the residual connection: `y = x + o_proj(gate * post_norm(TTT(norm(x))))`.

`add_ttt_layers` inserts such blocks in the temporal transformer of an `LMModel`; `LMGen` then carries
their state through streaming like the KV cache (`lm_model.streaming(...)` finds them automatically).
"""
from contextlib import ExitStack
from dataclasses import dataclass
import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from moshi.models.lm import LMModel
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import create_norm_fn
from moshi.utils.compile import no_compile

_INNER_LN_EPS = 1e-6


@dataclass
class _TTTState(State):
    """Streaming state of a `TTTLinear`, per batch item, all in float32.

    w: [B, H, D, D] inner weights at the start of the current mini-batch.
    b: [B, H, D] inner bias at the start of the current mini-batch.
    grad_w: [B, H, D, D] sum over the tokens seen in the current mini-batch of eta_j * grad_W loss_j(W0).
    grad_b: [B, H, D] same for the bias.
    pos: [B] int64 position inside the current mini-batch (tokens already seen in it).
    init_w, init_b: [H, D, D], [H, D] learned initial state, restored by `reset`.
    """
    w: torch.Tensor
    b: torch.Tensor
    grad_w: torch.Tensor
    grad_b: torch.Tensor
    pos: torch.Tensor
    init_w: torch.Tensor
    init_b: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        # In place: under CUDA graphs the captured kernels read these very buffers.
        m4 = reset_mask.view(-1, 1, 1, 1)
        m3 = reset_mask.view(-1, 1, 1)
        self.w.copy_(torch.where(m4, self.init_w, self.w))
        self.b.copy_(torch.where(m3, self.init_b, self.b))
        self.grad_w.copy_(torch.where(m4, torch.zeros_like(self.grad_w), self.grad_w))
        self.grad_b.copy_(torch.where(m3, torch.zeros_like(self.grad_b), self.grad_b))
        self.pos.copy_(torch.where(reset_mask, torch.zeros_like(self.pos), self.pos))


def _inner_ln(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head LayerNorm of the inner model. z: [..., H, *, D]; weight, bias broadcastable to z."""
    mu = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    return weight * (z - mu) / torch.sqrt(var + _INNER_LN_EPS) + bias


def _inner_ln_l2_grad(z: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to `z` of 1/2 ||LN(z) - target||^2, in closed form (no autograd needed,
    so it also runs under `torch.no_grad()` and inside CUDA graphs). z, target: [..., D]."""
    dim = z.shape[-1]
    mu = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + _INNER_LN_EPS)
    z_hat = (z - mu) / std
    grad_hat = (weight * z_hat + bias - target) * weight
    return (dim * grad_hat - grad_hat.sum(dim=-1, keepdim=True)
            - z_hat * (grad_hat * z_hat).sum(dim=-1, keepdim=True)) / (dim * std)


def _rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split layout). x: [..., D] with D even; pos broadcastable to x[..., 0]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = pos.to(torch.float32)[..., None] * freqs
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class TTTLinear(StreamingModule[_TTTState]):
    """TTT-Linear block, `y = x + o_proj(gate * post_norm(TTT(norm(x))))`, streaming or not.

    Args:
        dim (int): model dimension C.
        num_heads (int): number of inner models H; head dimension D = C / H must be even (rotary).
        mini_batch_size (int): TTT mini-batch size b (16 in the paper).
        base_lr (float): base inner learning rate (1.0 in the paper for TTT-Linear).
        use_gate (bool): GELU output gate, as with the paper's Mamba backbone.
        rope_theta (float): rotary base for `q, k` (positions inside the mini-batch).
        norm (str): pre-norm type, any of moshi's `create_norm_fn` types.
        init_std (float): std of the normal init of the projections and of the inner `W`.

    `forward(x)` takes `x: [B, T, C]` and returns `[B, T, C]`. Outside streaming, `x` is a whole sequence
    starting at position 0. In streaming mode (`with module.streaming(B)`), `x` is the next chunk, of any
    length T >= 1; the inner weights of a batch item masked out by `exec_mask` do not change.
    Extra positional/keyword arguments (moshi passes `cross_attention_src`) are ignored.
    """

    # Several frames per streaming call compute what as many one-frame calls do (`_dual_form`).
    supports_multi_frame_streaming = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mini_batch_size: int = 16,
        base_lr: float = 1.0,
        use_gate: bool = True,
        rope_theta: float = 10_000.0,
        norm: str = "rms_norm_f32",
        init_std: float = 0.02,
        device: tp.Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads must be >= 1 and divide dim={dim}, got num_heads={num_heads}.")
        head_dim = dim // num_heads
        if head_dim % 2 != 0:
            raise ValueError(f"dim / num_heads must be even (rotary embedding), got {dim} / {num_heads} "
                             f"= {head_dim}.")
        if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be an int >= 1, got {mini_batch_size!r}.")
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mini_batch_size = mini_batch_size
        self.base_lr = base_lr
        self.rope_theta = rope_theta
        factory = dict(device=device, dtype=dtype)

        self.norm = create_norm_fn(norm, dim, **factory)
        self.q_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.k_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.v_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.o_proj = nn.Linear(dim, dim, bias=False, **factory)
        # Token-dependent inner learning rate, one gate per head (bias at 0: sigmoid = 1/2 on average).
        self.lr_gate = nn.Linear(dim, num_heads, bias=True, **factory)
        self.g_proj = nn.Linear(dim, dim, bias=False, **factory) if use_gate else None
        self.post_norm = nn.LayerNorm(dim, eps=1e-6, **factory)
        # The inner model and its LayerNorm: the initial hidden state, learned by the outer loop.
        self.inner_w = nn.Parameter(torch.empty(num_heads, head_dim, head_dim, **factory))
        self.inner_b = nn.Parameter(torch.zeros(num_heads, head_dim, **factory))
        self.inner_ln_weight = nn.Parameter(torch.ones(num_heads, head_dim, **factory))
        self.inner_ln_bias = nn.Parameter(torch.zeros(num_heads, head_dim, **factory))
        # Scale of the summed gradients at each position of a mini-batch: 1 / (i + 1) + learned offset.
        self.register_buffer(
            "token_scale_base", 1.0 / torch.arange(1, mini_batch_size + 1, device=device, dtype=torch.float32),
            persistent=False)
        self.token_scale_offset = nn.Parameter(torch.zeros(mini_batch_size, **factory))

        for linear in [self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.lr_gate, self.g_proj]:
            if linear is not None:
                nn.init.normal_(linear.weight, std=init_std)
        nn.init.zeros_(self.lr_gate.bias)
        nn.init.normal_(self.inner_w, std=init_std)

    def _init_streaming_state(self, batch_size: int) -> _TTTState:
        init_w = self.inner_w.detach().float().clone()
        init_b = self.inner_b.detach().float().clone()
        return _TTTState(
            batch_size, init_w.device,
            w=init_w[None].repeat(batch_size, 1, 1, 1),
            b=init_b[None].repeat(batch_size, 1, 1),
            grad_w=torch.zeros(batch_size, *init_w.shape, device=init_w.device),
            grad_b=torch.zeros(batch_size, *init_b.shape, device=init_b.device),
            pos=torch.zeros(batch_size, dtype=torch.long, device=init_w.device),
            init_w=init_w, init_b=init_b)

    def _token_scale(self) -> torch.Tensor:
        """[b] float32: scale s_i of the summed gradients at position i of a mini-batch (>= 0)."""
        return torch.clamp_min(self.token_scale_base + self.token_scale_offset.float(), 0.0)

    def forward(self, x: torch.Tensor, *args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TTTLinear expects x of shape [B, T, {self.dim}], got {tuple(x.shape)}.")
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        with ExitStack() as stack:
            if x.device.type != "cuda":
                # As moshi's transformer layers do: torch.compile of the norm only pays off on a GPU.
                stack.enter_context(no_compile())
            h = self.norm(x).to(self.q_proj.weight.dtype)

        def heads(linear: nn.Linear) -> torch.Tensor:   # [B, T, C] -> [B, H, T, D] float32
            return linear(h).float().view(B, T, H, D).transpose(1, 2)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        lr = self.base_lr * torch.sigmoid(self.lr_gate(h).float()).transpose(1, 2) / D   # [B, H, T]

        state = self._streaming_state
        if state is None:
            inner = self._sequence(q, k, v, lr)
        else:
            inner = self._stream(state, q, k, v, lr)

        out = inner.transpose(1, 2).reshape(B, T, C)                                     # [B, T, C]
        out = F.layer_norm(out, (C,), self.post_norm.weight.float(), self.post_norm.bias.float(),
                           self.post_norm.eps)
        if self.g_proj is not None:
            out = F.gelu(self.g_proj(h).float(), approximate="tanh") * out
        out = self.o_proj(out.to(self.o_proj.weight.dtype))
        return x + out.to(x.dtype)

    def _ln_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner_ln_weight.float(), self.inner_ln_bias.float()

    def _sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Whole sequence from the learned initial state, dual form. q, k, v: [B, H, T, D]; lr: [B, H, T].
        Returns the inner outputs [B, H, T, D]."""
        B, H, T, D = q.shape
        w = self.inner_w.float()[None].expand(B, H, D, D)
        b = self.inner_b.float()[None].expand(B, H, D)
        start = torch.zeros(B, dtype=torch.long, device=q.device)
        out, _ = self._dual_form(q, k, v, lr, w, b, torch.zeros_like(w), torch.zeros_like(b), start)
        return out

    def _dual_form(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                   w: torch.Tensor, b: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor,
                   start: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """T tokens continuing from a state, one masked matmul per mini-batch instead of one step per token.

        Item i starts at position `start[i]` of a mini-batch whose initial weights are `w [B, H, D, D]`,
        `b [B, H, D]` and whose tokens so far summed the gradients `grad_w`, `grad_b` (zeros at a mini-batch
        start). Its tokens are laid out from index `start[i]`, so that every item's mini-batches line up;
        the slots before and after are padding with a learning rate of 0, which adds nothing to any gradient.
        Returns the inner outputs `[B, H, T, D]` and the state after the tokens `(w, b, grad_w, grad_b, pos)`.
        """
        B, H, T, D = q.shape
        K = self.mini_batch_size
        device = q.device
        n = math.ceil((int(start.max()) + T) / K)
        index = start[:, None] + torch.arange(T, device=device)                      # [B, T] slot of each token

        def lay_out(x: torch.Tensor) -> torch.Tensor:        # [B, H, T, *] -> [B, H, n, K, *], zero padded
            slots = x.new_zeros(B, H, n * K, *x.shape[3:])
            where = index[:, None, :].expand(B, H, T)
            if x.dim() == 4:
                where = where[..., None].expand(B, H, T, x.shape[3])
            return slots.scatter(2, where, x).view(B, H, n, K, *x.shape[3:])

        q, k, v, lr = lay_out(q), lay_out(k), lay_out(v), lay_out(lr)
        rel = torch.arange(K, device=device)
        q = _rotary(q, rel, self.rope_theta)
        k = _rotary(k, rel, self.rope_theta)
        scale = self._token_scale()                                                    # [K]
        ln_w, ln_b = self._ln_params()
        ln_w, ln_b = ln_w[:, None], ln_b[:, None]                                      # [H, 1, D]
        causal = torch.ones(K, K, dtype=torch.bool, device=device).tril()
        end = start + T                                   # tokens of each item's current mini-batch, + T
        full = end // K                                   # mini-batches each item completes
        b = b[:, :, None]                                 # [B, H, 1, D]
        grad_b = grad_b[:, :, None]
        final = (w, b, grad_w, grad_b)
        outs = []
        for i in range(n):
            qi, ki, vi, lri = q[:, :, i], k[:, :, i], v[:, :, i], lr[:, :, i]           # [B, H, K, D], [B, H, K]
            grad = _inner_ln_l2_grad(ki @ w + b, vi - ki, ln_w, ln_b)                   # [B, H, K, D]
            # eta[r, j] = s_r * lr_j for j <= r: token r sums the gradients of tokens 0..r, all taken at W0,
            # plus those summed before this call (grad_w, grad_b: only in the first mini-batch).
            eta = torch.where(causal, scale[:, None] * lri[..., None, :], 0.0)            # [B, H, K, K]
            s = scale[:, None]                                                            # [K, 1]
            z = (qi @ w - s * (qi @ grad_w) - (eta * (qi @ ki.transpose(-1, -2))) @ grad
                 + b - s * grad_b - eta @ grad)
            outs.append(qi + _inner_ln(z, ln_w, ln_b))
            # Gradient sums over the whole mini-batch (padding adds 0), and the next mini-batch's W0.
            grad_w = grad_w + (lri[..., None] * ki).transpose(-1, -2) @ grad
            grad_b = grad_b + (lri[..., None] * grad).sum(dim=-2, keepdim=True)
            next_w, next_b = w - scale[-1] * grad_w, b - scale[-1] * grad_b
            # The state after the last token: this mini-batch's W0 and sums if it is not complete.
            here = (full == i).view(B, 1, 1, 1)
            final = tuple(torch.where(here, now, kept) for now, kept in zip((w, b, grad_w, grad_b), final))
            done = (i < full).view(B, 1, 1, 1)
            w, b = torch.where(done, next_w, w), torch.where(done, next_b, b)
            grad_w, grad_b = torch.zeros_like(grad_w), torch.zeros_like(grad_b)
        # Items that complete their last mini-batch exactly: their state is the next mini-batch's start.
        exact = (full == n).view(B, 1, 1, 1)
        final = tuple(torch.where(exact, now, kept) for now, kept in zip((w, b, grad_w, grad_b), final))
        out = torch.cat(outs, dim=2).view(B, H, n * K, D)
        out = out.gather(2, index[:, None, :, None].expand(B, H, T, D))
        w_end, b_end, grad_w_end, grad_b_end = final
        return out, (w_end, b_end[:, :, 0], grad_w_end, grad_b_end[:, :, 0], end % K)

    def _stream(self, state: _TTTState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                lr: torch.Tensor) -> torch.Tensor:
        """Chunk continuing the stream (each batch item has its own position in its mini-batch), updating
        `state` in place: one frame step by step (capturable by CUDA graphs), several in the dual form.
        Shapes as in `_sequence`."""
        B, H, T, D = q.shape
        if T > 1:
            out, new = self._dual_form(q, k, v, lr, state.w, state.b, state.grad_w, state.grad_b, state.pos)
            live = state.exec_mask
            for current, value in zip((state.w, state.b, state.grad_w, state.grad_b, state.pos), new):
                mask = live.view(B, *([1] * (current.dim() - 1)))
                current.copy_(torch.where(mask, value, current))
            return out
        K = self.mini_batch_size
        scale = self._token_scale()
        ln_w, ln_b = self._ln_params()
        live = state.exec_mask.view(B, 1, 1)
        outs = []
        # No Python branch on tensor values below: the step stays capturable by CUDA graphs.
        for t in range(T):
            pos = state.pos                                                              # [B]
            qt = _rotary(q[:, :, t], pos[:, None], self.rope_theta)                      # [B, H, D]
            kt = _rotary(k[:, :, t], pos[:, None], self.rope_theta)
            lrt = lr[:, :, t, None]                                                      # [B, H, 1]
            z = (kt[:, :, None] @ state.w).squeeze(2) + state.b
            grad = _inner_ln_l2_grad(z, v[:, :, t] - kt, ln_w, ln_b)                     # [B, H, D]
            grad_w = state.grad_w + (lrt * kt)[..., :, None] * grad[..., None, :]       # [B, H, D, D]
            grad_b = state.grad_b + lrt * grad
            s = scale[pos].view(B, 1, 1)
            w_t = state.w - s[..., None] * grad_w
            b_t = state.b - s * grad_b
            z = (qt[:, :, None] @ w_t).squeeze(2) + b_t
            outs.append(qt + _inner_ln(z, ln_w, ln_b))
            # End of a mini-batch: W_t becomes the next W0 and the running gradient restarts.
            end = (pos == K - 1).view(B, 1, 1)
            new_w = torch.where(end[..., None], w_t, state.w)
            new_b = torch.where(end, b_t, state.b)
            grad_w = torch.where(end[..., None], torch.zeros_like(grad_w), grad_w)
            grad_b = torch.where(end, torch.zeros_like(grad_b), grad_b)
            new_pos = torch.where(end.view(B), torch.zeros_like(pos), pos + 1)
            state.w.copy_(torch.where(live[..., None], new_w, state.w))
            state.b.copy_(torch.where(live, new_b, state.b))
            state.grad_w.copy_(torch.where(live[..., None], grad_w, state.grad_w))
            state.grad_b.copy_(torch.where(live, grad_b, state.grad_b))
            state.pos.copy_(torch.where(state.exec_mask, new_pos, pos))
        return torch.stack(outs, dim=2)


def ttt_layers(lm_model: LMModel) -> list[TTTLinear]:
    """The `TTTLinear` blocks of the temporal transformer of `lm_model`, in order."""
    return [layer for layer in lm_model.transformer.layers if isinstance(layer, TTTLinear)]


def add_ttt_layers(lm_model: LMModel, layer_indices: tp.Iterable[int], mini_batch_size: int = 16,
                   **kwargs: tp.Any) -> LMModel:
    """Insert a `TTTLinear` block after each given layer of the temporal transformer of `lm_model`.

    Args:
        lm_model: the model, modified in place (the depformer is left alone).
        layer_indices: indices into `lm_model.transformer.layers` as it is before this call.
        mini_batch_size: TTT mini-batch size b.
        **kwargs: other `TTTLinear` arguments; `num_heads` defaults to the transformer's attention heads,
            `device` and `dtype` to those of the transformer.
    Returns:
        `lm_model`, with the new blocks in eval mode if the model is. The initialisation draws from torch's
        global RNG, so it is deterministic under `torch.manual_seed`. The state-dict keys of the
        transformer layers after an insertion point shift by one per inserted block.

    Call it before creating an `LMGen`, and outside streaming mode.
    """
    if not isinstance(lm_model, LMModel):
        raise TypeError(f"lm_model must be a moshi LMModel, got {type(lm_model).__name__}.")
    if lm_model.is_streaming:
        raise RuntimeError("add_ttt_layers: lm_model is streaming; call it outside `streaming(...)`.")
    layers = lm_model.transformer.layers
    indices = list(layer_indices)
    for index in indices:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(layers):
            raise ValueError(f"layer_indices must be ints in [0, {len(layers)}), got {indices!r}.")
    if len(set(indices)) != len(indices):
        raise ValueError(f"layer_indices must not repeat, got {indices!r}.")
    reference = next(lm_model.transformer.parameters())
    params: dict[str, tp.Any] = dict(device=reference.device, dtype=reference.dtype)
    first = next((layer for layer in layers if hasattr(layer, "self_attn")), None)
    if first is not None:
        params["num_heads"] = first.self_attn.num_heads
    params.update(kwargs)
    new_layers: list[nn.Module] = []
    for i, layer in enumerate(layers):
        new_layers.append(layer)
        if i in indices:
            block = TTTLinear(lm_model.dim, mini_batch_size=mini_batch_size, **params)
            new_layers.append(block.train(lm_model.training))
    lm_model.transformer.layers = nn.ModuleList(new_layers)
    # StreamingModule caches the list of its streaming children on first use: drop the stale lists.
    for module in lm_model.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None
    return lm_model
