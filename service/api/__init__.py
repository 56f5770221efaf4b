"""The HTTP prediction API: /predict, /healthz, /readyz, /model, /metrics."""

from service.api.app import (
    LATENCY_BUCKETS,
    MAX_FEATURE_BOUND,
    ApiMetrics,
    ApiServer,
    ModelCache,
    PredictRequest,
    Snapshot,
    create_app,
    feature_bound,
    max_body_bytes,
    start_api,
    trainer_info,
)

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_FEATURE_BOUND",
    "ApiMetrics",
    "ApiServer",
    "ModelCache",
    "PredictRequest",
    "Snapshot",
    "create_app",
    "feature_bound",
    "max_body_bytes",
    "start_api",
    "trainer_info",
]
