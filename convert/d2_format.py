"""Writing detectron2's pickle format for weights: ``{"model": {name: ndarray}, "__author__",
"matching_heuristics"}``. Reading it (arrays only, nothing executed) is the floor's
``simsiam_transfer.checkpoints.read_detectron2_pkl``, which detection uses too.
"""

import pickle

from simsiam_transfer import atomic

AUTHOR = "simsiam-transfer"

def detectron2_payload(d2_state):
    """The dict detectron2's checkpointer reads, from detectron2-named tensors."""
    return {
        "model": {k: v.detach().cpu().numpy() for k, v in d2_state.items()},
        "__author__": AUTHOR,
        "matching_heuristics": True,
    }


def write_detectron2_pkl(path, payload):
    with atomic.atomic_path(path, atomic.payload_bytes(payload)) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)
