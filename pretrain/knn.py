"""Weighted kNN classifier on frozen features (Wu et al. 2018), the paper's Fig. 2 progress monitor.

Under DDP every rank extracts the features of its own share of the images (no rank idles at a
barrier past the NCCL timeout), the shards are all-gathered and stay on the device.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain.distributed import DistInfo, all_gather_varlen, shard_indices


@torch.no_grad()
def extract_features(feature_fn: Callable, dataset: Dataset, device: torch.device,
                     dist_info: Optional[DistInfo] = None, batch_size: int = 256,
                     num_workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """l2-normalised features and labels of the whole ``dataset`` on ``device``, each rank doing its shard."""
    shard = Subset(dataset, shard_indices(len(dataset), dist_info))  # type: ignore[arg-type]
    feat_parts, label_parts = [], []
    for images, targets in DataLoader(shard, batch_size=batch_size, num_workers=num_workers):
        feat_parts.append(F.normalize(feature_fn(images.to(device, non_blocking=True)).float(), dim=1))
        label_parts.append(torch.as_tensor(targets).to(device))
    if feat_parts:
        feats, labels = torch.cat(feat_parts), torch.cat(label_parts)
    else:  # a rank with no image still joins the gather with an empty (0, dim) shard
        dim = feature_fn(dataset[0][0][None].to(device)).shape[1]
        feats, labels = torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    if dist_info is not None:
        feats, labels = all_gather_varlen(feats, dist_info), all_gather_varlen(labels, dist_info)
    return feats, labels


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
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(dim=1) == val_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / val_feats.shape[0]
