"""Weighted kNN classifier on frozen features (Wu et al. 2018), the paper's Fig. 2 progress monitor."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(feature_fn, loader, device):
    feats, labels = [], []
    for images, targets in loader:
        feats.append(F.normalize(feature_fn(images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_top1(train_feats, train_labels, val_feats, val_labels, num_classes, k=200, t=0.07,
                      chunk=256):
    """Top-1 accuracy (%) of cosine-similarity kNN with exp(sim / t) vote weights."""
    k = min(k, train_feats.shape[0])
    correct = 0
    for start in range(0, val_feats.shape[0], chunk):
        sims = val_feats[start:start + chunk] @ train_feats.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / t).exp()
        votes = torch.zeros(sims.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(dim=1) == val_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / val_feats.shape[0]
