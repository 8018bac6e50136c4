"""Training: the config (config.py), the data order (data.py), optimiser and EMA (optim.py), logging (logging.py),
the trainer (trainer.py) and the VAE trainer (vae_trainer.py). The model itself is dfm.model; validation videos
are sampled by dfm.pipeline."""

from dfm.training.config import DataConfig, OptimConfig, RunConfig, TrainConfig, TrainingError, check_config
from dfm.training.data import GlobalOrder, StepBatches, build_dataset, collate_batch
from dfm.training.optim import EMA, build_optimizer, lr_at
from dfm.training.trainer import Trainer, train

__all__ = ["DataConfig", "EMA", "GlobalOrder", "OptimConfig", "RunConfig", "StepBatches", "TrainConfig", "Trainer",
           "TrainingError", "build_dataset", "build_optimizer", "check_config", "collate_batch", "lr_at", "train"]
