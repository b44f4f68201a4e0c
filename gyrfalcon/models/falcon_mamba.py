"""Falcon-Mamba: a stack of Mamba-1 selective state-space mixers, in plain PyTorch.

Glossary
    B  batch rows             T  new tokens in this call        V  vocabulary
    D  hidden size            E  d_inner (mixer width)          N  d_state (SSM state per channel)
    R  dt rank                K  causal conv kernel

One block:  x + out_proj( SSM( silu(conv(x_in)) ) * silu(z) ),  with  [x_in, z] = in_proj(RMSNorm(x)).
The SSM per channel e and state n:   h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t,
where dt, B and C are read from the token (x_proj, then dt_proj and softplus for dt). Falcon-Mamba differs from
Mamba-1 only by weightless RMS norms (eps = mixer_rms_eps) on dt, B and C right after x_proj.

Numerics: the residual stream is kept in fp32 (`residual_in_fp32` is true in every Falcon-Mamba checkpoint) and
everything from dt onward in the SSM (discretization, state, C readout, D skip, gate) is fp32, as in the fused
kernels the models were trained with; the projections run in the weights' dtype.

Two paths through the SSM, with the same per-token arithmetic so that they agree:
    * `selective_scan`: a plainly written loop over time (prompts, training; differentiable, no in-place ops);
    * `FalconMambaMixer._step`: one token, O(1), updating the cache's conv and SSM state in place.

Module attribute names are the checkpoint's names (`backbone.layers.{i}.mixer.in_proj`, ...) so loading is a
strict `load_state_dict` with no renaming table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FalconMambaConfig
from .cache import MambaCache
from .fast_linear import linear

# Time steps whose discretized (exp(dt A), dt B u) tensors are built at once in the scan: [B, chunk, E, N] fp32.
# Bounds the scan's extra memory on long prompts while keeping the per-step Python work to two ops.
_SCAN_CHUNK = 64


class FalconMambaRMSNorm(nn.Module):
    """RMSNorm with a weight: normalized in fp32, rounded back to the input dtype, then scaled."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm Falcon-Mamba puts on dt, B and C: no weight (checkpoints store none), fp32 inside."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference recurrence, one time step after another.

    u, dt: [B, T, E] fp32; A: [E, N]; Bm, Cm: [B, T, N] fp32; state: [B, E, N] fp32 (the state before step 0).
    Returns y [B, T, E] (C . h only; the D skip and gate are applied by the caller) and the final state.
    """
    t_total = u.shape[1]
    ys = []
    for t0 in range(0, t_total, _SCAN_CHUNK):
        t1 = min(t0 + _SCAN_CHUNK, t_total)
        dA = torch.exp(dt[:, t0:t1, :, None] * A)  # [B, c, E, N]
        dBu = dt[:, t0:t1, :, None] * Bm[:, t0:t1, None, :] * u[:, t0:t1, :, None]  # [B, c, E, N]
        # unbind rather than dA[:, i]: indexing makes autograd build a full-size zero gradient per step.
        for dA_i, dBu_i, c_i in zip(dA.unbind(1), dBu.unbind(1), Cm[:, t0:t1, :, None].unbind(1), strict=True):
            state = dA_i * state + dBu_i
            ys.append(torch.matmul(state, c_i).squeeze(-1))  # [B, E]
    return torch.stack(ys, dim=1), state


class _Step:
    """What every layer of one forward call shares: the cache and where each row's real tokens end."""

    __slots__ = ("cache", "lengths", "valid", "single")

    def __init__(self, cache: MambaCache | None, lengths: torch.Tensor | None, valid: torch.Tensor | None,
                 single: bool):
        self.cache = cache
        self.lengths = lengths  # [B] long: real tokens per row in this call (None: all T)
        self.valid = valid  # [B, T, 1] bool: False at right padding (None: no padding)
        self.single = single  # one new token per row with a cache: take the O(1) step


class FalconMambaMixer(nn.Module):
    def __init__(self, config: FalconMambaConfig):
        super().__init__()
        e, n, r, k = config.intermediate_size, config.state_size, config.time_step_rank, config.conv_kernel
        self.d_inner, self.d_state, self.dt_rank, self.kernel = e, n, r, k
        self.rms_eps = config.mixer_rms_eps
        self.in_proj = nn.Linear(config.hidden_size, 2 * e, bias=config.use_bias)
        # Depthwise causal conv; we call F.conv1d ourselves on [state, x] with no padding, so `padding` is unused.
        self.conv1d = nn.Conv1d(e, e, kernel_size=k, groups=e, bias=config.use_conv_bias, padding=k - 1)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        # S4D-real init (A = -[1..N] per channel, D = 1): only matters for training from scratch; a no-op on meta.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))  # [E, N]
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, config.hidden_size, bias=config.use_bias)

    def _conv(self, x: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
        """Causal depthwise conv + silu. x: [B, T, E] -> [B, T, E]; stores each row's last K-1 real inputs."""
        b, t, e = x.shape
        x = x.transpose(1, 2)  # [B, E, T]
        cache = step.cache
        if cache is not None:
            prev = cache.conv[layer].to(x.dtype)
        else:
            prev = x.new_zeros(b, e, self.kernel - 1)  # an empty history is zero padding on the left
        window = torch.cat([prev, x], dim=-1)  # [B, E, K-1+T]
        out = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=e)  # [B, E, T]
        if cache is not None:
            if step.lengths is None:
                cache.conv[layer].copy_(window[:, :, t:])
            else:
                # Row b's history ends at its last real input, which sits at window index K-2+len_b.
                idx = step.lengths[:, None, None] + torch.arange(self.kernel - 1, device=x.device)  # [B, 1, K-1]
                cache.conv[layer].copy_(window.gather(2, idx.expand(b, e, -1)))
        return F.silu(out).transpose(1, 2)  # [B, T, E]

    def _ssm_params(self, u: torch.Tensor, step: _Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [B, T, E] -> dt [B, T, E], B [B, T, N], C [B, T, N], all fp32, dt after softplus."""
        dt, Bm, Cm = linear(self.x_proj, u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = weightless_rms_norm(dt, self.rms_eps)
        Bm = weightless_rms_norm(Bm, self.rms_eps)
        Cm = weightless_rms_norm(Cm, self.rms_eps)
        # The bias is added in fp32, after the low-rank projection, as the kernels do (delta_bias).
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        if step.valid is not None:
            # dt = 0 makes a padded step a no-op: exp(0 * A) = 1 keeps the state, dt * B * u = 0 adds nothing.
            dt = torch.where(step.valid, dt, torch.zeros((), dtype=dt.dtype, device=dt.device))
        return dt, Bm.float(), Cm.float()

    def _step(self, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
              state: torch.Tensor) -> torch.Tensor:
        """One token per row, same arithmetic as one iteration of `selective_scan`; updates `state` in place.

        u, dt: [B, 1, E]; Bm, Cm: [B, 1, N]; state: [B, E, N] fp32 -> y [B, 1, E].
        """
        dA = torch.exp(dt[:, 0, :, None] * A)  # [B, E, N]
        dBu = dt[:, 0, :, None] * Bm[:, 0, None, :] * u[:, 0, :, None]  # [B, E, N]
        new = dA * state + dBu
        state.copy_(new)
        return torch.matmul(new, Cm[:, 0, :, None]).squeeze(-1)[:, None]  # [B, 1, E]

    def forward(self, h: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
        """h: [B, T, D] (normed, weights' dtype) -> [B, T, D]."""
        x, z = linear(self.in_proj, h).chunk(2, dim=-1)  # [B, T, E] each
        u = self._conv(x, step, layer)
        dt, Bm, Cm = self._ssm_params(u, step)
        u32 = u.float()
        A = -torch.exp(self.A_log.float())  # [E, N]; derived here, not stored, so meta-built models load cleanly
        cache = step.cache
        if step.single:
            y = self._step(u32, dt, A, Bm, Cm, cache.ssm[layer])
        else:
            state = cache.ssm[layer] if cache is not None else u32.new_zeros(u.shape[0], self.d_inner, self.d_state)
            y, state = selective_scan(u32, dt, A, Bm, Cm, state)
            if cache is not None:
                cache.ssm[layer].copy_(state)
        y = (y + u32 * self.D.float()) * F.silu(z.float())  # D skip, then the gate
        return linear(self.out_proj, y.to(h.dtype))


class FalconMambaBlock(nn.Module):
    def __init__(self, config: FalconMambaConfig):
        super().__init__()
        self.norm = FalconMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = FalconMambaMixer(config)

    def forward(self, x: torch.Tensor, step: _Step, layer: int) -> torch.Tensor:
        """x: the fp32 residual stream [B, T, D]; the mixer sees it rounded to the weights' dtype."""
        return x + self.mixer(self.norm(x.to(self.norm.weight.dtype)), step, layer)


class FalconMambaModel(nn.Module):
    def __init__(self, config: FalconMambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FalconMambaBlock(config) for _ in range(config.num_layers))
        self.norm_f = FalconMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class FalconMambaForCausalLM(nn.Module):
    """forward(input_ids [B, T], cache) -> logits. See the module docstring for the recurrence."""

    def __init__(self, config: FalconMambaConfig):
        super().__init__()
        self.config = config
        self.backbone = FalconMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> MambaCache:
        """A fixed-size state; `capacity` is accepted for the runtime's common interface and ignored."""
        ref = self.backbone.embeddings.weight
        c = self.config
        return MambaCache(c.num_layers, batch_size, c.intermediate_size, c.state_size, c.conv_kernel,
                          dtype or ref.dtype, device or ref.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: MambaCache | None = None,
        *,
        input_lengths: list[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run T new tokens of each row.

        input_ids: [B, T], right-padded when rows carry different numbers of new tokens (`input_lengths`); padded
        positions leave the state untouched and their logits are meaningless.
        cache: read, updated in place and advanced; None runs from an empty state (training, scoring).
        last_only: return logits [B, V] at each row's last real token only, instead of [B, T, V].
        """
        b, t = input_ids.shape
        device = input_ids.device
        counts = input_lengths if input_lengths is not None else [t] * b
        ragged = any(c != t for c in counts)
        lengths = torch.tensor(counts, dtype=torch.long, device=device) if ragged else None
        valid = (torch.arange(t, device=device)[None, :] < lengths[:, None])[:, :, None] if ragged else None
        step = _Step(cache, lengths, valid, single=cache is not None and t == 1 and not ragged)

        x = self.backbone.embeddings(input_ids).float()  # [B, T, D], the fp32 residual stream
        for i, layer in enumerate(self.backbone.layers):
            x = layer(x, step, i)
        if cache is not None:
            cache.advance(counts)
        if last_only:
            x = x[:, -1] if not ragged else x[torch.arange(b, device=device), lengths - 1]  # [B, D]
        x = self.backbone.norm_f(x)
        return linear(self.lm_head, x.to(self.lm_head.weight.dtype))
