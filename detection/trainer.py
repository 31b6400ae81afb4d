"""detectron2's ``DefaultTrainer`` with the protocol's evaluators, a progress bar and our writers."""

import os

from tqdm import tqdm

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from detection.cpu_amp import cpu_step_trainer
from simsiam_transfer import c4  # noqa: F401  (registers Res5ROIHeadsExtraNorm, the protocol's RoI head)
from simsiam_transfer.versions import compiled_ops_available

# detectron2's default JSONWriter uses OUTPUT_DIR/metrics.json, which this toolkit reserves
# for the final evaluation numbers (docs/formats.md); training statistics go here instead.
TRAIN_LOG = "train_log.jsonl"


class ProgressBar(HookBase):
    """A tqdm bar over iterations on the main process."""

    def before_train(self):
        self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter,
                         desc="finetune", unit="it", disable=not comm.is_main_process(),
                         dynamic_ncols=True)

    def after_step(self):
        self._bar.update(1)

    def after_train(self):
        self._bar.close()


def _with_amp(cfg, enabled: bool):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = enabled
    cfg.freeze()
    return cfg


class Trainer(DefaultTrainer):
    """COCO json sets get ``COCOEvaluator`` (fast C++ path only when compiled), VOC sets the VOC one.
    The final evaluation's results are kept in ``eval_results`` (a public attribute of ours)."""

    eval_results = None

    def __init__(self, cfg):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"
        # detectron2 would build its CUDA-only AMPTrainer: build the fp32 SimpleTrainer, then hand its
        # model, loader and optimizer to the CPU autocast trainer.
        super().__init__(_with_amp(cfg, False) if cpu_amp else cfg)
        if cpu_amp:
            self.cfg = _with_amp(self.cfg, True)  # detectron2's own (possibly rescaled) copy
            self._trainer = cpu_step_trainer(self._trainer)

    def _evaluate(self):
        self.eval_results = self.test(self.cfg, self.model)
        return self.eval_results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder,
                                 use_fast_impl=compiled_ops_available())
        return PascalVOCDetectionEvaluator(dataset_name)

    def build_writers(self):
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, TRAIN_LOG)),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def build_hooks(self):
        # DefaultTrainer's EvalHook is swapped, in place (before the writer), for one that keeps the results.
        built = [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate) if isinstance(h, hooks.EvalHook) else h
                 for h in super().build_hooks()]
        return built + [ProgressBar()]
