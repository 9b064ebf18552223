import copy

import pytest
import torch

from tl_sparsity import OnlineSparseCoder, SparsityCollector
from tl_sparsity.coding.grouped import group_key, train_together

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _learners(k=3, d=16, device="cpu", **opts):
    """k learners of one shape past their first batches (λ fixed, so no warm-up), each on its own data."""
    out = []
    for seed in range(k):
        lr = OnlineSparseCoder(d_in=d, expansion=4, lam=0.05, batch_size=64, seed=seed, reservoir_size=32,
                               device=device, **opts)
        lr.partial_fit(torch.randn(192, d, generator=torch.Generator().manual_seed(seed)).to(device))
        out.append(lr)
    return out


def _rows(sizes, d=16, device="cpu"):
    g = torch.Generator().manual_seed(99)
    return [torch.randn(n, d, generator=g).to(device) for n in sizes]


def _assert_same_state(a, b, rtol, atol):
    for name in ("dictionary_", "_adam_m", "_adam_v"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, msg=name)
    assert (a.n_tokens_, a.n_steps_, a.capped_) == (b.n_tokens_, b.n_steps_, b.capped_)


def test_training_together_equals_training_each_alone_with_ragged_row_counts():
    """Three learners, 50, 57 and 64 training rows: the zero rows padding the stack take no step and add nothing
    to any gradient, and each learner's gradient is scaled by its own −2/n (compared through the Adam moments,
    which the direction-only Adam update would hide)."""
    together, alone = _learners(), None
    alone = copy.deepcopy(together)
    rows = _rows([50, 57, 64])
    train_together(list(zip(together, rows)), force=True)
    for lr, x in zip(alone, rows):
        lr._train(x, x.shape[0])
    for a, b in zip(together, alone):
        _assert_same_state(a, b, rtol=1e-5, atol=1e-7)
    assert together[0].n_steps_ == alone[0].n_steps_ == 4 * (1 + together[0]._replay_n)  # each batch: 1 + replay steps


def test_learners_in_warm_up_or_of_another_shape_or_solver_train_alone_bit_for_bit():
    warm = OnlineSparseCoder(d_in=16, expansion=4, batch_size=64, warmup_tokens=10**6, seed=4)
    warm.partial_fit(torch.randn(64, 16, generator=torch.Generator().manual_seed(4)))
    wide = _learners(k=1, d=24)[0]
    lasso = _learners(k=1, solver="lasso")[0]
    pair = _learners(k=2)
    jobs = list(zip([warm, wide, lasso, *pair], _rows([40, 41], d=16)[:1] + _rows([40], d=24) + _rows([42, 43, 44])))
    assert [group_key(lr, x, force=True) is None for lr, x in jobs] == [True, False, True, False, False]
    before = copy.deepcopy([lr for lr, _ in jobs])
    train_together(jobs, force=True)
    for (lr, x), b in zip(jobs[:3], before[:3]):
        b._train(x, x.shape[0])
        _assert_same_state(lr, b, rtol=0, atol=0)
    assert warm.lam_ == before[0].lam_  # λ adapted during warm-up, as alone


def test_on_the_cpu_nothing_trains_together_unless_forced():
    learners = _learners(k=2)
    assert all(group_key(lr, x) is None for lr, x in zip(learners, _rows([10, 10])))


def test_fit_feeds_hooks_round_by_round_with_the_states_of_hook_by_hook_feeding(model):
    """fit() takes each hook's r-th batch together (several batches per forward here); the hooks attached with
    attach() feed each hook in turn through partial_fit. The learners end bit for bit equal."""
    opts = dict(batch_size=16, warmup_tokens=32, reservoir_size=24, expansion=2)
    tokens = torch.randint(1, 200, (4, 17), generator=torch.Generator().manual_seed(1))
    fitted = SparsityCollector(model, "resid_post", **opts).fit([tokens, tokens.flip(0)])
    attached = SparsityCollector(model, "resid_post", **opts)
    for t in (tokens, tokens.flip(0)):
        with attached.attach():
            model(t)
    for name, a in fitted.learners.items():
        b = attached.learners[name]
        assert a.n_steps_ == b.n_steps_ > 4
        _assert_same_state(a, b, rtol=0, atol=0)


@cuda
def test_cuda_training_together_matches_alone_through_the_grouped_kernel():
    together = _learners(k=4, d=96, device="cuda")
    alone = copy.deepcopy(together)
    rows = _rows([200, 231, 256, 190], d=96, device="cuda")
    assert all(group_key(lr, x) is not None for lr, x in zip(together, rows))
    train_together(list(zip(together, rows)))
    for lr, x in zip(alone, rows):
        lr._train(x, x.shape[0])
    for a, b in zip(together, alone):  # the same kernel codes; batched vs single bf16 GEMMs in the Φ-step
        _assert_same_state(a, b, rtol=2e-3, atol=1e-5)


def test_a_group_over_the_memory_budget_trains_in_chunks_with_the_same_result(monkeypatch):
    import tl_sparsity.coding.grouped as grouped

    calls = []
    real = grouped._step_group
    monkeypatch.setattr(grouped, "_step_group", lambda chunk: (calls.append(len(chunk)), real(chunk)))
    together = _learners(k=5)
    alone = copy.deepcopy(together)
    rows = _rows([60, 61, 62, 63, 64])
    m, d = together[0].dictionary_.shape
    monkeypatch.setattr(grouped, "GROUP_BYTES", 2 * (2 * m * m + 8 * 64 * m + 12 * m * d + 12 * 64 * d))
    train_together(list(zip(together, rows)), force=True)
    assert calls == [2, 2] * (1 + together[0]._replay_n)  # per step, 2 + 2 together, the fifth alone
    for lr, x in zip(alone, rows):
        lr._train(x, x.shape[0])
    for a, b in zip(together, alone):
        _assert_same_state(a, b, rtol=1e-5, atol=1e-7)


def test_replay_steps_are_taken_together_and_each_learner_takes_the_steps_it_takes_alone(monkeypatch):
    """The r-th replay step of every learner in a group is one grouped pass, learners with different replay counts
    (2, 5, none) included; each learner draws its own replay rows, so every one ends as trained alone."""
    import tl_sparsity.coding.grouped as grouped

    calls = []
    real = grouped._step_group
    monkeypatch.setattr(grouped, "_step_group", lambda chunk: (calls.append(len(chunk)), real(chunk)))
    together = [_learners(k=1, replay=r)[0] for r in (2, 5, 0)]
    for lr, seed in zip(together, (7, 8, 9)):  # their own replay draws
        lr._gen.manual_seed(seed)
    alone = copy.deepcopy(together)
    rows = _rows([50, 57, 64])
    train_together(list(zip(together, rows)), force=True)
    assert calls == [3, 2, 2]  # the fresh batch, then replay steps 1-2 together; 3-5 (one learner) alone
    for lr, x in zip(alone, rows):
        lr._train(x, x.shape[0])
    for a, b in zip(together, alone):
        _assert_same_state(a, b, rtol=1e-5, atol=1e-7)
        assert a.trace_.steps == b.trace_.steps and a._replay_fill == b._replay_fill
    assert [lr.n_steps_ for lr in together] == [lr.n_steps_ for lr in alone]


def test_a_batch_s_replay_draws_at_once_are_the_per_step_draws():
    """One randint for all of a batch's replay steps gives the rows that one draw per step gives (torch's CPU
    generator fills in order), so a learner's dictionaries do not depend on how its draws are batched."""
    lr = OnlineSparseCoder(batch_size=64, seed=2, expansion=2, replay=5)
    lr.partial_fit(torch.randn(3 * 64, 12, generator=torch.Generator().manual_seed(0)))
    state = lr._gen.get_state()
    at_once = list(lr._replay_rows(57))
    lr._gen.set_state(state)
    one_by_one = [lr._replay_buf.index_select(0, torch.randint(0, lr._replay_fill, (57,), generator=lr._gen))
                  for _ in range(5)]
    assert len(at_once) == 5 and all(torch.equal(a, b) for a, b in zip(at_once, one_by_one))
