"""Whole runs, the top of the stack beside the CLI: `pretrain` and `qat` (training runs) and
`ptq` (calibration only), each writing a run folder; with the readers of finished runs
(re-exported from `flatq.train.run_io` and `flatq.data`) for one import."""

from ..data import DataBundle, prepare_data
from ..train.run_io import build_from_meta, load_model, load_teacher, resume_state
from .ptq import ptq
from .training import (check_model_fits, check_sizes, pretrain, pretrain_base, pretrained_teacher,
                       qat, qat_start)

__all__ = ["pretrain", "qat", "ptq", "load_model", "load_teacher", "resume_state",
           "build_from_meta", "prepare_data", "DataBundle", "check_model_fits", "check_sizes",
           "pretrain_base", "qat_start", "pretrained_teacher"]
