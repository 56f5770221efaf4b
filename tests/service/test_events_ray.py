"""Raw events on a real local Ray: the clicks stream trains through workers and the server,
tables and statistics reach the checkpoint, and the model beats the base rate."""

import numpy as np
import pytest

from service.checkpoint import latest_checkpoint, load_checkpoint
from workers.ingest.datasets import CLICKS_SCHEMA, clicks_dataset
from workers.ingest.moments import moments_of
from workers.ingest.schema import schema_from_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_clicks_stream_trains_end_to_end(mode, tmp_path, make_trainer, run, config,
                                            exact_tiling):  # fmt: skip
    cfg = config(
        tmp_path,
        **{
            "trainer.mode": mode,
            "stream.dataset": "clicks",
            "optimizer.learning_rate": 0.01,
            "batching.batch_size": 128,
            "batching.min_batch": 32,
        },
    )
    dataset = clicks_dataset(n=18_000, test_fraction=0.25, seed=3)
    trainer = make_trainer(cfg, dataset)
    result = run(trainer, timeout=120)

    n = len(dataset.x_train)
    stats = trainer.record.last
    assert result["examples"] == stats.examples == n
    exact_tiling(trainer, cfg, dataset)
    # Better than the best constant answer, the base rate, on the held-out events: its
    # log loss is the labels' entropy.
    p = float(dataset.y_test.mean())
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert result["loss"] < entropy - 0.02, (result, entropy)

    # The statistics are those of every number value trained on: the same moments as the
    # whole training split's, whatever the order and grouping of the pushes.
    ckpt = load_checkpoint(latest_checkpoint(cfg.checkpoint.dir))
    schema = schema_from_dict(CLICKS_SCHEMA)
    k = len(schema.numbers)
    numbers = dataset.x_train[:, :k]
    expected = moments_of(np.nan_to_num(numbers), ~np.isnan(numbers))
    for j, spec in enumerate(schema.numbers):
        assert int(ckpt.features[f"features.{spec.name}.count"]) == expected.count[j]
        np.testing.assert_allclose(
            float(ckpt.features[f"features.{spec.name}.mean"]), expected.mean[j], rtol=1e-9
        )
        np.testing.assert_allclose(
            float(ckpt.features[f"features.{spec.name}.M2"]), expected.M2[j], rtol=1e-7
        )
    assert ckpt.features["emb.merchant"].shape == (schema.categoricals[0].table_rows, 16)
    assert ckpt.meta["features"]["label"]["field"] == "clicked"
