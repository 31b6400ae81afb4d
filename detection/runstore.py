"""The run store of a benchmark: ``DIR/runs.jsonl``, one JSON event per line, append-only.

Every state change of a trial appends its full record; a trial's current record is its last
line. Only the bench driver writes it (trials write their own ``metrics.json``), so appends
never interleave, and a line cut short by a crash is skipped on reading.

Record fields: ``id``, ``lr``, ``trial``, ``seed``, ``status`` (queued / running / stopped / done /
failed; stopped: cut short by a stop signal to the driver, resumed by a rerun), ``attempt``,
``metrics`` (flat, from the trial's metrics.json), ``wall_time_s``, ``config_hash``, ``weights``,
``weights_sha256``, ``norm``, ``versions``, ``error``, ``output_dir``, ``job`` (the trial's job.yaml),
``job_id``, ``time`` (unix seconds of the event), and the effective setup
``batch_policy.SETUP_FIELDS`` (``scaling``, ``world_size``, ``ims_per_gpu``, ``effective_batch``,
``bn_mode``, ``bn_group``, ``lr_scale``, ``max_iter``, ``flags``). Metric values that are NaN/inf
count as a failed trial (``protocol``).
"""

import json
import os
import time
from pathlib import Path

from simsiam_transfer.atomic import read_jsonl

STORE = "runs.jsonl"


class RunStore:
    def __init__(self, directory):
        self.path = Path(directory) / STORE

    def records(self):
        """Latest record per trial id, in first-seen order."""
        latest = {}
        if self.path.is_file():
            for _, record in read_jsonl(self.path):
                latest[record["id"]] = record
        return latest

    def put(self, record):
        record = {**record, "time": round(time.time(), 3)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record
