"""Training for LF-VILA: optimizer and schedules, the loop, checkpoints, distributed set-up, tasks, the demo."""

from .loop import Trainer
from .runconfig import TrainConfig
from .optim import LRSchedule, Scheduler, build_optimizer, param_groups

__all__ = ["TrainConfig", "Trainer", "LRSchedule", "Scheduler", "build_optimizer", "param_groups"]
