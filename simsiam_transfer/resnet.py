"""ResNet facts every stage shares: depths, block types, stage sizes, and ImageNet's input statistics."""

from typing import Dict, Tuple

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
