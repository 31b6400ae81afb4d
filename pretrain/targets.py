"""Sec. 5.2 proof-of-concept targets: the moving-average memory (no predictor) and k-step alternation."""

from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from pretrain.distributed import DistInfo, all_gather_cat, all_gather_varlen


def view_mean(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """l2-normalised mean of the two views' normalised outputs: the memory's per-image value."""
    return F.normalize(0.5 * (F.normalize(z1.float(), dim=1) + F.normalize(z2.float(), dim=1)), dim=1)


class MovingAverageTargets:
    """eta_x <- m * eta_x + (1 - m) * F(T'(x)), one l2-normalised vector per image.

    View 1 is pulled toward m*eta_x + (1-m)*F(view 2) and vice versa, so m = 0 is exactly
    SimSiam without a predictor; the memory then stores m*eta_x + (1-m)*mean of both views.
    Before the first step the memory holds the initial network's output for every image
    (``initialize``): the paper's eta starts as "the output of a randomly initialized network".
    Memory: images x dim floats.
    """

    def __init__(self, num_images: int, dim: int, momentum: float, device: torch.device):
        self.momentum = momentum
        self.memory = torch.zeros(num_images, dim, device=device)
        self.initialized = False

    @torch.no_grad()
    def initialize(self, batches: Iterable, encoder: Callable, dist_info: DistInfo) -> None:
        """Fill every row from ``(x1, x2, index)`` batches (this rank's shard), gathered over ranks."""
        values, indices = [], []
        for x1, x2, index in batches:
            values.append(view_mean(encoder(x1), encoder(x2)))
            indices.append(index.to(self.memory.device))
        index = all_gather_varlen(torch.cat(indices), dist_info)
        self.memory[index] = all_gather_varlen(torch.cat(values), dist_info)
        self.initialized = True

    @torch.no_grad()
    def targets(self, index: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, dist_info: DistInfo):
        n1, n2 = F.normalize(z1.detach().float(), dim=1), F.normalize(z2.detach().float(), dim=1)
        m, eta = self.momentum, self.memory[index]
        t1, t2 = m * eta + (1 - m) * n2, m * eta + (1 - m) * n1
        updated = F.normalize(m * eta + (1 - m) * 0.5 * (n1 + n2), dim=1)
        self.memory[all_gather_cat(index, dist_info)] = all_gather_cat(updated, dist_info)
        return t1, t2

    def state_dict(self) -> dict:
        return {"memory": self.memory.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.copy_(state["memory"])
        self.initialized = True


def alternation(target_batches: Iterator, train_batches: Iterator, k: int, steps: int,
                compute_target: Callable, replay_state: Optional[Tuple[Callable, Callable]] = None):
    """k-step alternation (Eq. 7-8 with an inner loop of k SGD steps) holding only targets.

    For each chunk of k steps, ``compute_target(batch)`` runs on the next k batches of
    ``target_batches`` with the current weights and only its result is kept; then the same k
    batches are read again from ``train_batches`` (a second loader over the same sampler order
    and worker seeds) and yielded as ``(batch, target)``. ``replay_state`` = (get, set) of the
    main process's RNG, so augmentations drawn in-process (0 workers) repeat too.
    Memory: k x batch x (what ``compute_target`` returns), never k batches of images.
    """
    for start in range(0, steps, k):
        count = min(k, steps - start)
        state = replay_state[0]() if replay_state else None
        cached = [compute_target(next(target_batches)) for _ in range(count)]
        if replay_state:
            replay_state[1](state)
        for target in cached:
            yield next(train_batches), target
