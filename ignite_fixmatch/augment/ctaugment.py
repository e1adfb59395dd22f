"""CTAugment (FixMatch paper, "CTA"; official code ``libml/ctaugment.py``): a strong augmentation whose
magnitudes are learned while the model trains.

Every parameter of the 19 ops (:mod:`.ctaugment_ops`) is split into bins, each with a weight (all 1 at the
start). A strong view is flip + crop, then ``DEPTH`` ops, each picked uniformly, each parameter drawn from
the bins whose weight (plus ``1 - DECAY``, over the largest) reaches ``THRESHOLD``, then Cutout at level 1.
Every labeled image of a step also gets a *probe* view (2 ops, parameters uniform over all bins); the
model's prediction on the probe says how label-preserving those bins are (proximity = 1 - 0.5 * L1
distance between the softmax and the one-hot label), and each bin a probe used moves toward it:
``w <- DECAY * w + (1 - DECAY) * proximity``.

What makes it exact and fast here:

* **Draws do not depend on the weights.** A sample's row holds only uniform numbers (its op choices, one
  ``v`` per parameter to pick a bin by inverse CDF, one ``r`` for the position inside the bin, Cutout
  centres), drawn from the sample's own generator like RandAugment's. Loader workers and prefetching
  therefore never see the weights: the trainer's ``batch_transform`` turns the rows into magnitudes with
  the weights of *this* step (:meth:`CTAPolicy.resolve`), so a resumed run draws what the uninterrupted
  one drew.
* **One policy for all processes.** The probes' (ops, bins, proximity) are gathered over processes in rank
  order and every process applies the same update (:meth:`CTAugmentViews.feedback`), so the weights stay
  identical everywhere (the known defect of ports that update per process). The weights are float64 on
  the CPU, updated in a fixed order, part of the checkpoint (``to_save["ctaugment"]``).
* **Applied per image or per batch.** ``data.augment: pil`` applies the ops image by image with Pillow
  (the official definitions), batched and device paths with the uint8 batch ops, which are pixel-identical
  (tests/test_ctaugment_ops.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ignite_fixmatch.augment.common import FILL_REFERENCE, Fill, check_mean_std, check_rng
from ignite_fixmatch.augment.ctaugment_ops import apply_batch, apply_pil
from ignite_fixmatch.augment.ctaugment_table import CTA_OP_INDEX, CTA_OPS, MAX_PARAMS
from ignite_fixmatch.augment.draws import FLIP_P, draw_flip_crop
from ignite_fixmatch.augment.geometry import flip_pad_crop
from ignite_fixmatch.augment.ops import normalize, pil_to_uint8
from ignite_fixmatch.augment.views import BatchedView, ParamSampler, to_uint8_view
from ignite_fixmatch.batch import DrawnBatch, TrainBatch

DEPTH = 2  # ops per strong (and probe) view
THRESHOLD = 0.80  # FixMatch's bin threshold (the official class default is 0.85)
DECAY = 0.99
CUTOUT = CTA_OP_INDEX["cutout"]
PROBE_BIN_SCALE = 0.999  # official update_rates: bin = int(u * bins * 0.999)

# Columns of a strong-view row: flip, crop left/top, then per op slot (op, v1, r1, v2, r2, cx, cy), then the
# final Cutout's centre. A probe row: per slot (op, u1, u2, cx, cy). Float64, like RandAugment's rows.
FLIP, LEFT, TOP = 0, 1, 2
SLOT = 7
STRONG_WIDTH = 3 + SLOT * DEPTH + 2
PROBE_SLOT = 5
PROBE_WIDTH = PROBE_SLOT * DEPTH


def _slot_start(k: int) -> int:
    return 3 + SLOT * k


# ---------------------------------------------------------------- draws (no weights involved)


def draw_strong_row(rng: random.Random, pad: int, flip: bool, size: tuple[int, int]) -> list[float]:
    """One sample's strong-view row from its own generator: flip/crop, DEPTH op slots, the final Cutout centre."""
    check_rng(rng)
    w, h = size
    flipped, left, top = draw_flip_crop(rng, pad, flip)
    row = [float(flipped), float(left), float(top)]
    for _ in range(DEPTH):
        row += [float(rng.randrange(len(CTA_OPS))), rng.random(), rng.random(), rng.random(), rng.random()]
        row += [float(rng.randrange(w)), float(rng.randrange(h))]
    return row + [float(rng.randrange(w)), float(rng.randrange(h))]


def draw_probe_row(rng: random.Random, size: tuple[int, int]) -> list[float]:
    """One labeled image's probe row: DEPTH ops, each parameter uniform in [0, 1), a Cutout centre per slot."""
    check_rng(rng)
    w, h = size
    row: list[float] = []
    for _ in range(DEPTH):
        row += [float(rng.randrange(len(CTA_OPS))), rng.random(), rng.random(), float(rng.randrange(w)), float(rng.randrange(h))]
    return row


def strong_rows_torch(n: int, pad: int, flip: bool, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``n`` strong-view rows from a torch.Generator (data on the device): the distributions of :func:`draw_strong_row`."""
    w, h = size
    g = dict(generator=generator, device=generator.device)
    out = torch.empty(n, STRONG_WIDTH, dtype=torch.float64, device=generator.device)
    out[:, FLIP] = (torch.rand(n, dtype=torch.float64, **g) < FLIP_P) if flip else 0.0
    out[:, LEFT] = torch.randint(0, 2 * pad + 1, (n,), **g)
    out[:, TOP] = torch.randint(0, 2 * pad + 1, (n,), **g)
    for k in range(DEPTH):
        s = _slot_start(k)
        out[:, s] = torch.randint(0, len(CTA_OPS), (n,), **g)
        out[:, s + 1 : s + 5] = torch.rand(n, 4, dtype=torch.float64, **g)
        out[:, s + 5] = torch.randint(0, w, (n,), **g)
        out[:, s + 6] = torch.randint(0, h, (n,), **g)
    out[:, -2] = torch.randint(0, w, (n,), **g)
    out[:, -1] = torch.randint(0, h, (n,), **g)
    return out


def probe_rows_torch(n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``n`` probe rows from a torch.Generator: the distributions of :func:`draw_probe_row`."""
    w, h = size
    g = dict(generator=generator, device=generator.device)
    out = torch.empty(n, PROBE_WIDTH, dtype=torch.float64, device=generator.device)
    for k in range(DEPTH):
        s = PROBE_SLOT * k
        out[:, s] = torch.randint(0, len(CTA_OPS), (n,), **g)
        out[:, s + 1 : s + 3] = torch.rand(n, 2, dtype=torch.float64, **g)
        out[:, s + 3] = torch.randint(0, w, (n,), **g)
        out[:, s + 4] = torch.randint(0, h, (n,), **g)
    return out


# ---------------------------------------------------------------- the learned policy


class CTAPolicy(nn.Module):
    """The bin weights of every op parameter (buffer ``weights``, float64, on the CPU) and the maths that
    read and update them. ``decay`` and ``threshold`` are the official names' values."""

    def __init__(self, decay: float = DECAY, threshold: float = THRESHOLD) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r} (CTAugment uses 0.99)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r} (FixMatch uses 0.80)")
        self.decay, self.threshold = decay, threshold
        self.params: list[tuple[int, int, int, int]] = []  # (op, parameter, start in weights, bins)
        param_of = np.full((len(CTA_OPS), MAX_PARAMS), -1, dtype=np.int64)
        start = 0
        for o, op in enumerate(CTA_OPS):
            for j, bins in enumerate(op.bins):
                param_of[o, j] = len(self.params)
                self.params.append((o, j, start, bins))
                start += bins
        self.max_bins = max(b for *_, b in self.params)
        self.param_of = torch.from_numpy(param_of)
        self.register_buffer("weights", torch.ones(start, dtype=torch.float64))

    # -- reading

    def probabilities(self) -> list[np.ndarray]:
        """Per parameter (in ``self.params`` order), the sampling probability of each bin (official rate_to_p, normalised)."""
        w = self.weights.numpy()
        out = []
        for _, _, start, bins in self.params:
            p = w[start : start + bins] + (1.0 - self.decay)
            p = p / p.max()
            p[p < self.threshold] = 0.0
            out.append(p / p.sum())
        return out

    def _cdf_table(self) -> Tensor:
        """(parameters + 1, max_bins) float64: each parameter's cumulative probabilities, +inf from its last
        usable bin on (so the inverse CDF never lands on a bin of probability 0); the extra last row (+inf)
        stands for 'no parameter'."""
        table = torch.full((len(self.params) + 1, self.max_bins), math.inf, dtype=torch.float64)
        for i, p in enumerate(self.probabilities()):
            last = int(np.flatnonzero(p)[-1])
            table[i, :last] = torch.from_numpy(np.cumsum(p)[:last])
        return table

    def resolve(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Strong-view rows (N, STRONG_WIDTH) -> (op ids (N, DEPTH) int64, args (N, DEPTH, 2) float64 in [0, 1],
        Cutout centres (N, DEPTH, 2) int64, final Cutout centres (N, 2) int64), with the current weights.

        A parameter's bin is the inverse CDF of its probabilities at ``v``; its value ``(bin + r) / bins``."""
        dev = rows.device
        cdf = self._cdf_table().to(dev)
        bins = torch.tensor([b for *_, b in self.params] + [1], dtype=torch.float64, device=dev)
        param_of = torch.where(self.param_of < 0, len(self.params), self.param_of).to(dev)
        ids = torch.stack([rows[:, _slot_start(k)] for k in range(DEPTH)], 1).long()
        args = torch.zeros(rows.shape[0], DEPTH, MAX_PARAMS, dtype=torch.float64, device=dev)
        for k in range(DEPTH):
            s = _slot_start(k)
            for j in range(MAX_PARAMS):
                p = param_of[ids[:, k], j]
                v, r = rows[:, s + 1 + 2 * j], rows[:, s + 2 + 2 * j]
                b = (cdf[p] <= v.unsqueeze(1)).sum(1).to(torch.float64)
                args[:, k, j] = torch.where(p < len(self.params), (b + r) / bins[p], 0.0)
        centres = torch.stack([rows[:, _slot_start(k) + 5 : _slot_start(k) + 7] for k in range(DEPTH)], 1).long()
        return ids, args, centres, rows[:, -2:].long()

    @staticmethod
    def probe_ops(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Probe rows (N, PROBE_WIDTH) -> (op ids (N, DEPTH), args (N, DEPTH, 2): the uniform values themselves,
        Cutout centres (N, DEPTH, 2))."""
        r = rows.view(rows.shape[0], DEPTH, PROBE_SLOT)
        return r[:, :, 0].long(), r[:, :, 1:3].contiguous(), r[:, :, 3:5].long()

    # -- learning

    @torch.no_grad()
    def update(self, ids: Tensor, args: Tensor, proximity: Tensor) -> None:
        """Move every bin each probe used toward its proximity, probe by probe in the given order (the
        gathered order, the same on every process), slot by slot, parameter by parameter, as the official
        ``update_rates``: ``w[bin] = decay * w[bin] + (1 - decay) * proximity``, bin = int(u * bins * 0.999)."""
        w = self.weights.numpy()  # a view: updates the buffer in place
        ids_np, args_np, prox = ids.cpu().numpy(), args.cpu().numpy(), proximity.cpu().to(torch.float64).numpy()
        param_of = self.param_of.numpy()
        for i in range(ids_np.shape[0]):
            for k in range(ids_np.shape[1]):
                for j in range(MAX_PARAMS):
                    p = param_of[ids_np[i, k], j]
                    if p < 0:
                        continue
                    _, _, start, bins = self.params[p]
                    b = start + int(args_np[i, k, j] * bins * PROBE_BIN_SCALE)
                    w[b] = w[b] * self.decay + prox[i] * (1.0 - self.decay)

    # -- showing

    def param_names(self) -> list[str]:
        """One name per parameter: the op's, with the parameter's where the op has two (rescale.scale, rescale.method)."""
        second = {"rescale": ("scale", "method")}
        return [CTA_OPS[o].name + (f".{second[CTA_OPS[o].name][j]}" if CTA_OPS[o].name in second else "") for o, j, *_ in self.params]

    def grid(self) -> tuple[list[str], np.ndarray]:
        """(row names, (parameters, max_bins) probabilities, NaN past a parameter's bins): the policy as an image or table."""
        grid = np.full((len(self.params), self.max_bins), np.nan)
        for i, p in enumerate(self.probabilities()):
            grid[i, : len(p)] = p
        return self.param_names(), grid

    def table(self) -> str:
        """The policy as text, one line per parameter (the official ``stats()``): each bin's probability."""
        names, grid = self.grid()
        width = max(map(len, names))
        return "\n".join(f"{n:<{width}}  " + " ".join(f"{v:.2f}" for v in row[~np.isnan(row)]) for n, row in zip(names, grid))

    def summary(self) -> dict[str, Any]:
        """The policy for results and trackers: per parameter, its bins' probabilities (plain lists)."""
        names, grid = self.grid()
        return {n: [round(float(v), 6) for v in row[~np.isnan(row)]] for n, row in zip(names, grid)}


# ---------------------------------------------------------------- applying


def _to_pil(x: Tensor) -> Image.Image:
    a = x.permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")


def apply_ops(x: Tensor, ids: Tensor, args: Tensor, centres: Tensor, with_pil: bool) -> Tensor:
    """Apply each sample's op slots (ids (N, S), args (N, S, 2), centres (N, S, 2)) to uint8 (N, C, H, W), in slot order."""
    if not with_pil:
        for k in range(ids.shape[1]):
            x = apply_batch(x, ids[:, k], args[:, k], centres[:, k])
        return x
    out = []
    host = x.cpu()
    for i in range(host.shape[0]):
        img = _to_pil(host[i])
        for k in range(ids.shape[1]):
            op = CTA_OPS[int(ids[i, k])]
            img = apply_pil(img, op.name, [float(a) for a in args[i, k, : len(op.bins)]], (int(centres[i, k, 0]), int(centres[i, k, 1])))
        out.append(pil_to_uint8(img))
    return torch.stack(out).to(x.device)


class StrongDraws:
    """The strong view's draws, in the interface of :class:`.views.BatchedView` that the streams call."""

    def __init__(self, pad: int, flip: bool) -> None:
        self.pad, self.flip = pad, flip

    def sample(self, rng: random.Random, size: tuple[int, int]) -> list[float]:
        return draw_strong_row(rng, self.pad, self.flip, size)

    def sample_torch(self, n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        return strong_rows_torch(n, self.pad, self.flip, size, generator)


class ProbeDraws:
    """The probe view's draws (labeled images), same interface."""

    def sample(self, rng: random.Random, size: tuple[int, int]) -> list[float]:
        return draw_probe_row(rng, size)

    def sample_torch(self, n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        return probe_rows_torch(n, size, generator)


class CTAugmentViews:
    """``data.randaugment: ctaugment``: the loaders (or the device stream) carry uint8 images and rows of
    uniform draws; this ``batch_transform`` makes the weak views, the CTAugment strong views with this step's
    weights and the probe views, and :meth:`feedback` updates the policy from the model's view of the probes.

    ``with_pil``: apply the ops image by image with Pillow (``data.augment: pil``), else as uint8 batch ops."""

    def __init__(
        self, policy: CTAPolicy, pad: int, pad_mode: str, flip: bool, mean: Sequence[float], std: Sequence[float],
        channels_last: bool = False, fill: Fill = FILL_REFERENCE, with_pil: bool = False,
    ) -> None:
        self.policy, self.with_pil = policy, with_pil
        self.weak = BatchedView(None, pad, pad_mode, flip, fill)
        self.strong = StrongDraws(pad, self.weak.flip)
        self.probe = ProbeDraws()
        self.pad, self.pad_mode = pad, pad_mode
        self.mean, self.std = check_mean_std(mean, std)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def labeled_views(self) -> list[Callable]:
        """Views for AugmentedDataset: (uint8 image, weak draws, probe draws)."""
        return [to_uint8_view, ParamSampler(self.weak), ParamSampler(self.probe)]

    def unlabeled_views(self) -> list[Callable]:
        """(uint8 image, weak draws, strong draws)."""
        return [to_uint8_view, ParamSampler(self.weak), ParamSampler(self.strong)]

    @staticmethod
    def batch(labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...]) -> DrawnBatch:
        x, x_weak, x_probe, y, _ = labeled
        u, u_weak, u_strong, u_y, u_idx = unlabeled
        return DrawnBatch(x=x, x_weak=x_weak, y=y, u=u, u_weak=u_weak, u_strong=u_strong, u_y=u_y, u_idx=u_idx, x_probe=x_probe)

    def _normalize(self, x: Tensor) -> Tensor:
        return normalize(x, self.mean, self.std, memory_format=self.memory_format)

    def strong_view(self, u: Tensor, rows: Tensor, with_pil: bool | None = None) -> Tensor:
        """uint8 strong views: flip + crop, the DEPTH ops with this step's weights, then Cutout at level 1."""
        rows_dev = rows.to(u.device)
        x = flip_pad_crop(u, rows_dev[:, FLIP], rows_dev[:, LEFT], rows_dev[:, TOP], self.pad, self.pad_mode)
        ids, args, centres, final = self.policy.resolve(rows)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], CUTOUT)], 1)
        args = torch.cat([args, torch.tensor([1.0, 0.0], dtype=args.dtype, device=args.device).expand(len(ids), 1, 2)], 1)
        centres = torch.cat([centres, final.unsqueeze(1)], 1)
        return apply_ops(x, ids.to(u.device), args.to(u.device), centres.to(u.device), self.with_pil if with_pil is None else with_pil)

    def __call__(self, batch: DrawnBatch) -> TrainBatch:
        x, u = batch["x"].contiguous(), batch["u"].contiguous()
        x_w, u_w = self.weak(x, batch["x_weak"]), self.weak(u, batch["u_weak"])
        ids, args, centres = CTAPolicy.probe_ops(batch["x_probe"])
        probe = apply_ops(x_w, ids.to(x.device), args.to(x.device), centres.to(x.device), self.with_pil)
        return TrainBatch(
            x=self._normalize(x_w), y=batch["y"], u_w=self._normalize(u_w), u_s=self._normalize(self.strong_view(u, batch["u_strong"])),
            u_y=batch["u_y"], u_idx=batch["u_idx"], probe=self._normalize(probe), probe_ids=ids, probe_args=args,
        )

    def augment(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """One image's strong view with the current weights, drawn from ``rng`` (for looking at it: ClearML's
        examples, ``suggest``'s disagreement), as :class:`.pil.StrongView.augment` for RandAugment."""
        rows = torch.tensor([draw_strong_row(rng, self.pad, self.weak.flip, img.size)], dtype=torch.float64)
        return _to_pil(self.strong_view(pil_to_uint8(img).unsqueeze(0), rows, with_pil=True)[0])

    def feedback(self, classify: Callable[[Tensor], Tensor], batch: Mapping[str, Tensor]) -> None:
        """Classify the probes (the trainer's model, inference mode, this step's weights), gather (ops, values,
        proximity) over processes in rank order and update the policy identically everywhere."""
        probs = classify(batch["probe"]).float()
        onehot = torch.nn.functional.one_hot(batch["y"], probs.shape[1]).float()
        proximity = 1.0 - 0.5 * (probs - onehot).abs().sum(1)
        stats = {"ids": batch["probe_ids"].to(probs.device), "args": batch["probe_args"].to(probs.device), "proximity": proximity}
        if idist.get_world_size() > 1:
            stats = {k: idist.all_gather(v.contiguous()) for k, v in stats.items()}
        self.policy.update(stats["ids"], stats["args"], stats["proximity"])


def policy_of(data: Any) -> CTAPolicy | None:
    """The run's CTAugment policy (``FixMatchData``), or None when its strong view is RandAugment."""
    batched = getattr(data, "batched", None)
    return batched.policy if isinstance(batched, CTAugmentViews) else None
