"""Fine-tuning with the BiT-HyperRule: SGD + momentum, warmup and step decays, MixUp for large
datasets, gradient accumulation to batch 512, checkpoint/resume, DDP, validation metrics."""

from bitcore.train.callbacks import Progress, TrainCallbacks, TrainingCancelled
from bitcore.train.engine import FinetuneResult, evaluate, finetune, train_model
from bitcore.train.loop import LoopOutcome
from bitcore.train.metrics import classification_metrics
from bitcore.train.prepare import MissingCheckpointError
from bitcore.train.state import ResumeError

__all__ = [
    "FinetuneResult",
    "LoopOutcome",
    "MissingCheckpointError",
    "Progress",
    "ResumeError",
    "TrainCallbacks",
    "TrainingCancelled",
    "classification_metrics",
    "evaluate",
    "finetune",
    "train_model",
]
