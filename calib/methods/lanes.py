"""Lanes: S independent copies of a small model trained side by side in one pass.

Every trainable head of calib (CLIP+ERM's and CFR's projection, the contrastive adapter, GroupDRO's
linear head) is a :class:`LaneModule`: its parameters and buffers carry a leading lane dimension ``S``,
its forward maps inputs ``[n, d_in]`` (shared by all lanes) or ``[S, n, d_in]`` to ``[S, n, C]``, and
the lanes never mix, so the gradient of ``loss.sum()`` (``loss [S]``, one term per lane) with respect to
lane s's parameters is that of lane s's loss alone.  SGD and Adam update element-wise, so one optimiser
over the stacked parameters is S independent optimisers.  Each lane owns its random streams (batch
order, sampling, dropout: :func:`lane_dropout`), so a lane of a batched run repeats the single run of its
seed; ``tests/test_lanes.py`` checks that epoch by epoch.

Why: on small heads a training step costs per-op overhead (Python, autograd, the optimiser), not
arithmetic; S lanes pay it once.  At real sizes the lanes' matrix products are batched (``bmm``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LaneModule(nn.Module):
    """A module whose parameters and buffers stack ``S`` lanes on dimension 0 (except ``shared`` buffers)."""

    shared: tuple[str, ...] = ()  # buffer names common to all lanes (e.g. the frozen text prototypes)

    @property
    def lanes(self) -> int:
        return next(v for k, v in self.state_dict().items() if k not in self.shared).shape[0]

    def lane_state(self, s: int) -> dict[str, torch.Tensor]:
        """A copy of lane ``s``'s parameters and buffers (one lane's checkpoint)."""
        return {k: v[s].detach().clone() for k, v in self.state_dict().items() if k not in self.shared}

    def load_lane_state(self, s: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.state_dict().items():
                if k not in self.shared:
                    v[s].copy_(state[k])

    def select(self, lanes: Sequence[int]) -> LaneModule:
        """A copy holding only ``lanes`` (in that order); ``select([s])`` is lane s on its own."""
        out = copy.deepcopy(self)
        index = torch.as_tensor(list(lanes), dtype=torch.long)
        with torch.no_grad():
            for name, p in list(out.named_parameters(recurse=False)):
                setattr(out, name, nn.Parameter(p.detach()[index.to(p.device)].clone(), requires_grad=p.requires_grad))
            for name, b in list(out.named_buffers(recurse=False)):
                if name not in self.shared:
                    setattr(out, name, b[index.to(b.device)].clone())
        out.extra_lane_state_select(index)
        return out

    def extra_lane_state_select(self, index: torch.Tensor) -> None:
        """Hook for per-lane Python state (lists of options) when lanes are selected."""


def lane_dropout(
    x: torch.Tensor, p: Sequence[float], generators: Sequence[torch.Generator | None], training: bool = True
) -> torch.Tensor:
    """Dropout of ``x [S, ...]`` with rate ``p[s]`` in lane s, its mask drawn from ``generators[s]``.

    The same numbers as ``torch.nn.functional.dropout`` on lane s alone after ``torch.manual_seed`` of
    that generator's seed (``bernoulli_(1 - p)`` scaled by ``1 / (1 - p)``); a lane with ``p = 0`` draws
    nothing, as ``F.dropout`` does not.
    """
    if not training or not any(v > 0 for v in p):
        return x
    out = []
    for s, rate in enumerate(p):
        if rate > 0:
            noise = torch.empty_like(x[s]).bernoulli_(1 - rate, generator=generators[s]).div_(1 - rate)
            out.append(x[s] * noise)
        else:
            out.append(x[s])
    return torch.stack(out)


class _Unit(torch.autograd.Function):
    """``x / max(||x||, 1e-12)`` along the last dimension, with a two-pass backward
    ``(g - y (y . g)) / ||x||``: the same forward as ``F.normalize`` bit for bit, a gradient equal to float
    rounding, at a third of the memory traffic (its autograd graph makes five full-size passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
        y = x / n
        ctx.save_for_backward(y, n)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        y, n = ctx.saved_tensors
        dot = torch.linalg.vecdot(y, g)[..., None]  # one pass, no [..., d] temporary
        return torch.addcmul(g, y, dot, value=-1).div_(n)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [..., d]`` scaled to unit L2 norm (``F.normalize(x, dim=-1)``), with a leaner backward."""
    return _Unit.apply(x)


def lane_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per lane: ``logits [S, n, C]``, ``y [S, n]`` -> ``[S]``."""
    S, n, C = logits.shape
    return F.cross_entropy(logits.reshape(S * n, C), y.reshape(S * n), reduction="none").view(S, n).mean(1)


def lane_generators(seeds: Sequence[int], offset: int = 0, device: torch.device | str = "cpu") -> list:
    """One generator per lane, seeded ``seed + offset`` (``device``: where its draws are made)."""
    return [torch.Generator(device=device).manual_seed(int(s) + offset) for s in seeds]


def per_lane(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``[S, 1, 1, ...]`` broadcastable per-lane scalars for a tensor shaped like ``like [S, ...]``."""
    t = torch.as_tensor(list(values), dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1)))
