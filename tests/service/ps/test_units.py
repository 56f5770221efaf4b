"""The parameter server's units on their own, without Ray or a server: the ledger, the
sync round, the publisher, the guard and the checkpoint policy."""

import math

import numpy as np
import pytest

from service.config import DivergenceConfig
from service.divergence import CostFilter
from service.ps.checkpointing import CheckpointPolicy
from service.ps.guard import DivergenceGuard
from service.ps.ledger import OffsetLedger
from service.ps.publish import INLINE_PARAMS_BYTES, LARGE_PUBLISH_EVERY, Publisher
from service.ps.rounds import Item, SyncRound
from workers.transport.protocol import BOARD, Status

A, B = ("t", 0), ("t", 1)

# -- the ledger ------------------------------------------------------------------------------


def test_the_ledger_fences_a_batch_that_does_not_start_where_its_partition_ends():
    ledger = OffsetLedger(history_limit=100)
    assert ledger.fences({A: (0, 8)}) is None  # a new partition starts at 0
    assert ledger.fences({A: (8, 16)}) == {A: 0}
    ledger.advance({A: (0, 8)}, version=0, applied=True)
    assert ledger.fences({A: (8, 16), B: (0, 4)}) is None
    assert ledger.fences({A: (0, 8)}) == {A: 8}


def test_reserved_spans_move_the_next_offsets_until_released():
    ledger = OffsetLedger(history_limit=100)
    ledger.reserve({A: (0, 8)})
    assert ledger.next_offsets() == {A: 8} and ledger.fences({A: (0, 8)}) == {A: 8}
    ledger.advance({A: (0, 8)}, version=0, applied=True)
    ledger.release()
    assert ledger.reserved == {} and ledger.next_offsets() == {A: 8}


def test_only_applied_spans_join_the_history_and_refused_ones_still_pass():
    ledger = OffsetLedger(history_limit=100)
    ledger.advance({A: (0, 8)}, version=0, applied=True)
    ledger.advance({A: (8, 16)}, version=1, applied=False)  # refused as non-finite
    ledger.advance({B: (0, 4), A: (16, 20)}, version=1, applied=True)
    history, tps = ledger.applied_history()
    assert tps == [A, B]
    assert history.tolist() == [[0, 0, 8, 0], [1, 0, 4, 1], [0, 16, 20, 1]]
    assert ledger.next_offsets() == {A: 20, B: 4}


def test_the_history_keeps_its_newest_rows_up_to_the_limit():
    ledger = OffsetLedger(history_limit=3)
    for i in range(5):
        ledger.advance({A: (i, i + 1)}, version=i, applied=True)
    assert ledger.applied_history()[0][:, 1].tolist() == [2, 3, 4]


def test_each_bad_record_is_claimed_once_by_reason():
    ledger = OffsetLedger(history_limit=10)
    assert ledger.claim_rejections([(A, 3, "json"), (A, 5, "shape")]) == [True, True]
    assert ledger.claim_rejections([(A, 3, "json"), (A, 6, "json")]) == [False, True]
    assert ledger.rejected == {"json": 2, "shape": 1}
    assert ledger.progress().rejected == {A: 7}


def test_a_restore_takes_the_checkpoints_positions_and_keeps_the_higher_watermark():
    ledger = OffsetLedger(history_limit=10)
    ledger.advance({A: (0, 8)}, version=0, applied=True)
    ledger.claim_rejections([(A, 9, "json")])
    snap = ledger.snapshot()
    ledger.advance({A: (8, 16)}, version=1, applied=True)
    ledger.claim_rejections([(A, 20, "json")])
    ledger.reserve({B: (0, 4)})
    ledger.restore(snap.offsets, snap.topics, snap.history, snap.rejected_next)
    assert ledger.next_offsets() == {A: 8} and ledger.durable == {A: 8}
    assert ledger.applied_history()[0].tolist() == [[0, 0, 8, 0]]
    assert ledger.rejected_next == {A: 21}  # bad records are reported once


# -- the sync round ---------------------------------------------------------------------------


def _item(worker: str) -> Item:
    return Item(worker, np.zeros(3), 8, 0.5, np.zeros(2), {A: (0, 8)}, 0)


def test_a_round_completes_when_every_member_pushed():
    rounds = SyncRound()
    assert not rounds.complete({"w0"})  # an empty round is never complete
    round_id = rounds.add(_item("w0"))
    assert not rounds.complete({"w0", "w1"})
    rounds.add(_item("w1"))
    assert rounds.complete({"w0", "w1"})
    items = rounds.take()
    rounds.finish(items, Status.NONFINITE)
    assert rounds.id == round_id + 1 and rounds.items == []
    assert rounds.status == {"w0": Status.NONFINITE, "w1": Status.NONFINITE}


# -- the publisher ----------------------------------------------------------------------------


def test_a_small_model_is_published_every_version_a_large_one_every_few():
    small = Publisher(10, np.float32, publish_every=0)
    flat = np.arange(10, dtype=np.float32)
    assert small.publish_every == 1
    assert small.params(0, flat)[0] == 0 and small.params(1, flat)[0] == 1
    n_large = INLINE_PARAMS_BYTES // 4 + 1
    large = Publisher(n_large, np.float32, publish_every=0)
    assert large.large and large.publish_every == LARGE_PUBLISH_EVERY
    big = np.zeros(n_large, np.float32)
    assert large.params(0, big)[0] == 0
    assert large.params(LARGE_PUBLISH_EVERY - 1, big)[0] == 0  # not yet due
    assert large.params(LARGE_PUBLISH_EVERY - 1, big, fresh=True)[0] == LARGE_PUBLISH_EVERY - 1
    assert large.params(2 * LARGE_PUBLISH_EVERY - 1, big)[0] == 2 * LARGE_PUBLISH_EVERY - 1


def test_a_published_copy_does_not_follow_later_changes():
    publisher = Publisher(4, np.float32, publish_every=1)
    flat = np.zeros(4, np.float32)
    _, published = publisher.params(0, flat)
    flat += 1
    assert published.sum() == 0


def test_local_replies_of_a_large_model_point_at_the_board():
    n = INLINE_PARAMS_BYTES // 4 + 1
    publisher = Publisher(n, np.float32, publish_every=2)
    flat = np.full(n, 3.0, np.float32)
    assert Publisher(10, np.float32, 1).open_board(0, flat[:10]) is None  # small: no board
    info = publisher.open_board(0, flat)
    try:
        assert info is not None and info is not False
        assert publisher.params(0, flat, local=True) == (0, BOARD)
        assert publisher.params(1, flat, local=True) == (0, BOARD)  # not due
        assert publisher.params(1, flat, fresh=True, local=True) == (1, BOARD)
    finally:
        publisher.close()


# -- the guard ----------------------------------------------------------------------------------


def guard(**changes) -> DivergenceGuard:
    return DivergenceGuard(DivergenceConfig(**changes), ema_beta=0.9, clock=lambda: 7.0)


def test_the_guards_ema_is_the_bias_corrected_filter_of_the_costs():
    g, ref = guard(), CostFilter(0.9)
    for version, cost in enumerate((2.0, 1.5, 1.0, float("nan"), 0.5)):
        g.observe(version, cost, 1.0 if math.isfinite(cost) else math.nan, 1.0)
        if math.isfinite(cost):  # the refused update is watched, not filtered in
            ref.update(cost)
    # By hand: 0.1*2, then 0.9*that + 0.1*1.5, + 0.1*1.0, + 0.1*0.5; bias-corrected over 4.
    assert ref.value == pytest.approx(
        (0.9 * (0.9 * (0.9 * 0.2 + 0.15) + 0.1) + 0.05) / (1 - 0.9**4)
    )
    assert g.ema == ref.value == g.state().ema


def test_a_nonfinite_cost_asks_for_a_rollback_pause_or_nothing_by_action():
    for action, rolls_back, paused in (
        ("rollback", True, False),
        ("pause", False, True),
        ("alert", False, False),
    ):
        g = guard(action=action)
        g.observe(0, 1.0, 1.0, 1.0)
        assert g.observe(1, math.nan, math.nan, math.nan) is rolls_back, action
        assert g.paused is paused and g.state().state == "diverged"
        assert [e.event for e in g.take_events()] == ["diverged"] + ["paused"] * paused


def test_a_rollback_restores_the_snapshots_ema_and_compounds_the_lr_factor():
    g = guard(action="rollback", lr_factor=0.5)
    for version, cost in enumerate((1.0, 0.8, 0.6)):
        g.observe(version, cost, 1.0, 1.0)
    snapshot, ema_then = g.snapshot(), g.ema
    g.observe(3, 9.0, 1.0, 1.0)
    assert g.ema != ema_then
    factor = g.next_lr_factor()
    g.restore(snapshot, lr_factor=1.0)
    g.rolled_back(4, "cost EMA too high", "/ckpt/ckpt-000000000003.npz", factor)
    assert g.ema == ema_then and g.lr_factor == 0.5 and g.rollbacks == 1
    (event,) = [e for e in g.take_events() if e.event == "rollback"]
    assert event.ema == ema_then and event.lr_factor == 0.5 and event.version == 4
    assert "restored ckpt-000000000003.npz, learning rate x0.5" in event.reason
    assert g.next_lr_factor() == 0.25


def test_resume_lifts_a_pause_once():
    g = guard(action="pause")
    g.observe(0, math.nan, math.nan, math.nan)
    g.resume(1)
    g.resume(2)
    assert not g.paused
    assert [e.event for e in g.take_events()] == ["diverged", "paused", "resumed"]


# -- the checkpoint policy --------------------------------------------------------------------


def test_checkpoints_are_due_by_updates_or_by_time_once_the_model_moved(tmp_path):
    now = [0.0]
    policy = CheckpointPolicy(str(tmp_path), every_updates=3, every_seconds=10.0, keep=2,
                              clock=lambda: now[0])  # fmt: skip
    assert not policy.due(2) and policy.due(3)
    policy.last_version = 3
    now[0] = 11.0
    assert not policy.due(3)  # time alone: only once the model moved
    assert policy.due(4)
    off = CheckpointPolicy(None, every_updates=1, every_seconds=1.0, keep=1)
    assert not off.enabled and not off.due(100) and off.newest() is None


# -- passes over dead-lettered records ------------------------------------------------------

R = 1 << 16  # ROWS_PER_OFFSET: Kafka stream positions


def test_a_pass_over_claimed_bad_records_moves_the_position_when_it_lines_up():
    ledger = OffsetLedger(history_limit=100)
    ledger.advance({A: (0, 3 * R)}, version=0, applied=True)
    ledger.claim_rejections([(A, 3, "bad_json"), (A, 4, "bad_label")])
    assert ledger.pass_rejected({A: (2 * R, 5 * R)}) == {A: 3 * R}  # not where A ends
    assert ledger.pass_rejected({A: (3 * R, 6 * R)}) == {A: 3 * R}  # record 5 not claimed
    assert ledger.pass_rejected({A: (3 * R, 5 * R)}) is None
    assert ledger.next_offsets() == {A: 5 * R}
    history, _ = ledger.applied_history()
    assert history.tolist() == [[0, 0, 3 * R, 0], [0, 3 * R, 5 * R, -1]]
    assert ledger.pass_rejected({A: (3 * R, 5 * R)}) == {A: 5 * R}  # once only


def test_a_pass_waits_for_a_pending_sync_round_on_its_partition():
    ledger = OffsetLedger(history_limit=100)
    ledger.claim_rejections([(A, 1, "bad_json")])
    ledger.reserve({A: (0, 1 * R)})
    assert ledger.pass_rejected({A: (1 * R, 2 * R)}) == {A: 1 * R}
    ledger.advance({A: (0, 1 * R)}, version=0, applied=True)
    ledger.release()
    assert ledger.pass_rejected({A: (1 * R, 2 * R)}) is None
    assert ledger.next_offsets() == {A: 2 * R}


def test_a_checkpoint_keeps_bad_record_watermarks_no_further_than_its_positions():
    """A dead letter claimed past the positions may be lost in a crash before it reaches
    Kafka: after a restart it must be reported again, never skipped."""
    ledger = OffsetLedger(history_limit=100)
    ledger.advance({A: (0, 2 * R)}, version=0, applied=True)
    ledger.claim_rejections([(A, 1, "bad_json"), (A, 7, "bad_json"), (B, 4, "bad_json")])
    snap = ledger.snapshot()
    assert sorted(snap.rejected_next) == [["t", 0, 2], ["t", 1, 0]]
    restarted = OffsetLedger(history_limit=100)
    restarted.restore(snap.offsets, snap.topics, snap.history, snap.rejected_next)
    assert restarted.claim_rejections([(A, 7, "bad_json"), (B, 4, "bad_json")]) == [True, True]


def test_the_timer_checkpoints_a_moved_state_once_every_seconds_have_passed(tmp_path):
    t = [0.0]
    policy = CheckpointPolicy(str(tmp_path), 500, 2.0, 3, clock=lambda: t[0])
    assert policy.timed and not policy.due_by_time(moved=True)
    assert policy.next_check() == 1.0  # it looks at least once a second
    t[0] = 2.0
    assert policy.due_by_time(moved=True) and not policy.due_by_time(moved=False)
    t[0] = 60.0  # long overdue with nothing moved: it looks again a tenth of a period later
    assert policy.next_check() == pytest.approx(0.2)
    assert not CheckpointPolicy(str(tmp_path), 500, 0.0, 3).timed
