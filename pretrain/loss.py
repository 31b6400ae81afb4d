"""SimSiam's loss, Eq. (1)-(4), with the similarity and symmetrisation ablations (Sec. 4.5, 4.6)."""

import torch.nn.functional as F


def negative_cosine(p, z):
    """D(p, z) = -<p/|p|, z/|z|>, averaged over the batch; minimum -1."""
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def negative_cross_entropy_similarity(p, z):
    """Sec. 4.5: D(p, z) = -softmax(z) . log softmax(p) along channels, averaged over the batch."""
    return -(F.softmax(z, dim=1) * F.log_softmax(p, dim=1)).sum(dim=1).mean()


SIMILARITIES = {"cosine": negative_cosine, "cross_entropy": negative_cross_entropy_similarity}


def simsiam_loss(p1, p2, z1, z2, stop_gradient=True, similarity="cosine", symmetric=True):
    """Symmetric D(p1, sg(z2))/2 + D(p2, sg(z1))/2 by default; asymmetric keeps D(p1, sg(z2))."""
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    distance = SIMILARITIES[similarity]
    if not symmetric:
        return distance(p1, z2)
    return 0.5 * distance(p1, z2) + 0.5 * distance(p2, z1)


def normalized_std(z):
    """Mean over channels of the per-channel std of l2-normalised z (collapse -> 0; healthy ~ 1/sqrt(d))."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
