"""``simsiam-transfer doctor``: which torch, CUDA and detectron2 this environment has."""

import sys

import torch
import torchvision

from simsiam_transfer.versions import detectron2_info


def run_doctor(args):
    d2 = detectron2_info()
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    rows = [
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("CUDA", f"{cuda} ({torch.cuda.device_count()} GPU)" if cuda else "not available (CPU only)"),
    ]
    if d2["origin"] == "missing":
        rows.append(("detectron2", f"NOT IMPORTABLE: {d2['error']}"))
    else:
        origin = {
            "upstream": "upstream build",
            "fallback": "offline fallback pb1-detectron2==0.6 (no C++ extension)",
        }[d2["origin"]]
        rows += [
            ("detectron2", f"{d2['version']} @ {d2['path']}"),
            ("detectron2 origin", origin),
            ("compiled ops", "present" if d2["compiled_ops"] else
             "absent: deformable conv, rotated boxes and fast COCOeval unavailable; C4 R-CNN unaffected"),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if d2["origin"] == "missing":
        print("detectron2 is required: run `make test` or "
              "`python -m simsiam_transfer.install_detectron2` (see docs/installing.md)", file=sys.stderr)
        return 1
    return 0
