"""The HTTP prediction API: /predict, /healthz, /readyz, /model, /metrics.

Requests read a cached snapshot of the model (``cache``, a raw-event model's tables in a
double-buffered ``replica``); only its refresher thread calls the parameter server, so
serving never waits on training. Beside it ``bodies`` (what requests and responses carry,
and the messages for bad ones), ``limits`` (the body limit, the feature bound, the
published request shape), ``predict`` (the answer to /predict, for feature vectors and for
raw events), ``middleware`` (metrics, body limit, the fast path), ``app`` (``create_app``)
and ``server`` (``start_api``, ``trainer_info``). Imports nothing from ``service/app.py``.
"""

from service.api.app import create_app
from service.api.bodies import EventsRequest, PredictRequest
from service.api.cache import ModelCache, Snapshot, SnapshotFeatures
from service.api.limits import MAX_FEATURE_BOUND, feature_bound, max_body_bytes
from service.api.middleware import LATENCY_BUCKETS, ApiMetrics
from service.api.server import ApiServer, start_api, trainer_info

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_FEATURE_BOUND",
    "ApiMetrics",
    "ApiServer",
    "EventsRequest",
    "ModelCache",
    "PredictRequest",
    "Snapshot",
    "SnapshotFeatures",
    "create_app",
    "feature_bound",
    "max_body_bytes",
    "start_api",
    "trainer_info",
]
