"""The parameter server: ``server`` owns the model and the one push path; beside it
``ledger`` (offsets, fencing, history), ``rounds`` (sync rounds, merging pushes),
``publish`` (how parameters reach workers), ``guard`` (divergence: the cost EMA, pause,
rollback) and ``checkpointing`` (when, keep, restore)."""

from service.ps.server import (
    ParameterServer,
    ParameterServerActor,
    ServerConfig,
    build_optimizer,
)

__all__ = ["ParameterServer", "ParameterServerActor", "ServerConfig", "build_optimizer"]
