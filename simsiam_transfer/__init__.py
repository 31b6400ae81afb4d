"""The floor every stage stands on (it imports no stage and not the roof, ``app``):

    errors, entry, stopping   the one-line error contract, exit statuses, SIGTERM/SIGINT and child processes
    atomic, locks             atomic writes that honour the umask; one writer per folder
    config                    the one config loader (fvcore CfgNode, safe YAML, _BASE_, KEY VALUE)
    checkpoints               reading any pretraining checkpoint safely and finding its ResNet backbone
    pretrain_format           the pretraining checkpoint format (writer and readers)
    d2_weights                converted detectron2 weights and their report (writers and readers)
    resnet, c4                ResNet facts; the C4 model and RoI head both conversion and fine-tuning build
                              (``c4`` imports detectron2, nothing else here needs it at import)
    images, synthetic         image-file checks; the generated mini datasets
    versions, doctor, install_detectron2   the environment and its set-up

This package itself, ``install_detectron2`` and ``versions`` import neither torch nor detectron2: the
set-up runs ``python -m simsiam_transfer.install_detectron2`` before either exists.
"""

__version__ = "0.1.0"
