"""ResNet facts every stage shares: depths, block types, stage sizes, and ImageNet's input statistics."""

import re
from typing import Any, Dict, List, Mapping, Tuple

# ImageNet RGB mean/std in [0, 1] (torchvision's); detectron2 configs hold them x255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# depth -> (block type, blocks in res2..res5), as torchvision and detectron2 build them.
RESNETS: Dict[int, Tuple[str, Tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
DEPTH_OF_LAYOUT = {layout: depth for depth, layout in RESNETS.items()}
# Pretraining backbones (torchvision names); 152 is left out as the paper never uses it.
PRETRAIN_BACKBONES = tuple(f"resnet{d}" for d in RESNETS if d != 152)


def residual_branch_gammas(state: Mapping[str, Any]) -> List[List[Any]]:
    """Per stage (layer1..layer4 = res2..res5), the scale (gamma) tensor of each residual branch's last
    BN, from torchvision-named weights: ``bn3`` in bottleneck blocks, ``bn2`` in basic ones. Zero-init
    residuals start them at 0; with ``ZERO_INIT_RESIDUAL False`` they start at 1."""
    last_bn = "bn3" if "layer1.0.bn3.weight" in state else "bn2"
    stages: List[List[Any]] = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^layer{stage}\.(\d+)\.{last_bn}\.weight$")
        found = sorted((int(m.group(1)), key) for key in state for m in [pattern.match(key)] if m)
        stages.append([state[key] for _, key in found])
    return stages


def pooled_features(encoder: Any, x: Any) -> Any:
    """A torchvision ResNet's globally pooled backbone output (before its ``fc`` head, whatever that is):
    what kNN monitors and linear probes read."""
    x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
    x = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
    return encoder.avgpool(x).flatten(1)
