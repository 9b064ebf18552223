"""The per-forward learning budget of start() / attach() (tl_sparsity.tl.budget): deferred batches are trained later,
in order, so the numbers are bit for bit those of learning every batch inside its forward."""

from __future__ import annotations

import pytest
import torch

from tl_sparsity import OnlineSparseCoder, SparsityCollector
from tl_sparsity.coding.grouped import train_together
from tl_sparsity.tl import budget
from tl_sparsity.tl.feeding import waiting_bytes

BATCH = 8  # 64 rows per hook and forward: 8 learner batches
D = 32  # the tiny model's width


def _forwards(model, col, n: int = 4, mode: str = "attach") -> list[int]:
    """``n`` forwards through ``col`` (``attach()``, ``start()``/``stop()`` or ``fwd_hooks()``); the largest pending
    count after each."""
    after = []
    gen = torch.Generator().manual_seed(7)
    if mode == "start":
        col.start()
    for _ in range(n):
        tokens = torch.randint(0, 200, (4, 17), generator=gen)
        if mode == "start":
            model(tokens)
        elif mode == "fwd":
            model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks())
        else:
            with col.attach():
                model(tokens)
        after.append(max(lr.n_pending_ for lr in col.learners.values()))
    if mode == "start":
        col.stop()
    return after


def _same_learners(a: SparsityCollector, b: SparsityCollector) -> None:
    for name in a.learners:
        la, lb = a.learners[name], b.learners[name]
        assert (la.n_steps_, la.n_tokens_, la.n_heldout_, la.n_pending_) == \
               (lb.n_steps_, lb.n_tokens_, lb.n_heldout_, lb.n_pending_), name
        assert torch.equal(la.dictionary_, lb.dictionary_), name
        assert la.lam_ == lb.lam_, name


@pytest.mark.parametrize("mode", ["start", "fwd"])
def test_deferred_batches_give_the_same_numbers_bit_for_bit(model, mode):
    plain = SparsityCollector(model, hooks="resid_post", batch_size=BATCH, seed=3)
    plain.learn_seconds = None
    deferred = SparsityCollector(model, hooks="resid_post", batch_size=BATCH, seed=3)
    deferred.learn_seconds = 0  # one round per forward (fwd_hooks(): per hook), the rest waits
    hooks = len(deferred.learners)
    deferred.backlog_mb = 12 * BATCH * 4 * D * hooks / 2**20  # room for 12 batches per hook, all hooks together
    assert max(_forwards(model, plain)) < BATCH  # no budget: every full batch trained inside its forward
    pending = _forwards(model, deferred, mode=mode)
    assert pending[0] == 7 * BATCH  # round 0 trained, the 7 batches after it deferred
    waiting = waiting_bytes((lr, lr.n_pending_) for lr in deferred.learners.values())
    assert waiting <= deferred.backlog_mb * 2**20  # bounded: later forwards train down to the bound
    assert waiting > deferred.backlog_mb * 2**20 - BATCH * 4 * D * hooks
    assert all(lr.n_steps_ > 0 for lr in deferred.learners.values())
    assert deferred.n_tokens == plain.n_tokens == 4 * 64  # every row accounted for, trained or waiting
    a, b = plain.report().df, deferred.report().df  # report() trains the backlog first
    assert max(lr.n_pending_ for lr in deferred.learners.values()) < BATCH
    _same_learners(plain, deferred)
    cols = ["n_tokens", "n_heldout", "normalized_loss", "normalized_loss_se", "n_active", "fvu", "n_steps"]
    assert a[cols].equals(b[cols])


def test_the_default_backlog_defers_every_forward_of_a_short_session(model):
    """256 MiB by default: a session of forwards learns one round per forward and defers the rest."""
    col = SparsityCollector(model, hooks="resid_post", batch_size=BATCH, seed=3)
    col.learn_seconds = 0
    assert col.backlog_mb == budget.BACKLOG_MB == 256
    assert _forwards(model, col, n=6) == [7 * BATCH * (i + 1) for i in range(6)]
    col.backlog_mb = 0  # no room: the next forward trains everything, its own batches included
    assert _forwards(model, col, n=1) == [0]


def test_a_backlog_survives_a_checkpoint_and_fit_trains_it_first(model, tmp_path):
    plain = SparsityCollector(model, hooks="resid_post", batch_size=BATCH, seed=3)
    plain.learn_seconds = None
    deferred = SparsityCollector(model, hooks="resid_post", batch_size=BATCH, seed=3)
    deferred.learn_seconds = 0
    _forwards(model, plain, n=2)
    _forwards(model, deferred, n=2)
    assert min(lr.n_pending_ for lr in deferred.learners.values()) >= BATCH
    deferred.save(tmp_path / "ckpt")
    loaded = SparsityCollector.load(tmp_path / "ckpt", model)
    assert [lr.n_pending_ for lr in loaded.learners.values()] == [lr.n_pending_ for lr in deferred.learners.values()]
    tokens = torch.randint(0, 200, (4, 17), generator=torch.Generator().manual_seed(9))
    plain.fit(tokens, progress=False)
    loaded.fit(tokens, progress=False)  # no budget inside fit: the backlog, then this batch
    assert max(lr.n_pending_ for lr in loaded.learners.values()) < BATCH
    _same_learners(plain, loaded)


def test_flush_trains_a_backlog_as_full_batches_then_the_rest():
    rows = torch.randn(5 * BATCH + 3, 16, generator=torch.Generator().manual_seed(0))
    a = OnlineSparseCoder(batch_size=BATCH, seed=1, expansion=2).partial_fit(rows).flush()
    b = OnlineSparseCoder(batch_size=BATCH, seed=1, expansion=2)
    batches = list(b.batches(rows))  # as a collector takes them; the 3 rows left stay pending
    train_together([(b, b.prepare(batches[0]))])
    b.defer(batches[1:])
    assert b.n_pending_ == 4 * BATCH + 3 and b.n_steps_ > 0
    b.flush()
    assert (a.n_steps_, a.n_tokens_, a.n_heldout_, b.n_pending_) == (b.n_steps_, b.n_tokens_, b.n_heldout_, 0)
    assert torch.equal(a.dictionary_, b.dictionary_)


def test_learn_seconds_is_checked_when_set(model):
    col = SparsityCollector(model, hooks="resid_post", batch_size=BATCH)
    assert col.learn_seconds == "auto"
    for bad in (-1, "soon", True, float("nan"), [3]):
        with pytest.raises(ValueError, match="learn_seconds must be 'auto', None or a number of seconds"):
            col.learn_seconds = bad
    col.learn_seconds = 2
    assert col.learn_seconds == 2.0
    col.learn_seconds = None
    assert col.learn_seconds is None and SparsityCollector(model, hooks="resid_post").learn_seconds == "auto"


def test_backlog_mb_is_checked_when_set(model):
    col = SparsityCollector(model, hooks="resid_post", batch_size=BATCH)
    for bad in (-1, "lots", True, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="backlog_mb must be a number of megabytes >= 0"):
            col.backlog_mb = bad
    col.backlog_mb = 1024
    assert col.backlog_mb == 1024.0 and SparsityCollector(model, hooks="resid_post").backlog_mb == 256.0


def test_the_automatic_budget_is_for_cpu_learners_only(model):
    col = SparsityCollector(model, hooks="resid_post", batch_size=BATCH)
    sink = {name: [(torch.zeros(2, 32),)] for name in col.learners}
    assert budget.budget(col, sink) == budget.CPU_LEARN_SECONDS
    for lr in col.learners.values():
        lr.device = "cuda"  # not initialised yet: where it will compute (torch.device needs no GPU)
    assert budget.budget(col, sink) is None
    col.learn_seconds = 1.5
    assert budget.budget(col, sink) == 1.5
    col._in_fit = True
    assert budget.budget(col, sink) is None
