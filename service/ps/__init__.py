"""The parameter server: ``server`` owns the model and the one push path; beside it
``ledger`` (offsets, fencing, history), ``rounds`` (sync rounds, merging pushes),
``publish`` (how parameters reach workers), ``guard`` (divergence: the cost EMA, pause,
rollback) and ``checkpointing`` (when, keep, restore); ``config`` is what the server is told."""

from service.ps.config import ServerConfig, build_optimizer
from service.ps.server import ParameterServer, ParameterServerActor

__all__ = ["ParameterServer", "ParameterServerActor", "ServerConfig", "build_optimizer"]
