"""``simsiam-transfer linear``: the paper's linear evaluation on a frozen backbone.

As the official ``main_lincls.py``: backbone from a pretraining checkpoint, frozen and kept in
eval mode (BN statistics never change); a linear classifier (init N(0, 0.01), bias 0) trained
with SGD momentum 0.9 (LARS with trust 0.001 by default, like the official LARC), lr =
BASE_LR x batch / 256 with cosine decay per epoch; train views RandomResizedCrop + flip,
val views resize + centre crop. Top-1 on the val folder is written per epoch to
``OUTPUT_DIR/linear/metrics.jsonl``; the run resumes from ``OUTPUT_DIR/linear/checkpoint_last.pth``.
"""

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from pretrain.data import LabeledFolder, eval_transform
from pretrain.engine import seed_everything
from pretrain.hooks import write_metrics_file
from pretrain.model import SimSiam
from pretrain.schedule import apply_lr, initial_lr, lr_at_epoch
from simsiam_transfer import atomic
from simsiam_transfer.checkpoints import extract_backbone
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD


class LARS(torch.optim.Optimizer):
    """SGD whose per-tensor lr is scaled by trust * |w| / |grad| (LARC without clipping, as the official)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                w_norm, g_norm = p.norm(), grad.norm()
                if w_norm > 0 and g_norm > 0:
                    grad = grad * (group["trust"] * w_norm / g_norm)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])


def load_frozen_backbone(path, cfg):
    """A SimSiam backbone from our (or the official) checkpoint, frozen, in eval mode."""
    backbone, info = extract_backbone(path)
    depth = int(cfg.MODEL.BACKBONE.replace("resnet", ""))
    if info["depth"] != depth:
        raise UserError(f"{path}: holds a ResNet-{info['depth']}, but MODEL.BACKBONE is {cfg.MODEL.BACKBONE}")
    model = SimSiam(cfg.MODEL.BACKBONE, dim=cfg.MODEL.DIM, pred_dim=cfg.MODEL.PRED_DIM)
    missing = model.encoder.load_state_dict(backbone, strict=False).missing_keys
    if [k for k in missing if not k.startswith("fc.")]:
        raise UserError(f"{path}: backbone tensors missing: {missing[:3]}")
    model.requires_grad_(False)
    return model.eval()


def run_linear(cfg):
    out = Path(cfg.OUTPUT_DIR) / "linear"
    pretrained = cfg.LINEAR.PRETRAINED or str(Path(cfg.OUTPUT_DIR) / "checkpoint_last.pth")
    if not (cfg.DATA.KNN_TRAIN_DIR and cfg.DATA.KNN_VAL_DIR):
        raise UserError("linear evaluation needs DATA.KNN_TRAIN_DIR and DATA.KNN_VAL_DIR (labeled image folders)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.SEED)
    model = load_frozen_backbone(pretrained, cfg).to(device)
    size = cfg.DATA.IMAGE_SIZE
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = LabeledFolder(cfg.DATA.KNN_TRAIN_DIR, train_tf, "DATA.KNN_TRAIN_DIR")
    val = LabeledFolder(cfg.DATA.KNN_VAL_DIR, eval_transform(size), "DATA.KNN_VAL_DIR", classes=train.classes)
    batch = min(cfg.LINEAR.BATCH_SIZE, len(train))
    train_loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                              num_workers=cfg.DATA.NUM_WORKERS)
    val_loader = DataLoader(val, batch_size=256, num_workers=cfg.DATA.NUM_WORKERS)

    classifier = nn.Linear(model.encoder.fc[0].in_features, len(train.classes)).to(device)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    init_lr = initial_lr(cfg.LINEAR.BASE_LR, batch)
    opt_cls = LARS if cfg.LINEAR.OPTIMIZER == "lars" else torch.optim.SGD
    optimizer = opt_cls(classifier.parameters(), lr=init_lr, momentum=0.9, weight_decay=cfg.LINEAR.WEIGHT_DECAY)

    history, start = [], 0
    ckpt_path = out / "checkpoint_last.pth"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
    for epoch in range(start, cfg.LINEAR.EPOCHS):
        apply_lr(optimizer, lr_at_epoch(init_lr, epoch, cfg.LINEAR.EPOCHS), init_lr)
        classifier.train()
        for images, labels in tqdm(train_loader, desc=f"linear {epoch + 1}/{cfg.LINEAR.EPOCHS}", leave=False):
            with torch.no_grad():
                feats = model.backbone_features(images.to(device))
            loss = nn.functional.cross_entropy(classifier(feats), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        top1 = evaluate(model, classifier, val_loader, device)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "top1": top1})
        atomic.torch_save({"classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                           "epoch": epoch + 1, "history": history}, ckpt_path)
        write_metrics_file(out, history)
    result = {"pretrained": pretrained, "top1": history[-1]["top1"],
              "best_top1": max(h["top1"] for h in history), "epochs": cfg.LINEAR.EPOCHS}
    atomic.write_json(out / "result.json", result)
    return result


@torch.no_grad()
def evaluate(model, classifier, loader, device):
    classifier.eval()
    correct = total = 0
    for images, labels in loader:
        logits = classifier(model.backbone_features(images.to(device)))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += labels.numel()
    return 100.0 * correct / total
