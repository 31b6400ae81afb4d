"""The paper's Fig. 2 at any scale: the same run with and without stop-gradient.

``simsiam-transfer fig2 --config FILE --output-dir DIR [KEY VALUE ...]`` is the ``fig2`` experiment of
``pretrain/repro.py``: it trains ``DIR/stop_gradient`` and ``DIR/no_stop_gradient`` (each an ordinary,
resumable pretraining run), then writes ``DIR/fig2.json`` (both curves + final values + the 1/sqrt(d)
reference) and ``DIR/fig2.png`` (loss, z_std*sqrt(d) and kNN top-1 per epoch, as the figure's panels).
"""

from pretrain.repro import run_experiments


def run_fig2(config_file, output_dir, overrides=()):
    return run_experiments(config_file, output_dir, overrides, ["fig2"], write_table=False)["fig2"]
