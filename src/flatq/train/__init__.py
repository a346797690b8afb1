"""Training: the loop and what it reads and writes, for any objective.

- loop: `Trainer` (epochs, cosine LR, DDP, AMP, exact resume) and `evaluate`
- optim: SGD with the no-weight-decay groups the quantizers name, and the LR schedule
- distributed: torchrun setup, DDP wrapping, collectives that are no-ops in one process
- checkpoint: atomic writes, weights_only reads, state fingerprints
- metrics: the metrics.jsonl log
- batchnorm: re-estimating BatchNorm statistics after QAT
- run_folder: a run folder checked, locked and claimed before anything is written
- run_io: a run folder's contents read and written (load_model, load_teacher, run_data, ...)

The runs that use all this (pretrain, qat, ptq) are `flatq.runs`, above this package.
"""
