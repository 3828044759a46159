"""Data parallelism over ``mx.distributed``: the small pieces the training CLIs share.

Every rank runs the same program on its own shard of each global batch; gradients are summed
across ranks with MLX's collectives (``mx.distributed.all_sum``, through
``mlx.nn.utils.average_gradients``, which concatenates the gradient tree into large buffers so a
small model needs a single collective per step). Nothing here knows the transport: the group is
whatever ``mx.distributed.init()`` finds (ring, JACCL, MPI or NCCL, as set up by ``mlx.launch``);
a process started without a launcher is a group of one and every helper is then a no-op.

Conventions used by ``train.py`` and ``lora.py``:

* ``--batch-size`` is per rank; the global batch is ``batch_size * world_size`` rows, drawn by
  every rank from the same seeded order, and rank ``r`` takes rows ``r::world_size`` of it
  (:func:`shard`), so the ranks together see exactly the batch one process would see with
  ``--batch-size batch_size * world_size``.
* Gradients, losses and token counts are token-weighted global means / sums
  (:func:`reduce_step`), so a step equals the single-process step on the combined batch.
* Only rank 0 writes files (:func:`is_main`), followed by a :func:`barrier`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

try:
    from mlx.nn.utils import average_gradients as _mlx_average_gradients
except ImportError:  # older MLX: the same fused all_sum, written out below
    _mlx_average_gradients = None

Group = mx.distributed.Group


class DistributedError(ValueError):
    """The ranks disagree about something they must share (weights, checkpoint); one line."""


_GROUP: Optional[Group] = None


def init(backend: str = "any") -> Group:
    """The global group (cached): all launched processes, or a group of one without a launcher."""
    global _GROUP
    if _GROUP is None:
        _GROUP = mx.distributed.init(strict=False, backend=backend)
    return _GROUP


def get_group(group: Optional[Group] = None) -> Group:
    return group if group is not None else init()


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(group: Optional[Group] = None) -> World:
    g = get_group(group)
    return World(g.rank(), g.size())


def is_main(group: Optional[Group] = None) -> bool:
    return get_group(group).rank() == 0


def shard(rows: Sequence, rank: int, size: int):
    """Rank ``rank``'s share of a global batch: rows ``rank::size`` (interleaved, so ranks get
    similar lengths from a length-sorted batch)."""
    return rows[rank::size]


# ----------------------------------------------------------------------------- collectives
def _fused_mean(tree, group: Group, force: bool = False):
    """Mean over ranks of a tree of float32 arrays, as few all_sums as the bucket size allows.
    ``force``: always take the concatenate + all_sum route (mlx's helper skips a group of one)."""
    if _mlx_average_gradients is not None and not force:
        return _mlx_average_gradients(tree, group)
    flat = tree_flatten(tree)
    big = mx.concatenate([v.reshape(-1) for _, v in flat])
    big = mx.distributed.all_sum(big, group=group) / group.size()
    out, i = [], 0
    for k, v in flat:
        out.append((k, big[i: i + v.size].reshape(v.shape)))
        i += v.size
    return tree_unflatten(out)


def average_gradients(grads, group: Optional[Group] = None):
    """Plain mean of a gradient tree over ranks (``mlx.nn.utils.average_gradients``: one fused
    all_sum per 32 MiB bucket). Identity on a group of one."""
    g = get_group(group)
    if g.size() == 1:
        return grads
    if _mlx_average_gradients is not None:
        return _mlx_average_gradients(grads, g)
    return tree_map(lambda m, x: m.astype(x.dtype), _fused_mean(tree_map(lambda x: x.astype(mx.float32), grads), g),
                    grads)


def all_sum_tree(tree, group: Optional[Group] = None):
    """Sum of a tree of arrays over ranks, in float32, through the fused (bucketed) all_sum; the
    arrays come back in their own dtypes. Identity on a group of one."""
    g = get_group(group)
    n = g.size()
    if n == 1:
        return tree
    mean = _fused_mean(tree_map(lambda x: x.astype(mx.float32), tree), g)
    return tree_map(lambda m, x: (m * n).astype(x.dtype), mean, tree)


def reduce_step(grads, loss: mx.array, ntoks: mx.array, group: Optional[Group] = None, force: bool = False
                ) -> Tuple[Any, mx.array, mx.array]:
    """Token-weighted global step from each rank's (mean-loss gradients, mean loss, token count):
    returns (sum_r n_r g_r / N, sum_r n_r loss_r / N, N) with N = sum_r n_r, i.e. the gradient and
    loss of the mean over the combined batch. One fused all_sum carries the gradients and both
    scalars. Identity on a group of one, unless ``force`` (measuring the distributed path's own
    cost at world size 1)."""
    g = get_group(group)
    if g.size() == 1 and not force:
        return grads, loss, ntoks
    n = ntoks.astype(mx.float32)
    packed = {"g": tree_map(lambda x: x.astype(mx.float32) * n, grads),
              "s": mx.stack([loss.astype(mx.float32) * n, n])}
    mean = _fused_mean(packed, g, force)     # every entry divided by size: the size cancels below
    total = mean["s"][1]
    out = tree_map(lambda m, x: (m / total).astype(x.dtype), mean["g"], grads)
    return out, mean["s"][0] / total, total * g.size()


def all_sum_scalars(values: Sequence[float], group: Optional[Group] = None) -> List[float]:
    g = get_group(group)
    if g.size() == 1:
        return [float(v) for v in values]
    s = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float32)), group=g)
    return [float(v) for v in np.array(s)]


def broadcast_scalar(value: float, group: Optional[Group] = None) -> float:
    """Rank 0's ``value`` on every rank (for decisions taken from one clock, e.g. time budgets)."""
    g = get_group(group)
    if g.size() == 1:
        return value
    return all_sum_scalars([value if g.rank() == 0 else 0.0], g)[0]


def any_rank(flag: bool, group: Optional[Group] = None) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return all_sum_scalars([1.0 if flag else 0.0], group)[0] > 0


def gather_scalars(values: Sequence[float], group: Optional[Group] = None) -> np.ndarray:
    """world_size x len(values) array of every rank's values."""
    g = get_group(group)
    local = np.asarray(values, dtype=np.float32).reshape(1, -1)
    if g.size() == 1:
        return local
    return np.array(mx.distributed.all_gather(mx.array(local), group=g))


def barrier(group: Optional[Group] = None) -> None:
    """Wait until every rank gets here (an all_sum of a scalar)."""
    g = get_group(group)
    if g.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=g))


# ----------------------------------------------------------------------------- checks
def _arrays(tree):
    return [(k, v) for k, v in tree_flatten(tree) if isinstance(v, mx.array)]


def checksums(tree) -> Tuple[List[str], mx.array]:
    """(names, float32 vector of two numbers per array): the sum of squares and a sum with fixed
    position weights (catches permutations). Equal weights give bitwise equal checksums on equal
    hardware."""
    names, parts = [], []
    for k, v in _arrays(tree):
        x = v.reshape(-1).astype(mx.float32)
        w = (mx.arange(x.size) % 13).astype(mx.float32) - 6.0
        parts += [mx.sum(x * x), mx.sum(x * w)]
        names.append(k)
    return names, (mx.stack(parts) if parts else mx.zeros((0,)))


def check_identical(tree, group: Optional[Group] = None, what: str = "parameters") -> None:
    """Raise DistributedError on every rank unless every rank holds the same ``tree`` (compared
    by :func:`checksums`, relative tolerance 1e-5 for mixed hardware). A collective: call it on
    all ranks."""
    g = get_group(group)
    if g.size() == 1:
        return
    names, local = checksums(tree)
    allc = np.array(mx.distributed.all_gather(local.reshape(1, -1), group=g)).astype(np.float64)
    ref = allc[0]
    sq = np.abs(ref[0::2])
    sizes = np.array([v.size for _, v in _arrays(tree)], dtype=np.float64)
    scale = np.repeat(np.sqrt(sq * sizes) * 6 + sq, 2) + 1e-30
    bad = np.where((np.abs(allc - ref[None]) > 1e-5 * scale[None]).any(axis=0))[0]
    if bad.size:
        ranks = [r for r in range(allc.shape[0]) if not np.allclose(allc[r], ref, rtol=0, atol=0)]
        first = names[int(bad[0]) // 2]
        raise DistributedError(f"the ranks start from different {what} (first difference in '{first}'; "
                               f"ranks {ranks} differ from rank 0): every rank must use the same model, "
                               f"seed and checkpoint")
