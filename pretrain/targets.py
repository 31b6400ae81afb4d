"""Sec. 5.2 proof-of-concept targets: the moving-average memory (no predictor) and k-step caching."""

import torch
import torch.nn.functional as F

from pretrain.distributed import all_gather_cat


class MovingAverageTargets:
    """eta_x <- m * eta_x + (1 - m) * F(T'(x)), one l2-normalised vector per image.

    View 1 is pulled toward m*eta_x + (1-m)*F(view 2) and vice versa, so m = 0 is exactly
    SimSiam without a predictor; the memory then stores m*eta_x + (1-m)*mean of both views.
    An image's first visit uses m = 0 (eta_x has no value yet). Memory: images x dim floats.
    """

    def __init__(self, num_images, dim, momentum, device):
        self.momentum = momentum
        self.memory = torch.zeros(num_images, dim, device=device)
        self.seen = torch.zeros(num_images, dtype=torch.bool, device=device)

    @torch.no_grad()
    def targets(self, index, z1, z2, dist_info):
        n1, n2 = F.normalize(z1.detach().float(), dim=1), F.normalize(z2.detach().float(), dim=1)
        m = torch.where(self.seen[index], self.momentum, 0.0).unsqueeze(1)
        eta = self.memory[index]
        t1, t2 = m * eta + (1 - m) * n2, m * eta + (1 - m) * n1
        updated = F.normalize(m * eta + (1 - m) * 0.5 * (n1 + n2), dim=1)
        all_index = all_gather_cat(index, dist_info)
        self.memory[all_index] = all_gather_cat(updated, dist_info)
        self.seen[all_index] = True
        return t1, t2

    def state_dict(self):
        return {"memory": self.memory.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state):
        self.memory.copy_(state["memory"])
        self.seen.copy_(state["seen"])


@torch.no_grad()
def cached_targets(encoder, batches, device):
    """Targets for k upcoming SGD steps, computed once with the current weights (Eq. 10)."""
    out = []
    for x1, x2, _ in batches:
        out.append((encoder(x1.to(device, non_blocking=True)).float(),
                    encoder(x2.to(device, non_blocking=True)).float()))
    return out
