"""SimSiam's loss, Eq. (1)-(4), with the similarity and symmetrisation ablations (Sec. 4.5, 4.6).

The default path computes exactly what the official code does (``nn.CosineSimilarity`` along channels,
``-(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5``), operation for operation, so the loss and its
gradients equal the official builder's bit for bit (tests/test_methods.py)."""

import torch.nn.functional as F


def cosine(p, z):
    """<p/|p|, z/|z|> along channels, averaged over the batch (torch's cosine_similarity, as the official)."""
    return F.cosine_similarity(p, z, dim=1).mean()


def cross_entropy_similarity(p, z):
    """Sec. 4.5: softmax(z) . log softmax(p) along channels, averaged over the batch."""
    return (F.softmax(z, dim=1) * F.log_softmax(p, dim=1)).sum(dim=1).mean()


SIMILARITIES = {"cosine": cosine, "cross_entropy": cross_entropy_similarity}


def negative_cosine(p, z):
    """D(p, z) = -cos(p, z), averaged over the batch; minimum -1."""
    return -cosine(p, z)


def simsiam_loss(p1, p2, z1, z2, stop_gradient=True, similarity="cosine", symmetric=True):
    """Symmetric -(S(p1, sg(z2)) + S(p2, sg(z1))) / 2 by default; asymmetric keeps -S(p1, sg(z2))."""
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    similar = SIMILARITIES[similarity]
    if not symmetric:
        return -similar(p1, z2)
    return -(similar(p1, z2) + similar(p2, z1)) * 0.5


def normalized_std(z):
    """Mean over channels of the per-channel std of l2-normalised z (collapse -> 0; healthy ~ 1/sqrt(d))."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
