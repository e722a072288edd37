"""Step-level batching of UNet calls across concurrent requests.

Requests that run in their own threads (the edge's workers) hand each UNet call to one
`StepBatcher`. Its thread concatenates the calls that are waiting and compatible (same
latent and text shapes, dtype, ToMe ratio and conditioning keys) into one forward pass and
gives every caller its own rows back. A request joins at a step boundary (its next call)
and leaves when its own step count is done, so requests with different step counts,
timesteps, seeds and guidance scales share calls: it is continuous batching at the
granularity of one denoising step. Everything per request stays in the request's thread:
its scheduler, its generator, the guidance combination and its stop checks, so a request
that is cancelled or runs out of time only stops submitting and never disturbs the others.

Exactness: the UNet computes every row independently, with its own timestep (the call
passes a per-row timestep vector). ToMe is the one place where rows of a call meet: tomesd
draws one random destination pattern per call from one generator. Batched calls draw one
pattern per request, from that request's own generator, in the order an unbatched call
would, and apply it to that request's rows (`RowGenerators`), so each request's output equals
its unbatched output up to floating-point reassociation in the batched kernels (tested ≤ 1e-5).

A batch goes out when `max_batch` calls are waiting, when every request currently inside a
`StepBatcher.session` has submitted its call (nobody else could join), or `max_wait_s`
after its first call arrived, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import tomesd.merge
import torch

from meg.errors import InvalidInputError

from .tome import ToMeAdapter, unet_lock

__all__ = ["BatchStats", "RowGenerators", "StepBatcher"]


class RowGenerators:
    """Per-request ToMe generators of one batched UNet call: ``groups`` = [(generator, rows)].

    tomesd reads ``.device`` of its generator; the batched matcher below reads the groups.
    """

    def __init__(self, groups: list[tuple[torch.Generator, int]], *, use_rand: bool = True) -> None:
        self.groups = groups
        self.use_rand = use_rand
        """The adapter's setting; a group of odd rows (no guidance) draws no pattern, as tomesd does alone."""
        self.device = torch.device("cpu")


_tomesd_matching = tomesd.merge.bipartite_soft_matching_random2d


def _row_matching(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int, no_rand: bool = False,
                  generator: Any = None) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:  # fmt: skip
    """tomesd's bipartite soft matching with one random destination pattern per request.

    With a `RowGenerators` it draws, for each request in turn, the pattern tomesd would draw
    from that request's generator alone (none for an odd number of rows, as tomesd does) and
    gives it to that request's rows; anything else goes to tomesd unchanged.
    """
    if not isinstance(generator, RowGenerators) or r <= 0:
        return _tomesd_matching(metric, w, h, sx, sy, r, no_rand=no_rand, generator=generator)  # type: ignore[no-any-return]
    batch, n_tokens, _ = metric.shape
    if sum(rows for _, rows in generator.groups) != batch:
        raise ValueError(f"row groups cover {sum(rows for _, rows in generator.groups)} rows, the call has {batch}")
    hsy, wsx = h // sy, w // sx
    orders = []
    for gen, rows in generator.groups:
        if generator.use_rand and rows % 2 == 0:  # tomesd turns randomness off for an odd batch
            rand_idx = torch.randint(sy * sx, size=(hsy, wsx, 1), device=gen.device, generator=gen).to(metric.device)
        else:
            rand_idx = torch.zeros(hsy, wsx, 1, device=metric.device, dtype=torch.int64)
        buf_view = torch.zeros(hsy, wsx, sy * sx, device=metric.device, dtype=torch.int64)
        buf_view.scatter_(dim=2, index=rand_idx, src=-torch.ones_like(rand_idx, dtype=rand_idx.dtype))
        buf_view = buf_view.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if (hsy * sy) < h or (wsx * sx) < w:
            buf = torch.zeros(h, w, device=metric.device, dtype=torch.int64)
            buf[: hsy * sy, : wsx * sx] = buf_view
        else:
            buf = buf_view
        orders.append(buf.reshape(1, -1, 1).argsort(dim=1).expand(rows, n_tokens, 1))
    order = torch.cat(orders)  # [B, N, 1]: dst | src per row
    num_dst = hsy * wsx
    a_idx = order[:, num_dst:, :]
    b_idx = order[:, :num_dst, :]

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return (torch.gather(x, dim=1, index=a_idx.expand(batch, n_tokens - num_dst, c)),
                torch.gather(x, dim=1, index=b_idx.expand(batch, num_dst, c)))  # fmt: skip

    with torch.no_grad():
        normed = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(normed)
        scores = a @ b.transpose(-1, -2)
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = torch.gather(node_idx[..., None], dim=-2, index=src_idx)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = split(x)
        n, t1, c = src.shape
        unm = torch.gather(src, dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = torch.gather(src, dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        c = unm.shape[-1]
        src = torch.gather(dst, dim=-2, index=dst_idx.expand(batch, r, c))
        out = torch.zeros(batch, n_tokens, c, device=x.device, dtype=x.dtype)
        out.scatter_(dim=-2, index=b_idx.expand(batch, num_dst, c), src=dst)
        out.scatter_(dim=-2, index=torch.gather(a_idx, dim=1, index=unm_idx).expand(batch, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=torch.gather(a_idx, dim=1, index=src_idx).expand(batch, r, c), src=src)
        return out

    return merge, unmerge


# tomesd's patch calls `merge.bipartite_soft_matching_random2d` through the module, so this
# one assignment routes batched calls (and only those: anything without a RowGenerators goes
# to the original) to the per-request matcher.
tomesd.merge.bipartite_soft_matching_random2d = _row_matching


@dataclass
class _Call:
    x: torch.Tensor
    t: torch.Tensor
    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None
    tome_ratio: float
    generator: torch.Generator | None
    latent_hw: tuple[int, int]
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    out: torch.Tensor | None = None
    error: BaseException | None = None

    def key(self) -> tuple[Any, ...]:
        added = tuple(sorted((k, tuple(v.shape[1:])) for k, v in (self.added or {}).items()))
        return (tuple(self.x.shape[1:]), self.x.dtype, tuple(self.embeds.shape[1:]), self.tome_ratio, added,
                self.generator is None)  # fmt: skip


@dataclass
class BatchStats:
    """What the batcher did: calls, forward passes and how many calls each pass carried."""

    calls: int = 0
    forwards: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    busy_s: float = 0.0
    """Seconds spent inside batched forward passes."""

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "forwards": self.forwards, "busy_s": round(self.busy_s, 4),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}  # fmt: skip


class StepBatcher:
    """One thread that runs the UNet calls of concurrent requests together.

    Args:
        unet: the UNet every caller uses (its ToMe adapter is `tome`).
        tome: the adapter that patches ``unet`` per call.
        max_batch: most calls in one forward pass (≥ 1).
        max_wait_s: longest a call waits for others to join (≥ 0).
    """

    def __init__(self, unet: Any, tome: ToMeAdapter, *, max_batch: int = 8, max_wait_s: float = 0.005) -> None:
        if max_batch < 1:
            raise InvalidInputError(f"max_batch = {max_batch} must be at least 1", field="max_batch")
        if max_wait_s < 0:
            raise InvalidInputError(f"max_wait_s = {max_wait_s} must be non-negative", field="max_wait_s")
        self.unet = unet
        self.tome = tome
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._pending: list[_Call] = []
        self._active = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="meg-step-batcher", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[None]:
        """Mark one request's denoising loop: while inside, the batcher may wait for its call."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def call(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict[str, torch.Tensor] | None = None,
             *, tome_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """The UNet's noise prediction for ``x`` at timestep ``t`` (scalar) given ``embeds``,
        computed in a batch with whatever other calls are waiting; blocks until done."""
        item = _Call(x=x, t=t, embeds=embeds, added=added, tome_ratio=self.tome.check_ratio(tome_ratio),
                     generator=generator, latent_hw=(int(x.shape[-2]), int(x.shape[-1])), arrived=time.monotonic())  # fmt: skip
        with self._cond:
            if self._closed:
                raise RuntimeError("the step batcher is closed")
            self._pending.append(item)
            self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.out is not None
        return item.out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- the batching thread ---------------------------------------------------------------

    def _take(self) -> list[_Call] | None:
        """Wait for a batch to be due and take it (None once closed and drained)."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                first = self._pending[0]
                group = [c for c in self._pending if c.key() == first.key()][: self.max_batch]
                waited = time.monotonic() - first.arrived
                everyone_in = len(self._pending) >= self._active
                if len(group) >= self.max_batch or everyone_in or waited >= self.max_wait_s or self._closed:
                    taken = {id(c) for c in group}
                    self._pending = [c for c in self._pending if id(c) not in taken]
                    return group
                self._cond.wait(timeout=self.max_wait_s - waited)

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            started = time.perf_counter()
            try:
                outs = self._forward(group)
            except BaseException as exc:  # every caller of the batch gets the failure
                for c in group:
                    c.error = exc
                    c.done.set()
                continue
            for c, out in zip(group, outs, strict=True):
                c.out = out
                c.done.set()
            self.stats.calls += len(group)
            self.stats.forwards += 1
            self.stats.sizes[len(group)] += 1
            self.stats.busy_s += time.perf_counter() - started

    def _forward(self, group: list[_Call]) -> list[torch.Tensor]:
        rows = [int(c.x.shape[0]) for c in group]
        x = torch.cat([c.x for c in group])
        t = torch.cat([c.t.reshape(1).expand(n) for c, n in zip(group, rows, strict=True)]).to(x.device)
        embeds = torch.cat([c.embeds for c in group])
        added = None
        if group[0].added is not None:
            added = {k: torch.cat([c.added[k] for c in group if c.added is not None]) for k in group[0].added}
        first = group[0]
        generator: Any = None
        if first.generator is not None:
            generator = RowGenerators([(c.generator, n) for c, n in zip(group, rows, strict=True) if c.generator is not None],
                                      use_rand=self.tome.config.use_rand)  # fmt: skip
        with torch.no_grad(), unet_lock(self.unet), self.tome.applied(first.tome_ratio, generator=generator,
                                                                      latent_hw=first.latent_hw):  # fmt: skip
            out = self.unet(x, t, embeds, added_cond_kwargs=added, return_dict=False)[0]
        return list(out.split(rows))
