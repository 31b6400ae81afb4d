"""Pure key renaming between torchvision ResNet names and detectron2 ResNet names."""

import re

_BN = re.compile(r"(^|\.)bn(\d)\.")


def rename_torchvision_to_detectron2(key):
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``; ``conv1.weight`` -> ``stem.conv1.weight``."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = _BN.sub(lambda m: f"{m.group(1)}conv{m.group(2)}.norm.", key)
    key = key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return key


def rename_state_dict(state_dict):
    return {rename_torchvision_to_detectron2(k): v for k, v in state_dict.items()}
