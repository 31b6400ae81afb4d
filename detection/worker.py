"""``python -m detection.worker JOB.yaml``: run one written fine-tune job (``detection.job``).

This is what every executor starts for a trial (a local subprocess, a submitit job on Slurm or on
this machine): the job file holds the resolved detectron2 config, so nothing is parsed from argv
and no stage calls back into the top-level command. Exit status as the CLI's (0, 1, 2, 130/143);
stopped with its driver (SIGTERM, or the driver's death) it exits 143 and resumes on a rerun.
"""

import json
import sys

from detection import protocol
from detection.finetune import run_job
from detection.job import read_job
from simsiam_transfer.entry import run_entry
from simsiam_transfer.errors import print_error


def run_job_file(path) -> int:
    record = run_job(read_job(path))
    if record is not None:
        keys = [k for k in protocol.REPORTED_METRICS if record.get(k) is not None]
        print(json.dumps({k: record[k] for k in keys}))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print_error("usage: python -m detection.worker JOB.yaml")
        return 2
    return run_entry(run_job_file, argv[0])


if __name__ == "__main__":
    sys.exit(main())
