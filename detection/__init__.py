"""detectron2 integration: datasets, data checks, fine-tuning, the benchmark runner and its reports.

The C4 ExtraNorm head is registered by ``simsiam_transfer.c4``, which the modules that build models
import; the schema, specs and protocol import no detectron2, so the command line stays quick.
"""
