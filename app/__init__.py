"""The roof: the ``simsiam-transfer`` command line (``app.cli``) and the pipeline that drives the
stages end to end (``app.pipeline``). Only this package imports the stages (``pretrain``,
``convert``, ``detection``); they import only the floor (``simsiam_transfer``)."""
