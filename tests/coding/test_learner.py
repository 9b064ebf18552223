import pytest
import torch

from tl_sparsity import OnlineSparseCoder


def _state(c: OnlineSparseCoder):
    return (c.dictionary_, c.mean_, torch.tensor(c.scale_), torch.tensor(c.lam_), c.heldout_,
            torch.tensor([c.n_tokens_, c.n_heldout_, c.n_steps_, c.n_pending_]))


def test_streaming_partial_fit_over_chunks_equals_one_call_on_the_concatenation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g)
    opts = dict(expansion=4, seed=7, batch_size=256, reservoir_size=300, warmup_tokens=1000)
    one = OnlineSparseCoder(**opts).partial_fit(x)
    many = OnlineSparseCoder(**opts)
    i = 0
    for size in [1, 7, 300, 2, 999, 1500, 13]:
        many.partial_fit(x[i : i + size])
        i += size
    many.partial_fit(x[i:])
    for a, b in zip(_state(one), _state(many)):
        assert torch.equal(a, b)


def _planted(n, d=24, m_true=48, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(m_true, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(m_true, generator=g)[:k] for _ in range(n)])
    coef = torch.zeros(n, m_true).scatter_(1, idx, 0.5 + torch.rand(n, k, generator=g))
    return coef @ f, f


def test_planted_dictionary_is_recovered():
    x, f = _planted(60000)
    c = OnlineSparseCoder(expansion=4, seed=0, batch_size=512)
    c.partial_fit(x)
    # the learner centres and scales the data: compare directions in the learner's frame
    best = (torch.nn.functional.normalize(f, dim=1) @ c.dictionary_.T).max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.8, best


def test_evaluate_uses_held_out_rows_never_trained_on():
    x = torch.randn(4096, 8)
    c = OnlineSparseCoder(expansion=2, seed=1, batch_size=512, holdout_frac=0.25).partial_fit(x)
    assert c.n_tokens_ + c.n_heldout_ == 4096
    assert 0.2 < c.n_heldout_ / 4096 < 0.3
    ev = c.evaluate()
    assert ev["n_eval"] == c.n_heldout_
    held = c.heldout_ * c.scale_ + c.mean_
    # every held-out row is one of the inputs
    d = torch.cdist(held, x, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert d.max() < 1e-4


def test_nonfinite_rows_are_dropped_and_counted():
    x = torch.randn(1200, 8)
    x[5, 2] = float("nan")
    x[17, 0] = float("inf")
    c = OnlineSparseCoder(expansion=2, batch_size=256).partial_fit(x)
    assert c.n_dropped_ == 2
    assert torch.isfinite(c.dictionary_).all()


def test_bad_options_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="solver"):
        OnlineSparseCoder(solver="omp")
    with pytest.raises(ValueError, match="holdout_frac"):
        OnlineSparseCoder(holdout_frac=1.5)
    c = OnlineSparseCoder(d_in=8)
    with pytest.raises(ValueError, match="d_in=8"):
        c.partial_fit(torch.randn(10, 9))
    with pytest.raises(RuntimeError, match="no dictionary yet"):
        c.evaluate()
    c = OnlineSparseCoder().partial_fit(torch.randn(3, 5))  # d_in inferred from the rows waiting for a batch
    with pytest.raises(ValueError, match="d_in=5 but got rows of width 6"):
        c.partial_fit(torch.randn(3, 6))


def test_state_memory_equals_the_formula_whatever_the_tokens_seen():
    from tl_sparsity.coding.learner import state_bytes
    from tl_sparsity.coding.options import REPLAY_FLOATS, replay_rows

    d, m, reservoir, batch = 12, 36, 40, 64
    replay = replay_rows(None, batch, d)  # the default buffer: 16 MiB of rows, as 2²² // d > 8 × batch here
    assert replay == REPLAY_FLOATS // d == 349_525 and replay_rows(None, 1024, 576) == 8 * 1024
    c = OnlineSparseCoder(expansion=3, batch_size=batch, reservoir_size=reservoir, max_steps=8)
    x = torch.randn(6000, d, generator=torch.Generator().manual_seed(0))
    # small chunks, a chunk of many batches (its tail must not keep the whole chunk alive), single rows
    for a, b in [(0, 100), (100, 170), (170, 2170), (2170, 2171), (2171, 6000)]:
        c.partial_fit(x[a:b])
        assert c.memory_bytes() == state_bytes(d, m, reservoir, c.n_pending_, c.probe_size, replay) == 4 * d * (
            3 * m + 1 + reservoir + c.probe_size + replay + c.n_pending_)
    assert c.n_tokens_ + c.n_heldout_ > 90 * batch
    assert c.memory_bytes() <= state_bytes(d, m, reservoir, batch - 1, c.probe_size, replay)


def test_rows_kept_for_the_next_batch_are_copies_not_the_caller_s_tensor():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    clean = OnlineSparseCoder(expansion=2, batch_size=64, max_steps=8).partial_fit(x)
    buf = x[:40].clone()
    c = OnlineSparseCoder(expansion=2, batch_size=64, max_steps=8).partial_fit(buf)
    buf.zero_()  # the caller reuses its buffer
    c.partial_fit(x[40:])
    assert torch.equal(c.dictionary_, clean.dictionary_) and torch.equal(c.heldout_, clean.heldout_)


def test_center_false_keeps_the_rows_origin_and_equals_feeding_centred_rows_to_a_centring_learner():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(600, 12, generator=gen) @ torch.randn(12, 12, generator=gen) + 3.0
    plain = OnlineSparseCoder(expansion=2, batch_size=200, seed=1, center=False).partial_fit(x)
    assert torch.equal(plain.mean_, torch.zeros(12))
    train = x[:200][~(torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.1)]  # its first training rows
    assert plain.scale_ == pytest.approx(float(train.norm(dim=1).mean()), rel=1e-6)  # scaled about the origin
    centred = x - train.mean(0)  # a centring learner subtracts its first training rows' mean: the same rows result
    a = OnlineSparseCoder(expansion=2, batch_size=200, seed=1, center=False).partial_fit(centred)
    b = OnlineSparseCoder(expansion=2, batch_size=200, seed=1).partial_fit(centred)
    assert b.mean_.abs().max() < 1e-5
    torch.testing.assert_close(a.dictionary_, b.dictionary_, atol=1e-4, rtol=0)
    assert plain.get_params()["center"] is False


def test_check_finite_false_skips_only_the_check():
    from tl_sparsity.tl.feeding import all_finite as _all_finite

    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    a = OnlineSparseCoder(expansion=2, batch_size=100, seed=0).partial_fit(x[:230]).partial_fit(x[230:])
    b = OnlineSparseCoder(expansion=2, batch_size=100, seed=0)
    b.partial_fit(x[:230], check_finite=False).partial_fit(x[230:], check_finite=False)
    torch.testing.assert_close(a.dictionary_, b.dictionary_, atol=0, rtol=0)
    bad = x[:5].clone()
    bad[3, 1] = float("inf")
    assert _all_finite([x[:7], bad, torch.zeros(0, 8), torch.tensor([[float("nan")]])]) == [True, False, True, False]


def test_reservoir_equals_sequential_algorithm_r_with_the_same_draws():
    """The vectorised reservoir (host-resolved slots, one gather and one scatter) keeps exactly the rows a plain
    one-row-at-a-time Algorithm R keeps, given the same uniform draws, across chunks of any size."""
    coder = OnlineSparseCoder(d_in=3, expansion=1, reservoir_size=7, seed=5)
    coder._gen = torch.Generator().manual_seed(5)
    coder._init_state(torch.randn(16, 3))
    start = coder._gen.get_state()
    rows = torch.arange(60 * 3, dtype=torch.float32).reshape(60, 3)  # row i holds 3i, 3i+1, 3i+2
    chunks = [rows[:4], rows[4:5], rows[5:9], rows[9:30], rows[30:31], rows[31:60]]
    for c in chunks:
        coder._add_heldout(c)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(start)
    want, seen = [None] * 7, 0
    for c in chunks:
        fill = sum(r is not None for r in want)
        take = min(7 - fill, c.shape[0])
        for j in range(take):
            want[fill + j] = c[j]
        if c.shape[0] > take:
            u = torch.rand(c.shape[0] - take, generator=gen, dtype=torch.float64)
            for j, uj in enumerate(u.tolist()):
                slot = int(uj * (seen + take + j + 1))
                if slot < 7:
                    want[slot] = c[take + j]
        seen += c.shape[0]
    assert coder.n_heldout_ == 60 and torch.equal(coder.heldout_, torch.stack(want))


def test_options_object_holds_the_constructor_s_arguments_defaults_and_checks():
    import dataclasses
    import inspect

    from tl_sparsity import LearnerOptions

    sig = inspect.signature(OnlineSparseCoder).parameters
    fields = dataclasses.fields(LearnerOptions)
    assert list(sig) == [f.name for f in fields]  # one field per argument, in order
    assert {k: p.default for k, p in sig.items()} == {f.name: f.default for f in fields}  # one set of defaults
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.values())
    # get_params: every argument but device, in this order (saved files and reports rely on it)
    keys = ["d_in", "expansion", "lam", "solver", "seed", "batch_size", "lr", "warmup_tokens", "lam_ratio",
            "holdout_frac", "reservoir_size", "max_steps", "phi_steps", "init", "center", "replay", "replay_size",
            "warmup_steps", "probe_size", "tol", "min_steps", "lam_rounds", "rate_checks", "massive_ratio",
                "phi_optimizer"]
    c = OnlineSparseCoder(expansion=3, seed=4.0, lam=1, center=0, replay_size=9.0, device="cpu")
    assert list(c.get_params()) == keys and c.device == "cpu"
    assert [type(v) for v in (c.seed, c.lam, c.center, c.replay_size)] == [int, float, bool, int]  # as before
    assert c.options == LearnerOptions(expansion=3, seed=4, lam=1.0, center=False, replay_size=9, device="cpu")
    twin = OnlineSparseCoder.from_options(c.options)
    assert twin.get_params() == c.get_params() and twin.device == "cpu"
    opts = LearnerOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lam = 0.1  # type: ignore[misc]
    for bad, match in [(dict(solver="omp"), "solver must be one of"), (dict(init="zeros"), "init must be"),
                       (dict(batch_size=1), "batch_size must be ≥ 2"), (dict(probe_size=4), "probe_size must be ≥ 8"),
                       (dict(replay_size=0), "replay_size ≥ 1"), (dict(lam_rounds=-1), "lam_rounds must be ≥ 0"),
                       (dict(tol=0), "tol"), (dict(lam=0), "lam must be > 0")]:
        with pytest.raises(ValueError, match=match):
            LearnerOptions(**bad)
        with pytest.raises(ValueError, match=match):
            OnlineSparseCoder(**bad)
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(opts, **bad)


def test_command_line_learner_flags_take_the_options_defaults_and_docs():
    import dataclasses

    from tl_sparsity import LearnerOptions, cli
    from tl_sparsity.coding.options import option_docs

    args = cli._parser().parse_args(["run"])
    options = cli.learner_options(args)
    defaults = {f.name: f.default for f in dataclasses.fields(LearnerOptions) if f.name not in ("d_in", "device")}
    assert options == defaults
    assert all(option_docs()[name] for name in defaults)  # every option documented (the flags' help)
    args = cli._parser().parse_args(["run", "--learner-batch-size", "256", "--batch-size", "4", "--no-center",
                                     "--tol", "0.05", "--device", "cuda"])
    options = cli.learner_options(args)
    assert (options["batch_size"], args.batch_size, options["center"], options["tol"]) == (256, 4, False, 0.05)
    assert options["device"] == "cuda"
    LearnerOptions(**options)


def test_one_gram_matrix_per_dictionary_where_several_batches_are_coded_and_the_same_codes(monkeypatch):
    """``evaluate`` (a chunk per learner batch) and λ's warm-up (two codings of each batch) code with one dictionary:
    they form its Gram matrix once, and the codes are those of a fresh Gram matrix. (λ's check, three rounds on the
    replay buffer, passes its Gram matrix the same way; it is not counted here.)"""
    from tl_sparsity.coding import training

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 16, generator=g)
    lr = OnlineSparseCoder(expansion=4, seed=0, batch_size=256, reservoir_size=2000, warmup_steps=3)
    lr.partial_fit(x[:3000])
    rows = lr.heldout_[:300]
    assert torch.equal(lr._code(rows, gram=lr._gram()), lr._code(rows))

    calls, grams = [], []  # per pursuit call: was it given a Gram matrix; one entry per Gram matrix formed
    real = training.greedy_pursuit_torch

    def counting(xn, dic, lam, max_steps=None, gram=None, return_info=False, **kw):
        calls.append(gram is not None)
        return real(xn, dic, lam, max_steps, gram, return_info, **kw)

    def counted_gram(self):
        grams.append(1)
        return self.dictionary_ @ self.dictionary_.T

    def count():
        calls.clear()
        grams.clear()
        monkeypatch.setattr(training, "greedy_pursuit_torch", counting)
        monkeypatch.setattr(OnlineSparseCoder, "_gram", counted_gram)

    count()
    before = lr.evaluate()
    assert len(calls) == -(-lr.heldout_.shape[0] // 256) > 1 and all(calls) and len(grams) == 1
    monkeypatch.undo()
    assert before == lr.evaluate()  # the same metrics from a Gram matrix per chunk

    warm = OnlineSparseCoder(expansion=4, seed=0, batch_size=256, replay=1, warmup_steps=100)
    count()
    warm.partial_fit(x[:2048])
    assert warm.lam_adapting and warm.n_steps_ > 1
    assert all(calls) and len(calls) == 2 * warm.n_steps_ and len(grams) == warm.n_steps_


def test_a_full_replay_ring_saved_with_a_smaller_buffer_loads_oldest_first_and_is_not_overwritten():
    """A state whose options say ``replay_size=None`` but whose ring is smaller than that now means (files written
    when None meant 8 × ``batch_size``): its rows come back oldest first, and new rows go after them."""
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))
    old = OnlineSparseCoder(expansion=2, seed=0, batch_size=32, replay=1, replay_size=256)
    old.partial_fit(x[:1000])
    assert old._replay_fill == 256 and old._replay_pos != 0  # a full ring that has wrapped
    state = old.state_dict()
    state["meta"]["params"]["replay_size"] = None  # as such a file records it
    new = OnlineSparseCoder(**{**state["meta"]["params"]}).load_state_dict(state)
    ring = old._replay_buf
    oldest_first = torch.cat([ring[old._replay_pos :], ring[: old._replay_pos]])
    assert new._replay_buf.shape[0] > 256 and new._replay_fill == new._replay_pos == 256
    assert torch.equal(new._replay_buf[:256], oldest_first)
    new._remember(x[1000:1010])
    assert torch.equal(new._replay_buf[:256], oldest_first) and new._replay_fill == 266
    same = OnlineSparseCoder(expansion=2, seed=0, batch_size=32, replay=1, replay_size=256).load_state_dict(
        old.state_dict())  # the same buffer size: the ring as it was
    assert torch.equal(same._replay_buf, ring) and same._replay_pos == old._replay_pos
