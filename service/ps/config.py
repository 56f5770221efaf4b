"""What the parameter server is told: ``ServerConfig``, built from the service's ``Config``
only (no defaults of its own), and the optimizer its ``[optimizer]`` section names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.config import Config, DivergenceConfig, OptimizerConfig, redacted
from workers.nn import ExponentialDecay, InverseTimeDecay, Optimizer, get_optimizer


@dataclass(frozen=True)
class ServerConfig:
    """What the parameter server is told, built from the service's ``Config`` only.

    ``recorded`` is the resolved config with secrets redacted: written into checkpoints.
    ``checkpoint_dir`` None writes and restores no checkpoint.
    """

    optimizer: OptimizerConfig
    divergence: DivergenceConfig
    mode: str
    max_staleness: int
    publish_every: int
    sync_timeout_seconds: float
    ema_beta: float
    seed: int
    checkpoint_dir: str | None
    checkpoint_every_updates: int
    checkpoint_every_seconds: float
    checkpoint_keep: int
    history: int
    resume: bool
    recorded: dict[str, dict[str, Any]]

    @classmethod
    def from_config(cls, cfg: Config) -> ServerConfig:
        return cls(
            optimizer=cfg.optimizer,
            divergence=cfg.divergence,
            mode=cfg.trainer.mode,
            max_staleness=cfg.trainer.max_staleness,
            publish_every=cfg.trainer.publish_every,
            sync_timeout_seconds=cfg.trainer.sync_timeout_seconds,
            ema_beta=cfg.metrics.ema_beta,
            seed=cfg.model.seed,
            checkpoint_dir=cfg.checkpoint.dir,
            checkpoint_every_updates=cfg.checkpoint.every_updates,
            checkpoint_every_seconds=cfg.checkpoint.every_seconds,
            checkpoint_keep=cfg.checkpoint.keep,
            history=cfg.checkpoint.history,
            resume=cfg.checkpoint.resume,
            recorded=redacted(cfg),
        )


def build_optimizer(section: OptimizerConfig, lr_factor: float = 1.0) -> Optimizer:
    """The optimizer of an ``[optimizer]`` section, learning rate times ``lr_factor``."""
    kwargs = section.optimizer_kwargs()
    lr = section.learning_rate * lr_factor
    if section.schedule == "inverse_time":
        kwargs["learning_rate"] = InverseTimeDecay(lr, section.decay_steps, section.decay_rate)
    elif section.schedule == "exponential":
        kwargs["learning_rate"] = ExponentialDecay(lr, section.decay_steps, section.decay_rate)
    else:
        kwargs["learning_rate"] = lr
    return get_optimizer(section.name, **kwargs)
