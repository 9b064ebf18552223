"""Throughput of the greedy pursuit and the Φ-step, per hook, on synthetic data (paper's Appendix D).

GPU (one run, one device):
    PYTHONPATH=$PWD python benchmarks/bench_pursuit.py --device cuda            # d ∈ {576, 768}, a ∈ {8, 16, 32}
    PYTHONPATH=$PWD python benchmarks/bench_pursuit.py --device cuda --d 768 --a 16 --variants all   # precision grid
CPU (2 cores) against scikit-learn's MiniBatchDictionaryLearning (``pip install scikit-learn``):
    python benchmarks/bench_pursuit.py --device cpu --threads 2 --d 128,256 --a 16 --sklearn

Per (d, a): a learner (``OnlineSparseCoder``, m = 8d) is trained on ``--train-tokens`` rows so that the dictionary and
λ are those of steady-state training (step counts depend on them: a random dictionary needs far fewer steps), then
a fresh batch of ``--n`` normalised rows is coded by each path:

* ``reference``  — ``greedy_pursuit_reference`` (one row at a time; ``--ref-rows`` rows only);
* ``torch``      — ``greedy_pursuit(backend="torch")`` (batched, compacting; float32);
* ``fast``       — ``greedy_pursuit`` with its default dispatch (the Triton kernel on CUDA), G and xΦᵀ included;
* ``kernel:G../c../w..`` — the kernel alone (G and xΦᵀ precomputed): G's dtype, xΦᵀ's operand dtype, warps per
  program (one row each); ``--variants all`` adds a precision and launch-shape grid;
* ``gram:*``, ``xPhiT:*`` — the two products around the kernel, in several precisions;
* ``phi-step``   — the learner's Φ-step (on CUDA: bfloat16 products with float32 accumulation,
  ``tl_sparsity.coding.kernels.phi_products``, and the fused Adam kernel; float32 elsewhere);
* ``train``      — pursuit + Φ-step per batch of rows, as the learner runs them (G and xΦᵀ included), each timed
  batch synchronised on its own (so the host's time to queue it is not hidden);
* ``train (stream)`` — the same, ``--stream`` batches queued back to back and synchronised once, as a collector runs
  them (the host queues the next batch while the GPU works);
* ``learner``    — ``partial_fit(rows, check_finite=False)`` (as ``SparsityCollector.fit`` calls it) on
  ``--learner-batches`` fresh batches, synchronised once: held-out split, reservoir and normalisation included —
  the per-hook throughput a collector sees.

Bytes model of the kernel (fraction of HBM bandwidth, measured by a device-to-device copy): per row the kernel reads
its m correlations and writes m zeros (4 B each), and per step reads one row of G (m × 2 B in float16, 4 B in float32)
plus a few scalars (12 B). L2 hits are not modelled, so the fraction can
exceed 1 when G (or much of it) stays in L2.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
import time

import torch

from tl_sparsity import OnlineSparseCoder, greedy_pursuit, greedy_pursuit_reference
from tl_sparsity.coding.synthetic import SparseLinear


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, reps=5, warmup=1):
    """Median wall time (s) of ``fn()`` over ``reps`` runs, synchronised (events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class DeviceSampler:
    """Draws ``SparseLinear`` rows on the device (same distribution, centring and scale as the CPU source)."""

    def __init__(self, src: SparseLinear, dev, seed=0):
        self.src, self.dev = src, dev
        self.f = src.features.to(dev)
        self.shift = src.shift.to(dev)
        self.gen = torch.Generator(device=dev).manual_seed(seed)

    def __call__(self, n):
        s, p = self.src, self.src.a / self.src.n_features
        u = torch.rand(n, s.n_features, generator=self.gen, device=self.dev)
        coef = torch.rand(n, s.n_features, generator=self.gen, device=self.dev) * (u < p)
        noise = torch.randn(n, s.d, generator=self.gen, device=self.dev) * s.noise_var**0.5  # the source's convention
        return (coef @ self.f + noise - self.shift) / s.scale


def hbm_bandwidth(dev):
    if dev.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), dev, reps=10)
    return 2 * a.numel() * 4 / t


def agreement(fast, ref, lam):
    """Agreement of codes with the float64 reference, per row: identical support; ‖Δα‖₁ ≤ 1 % of ‖α_ref‖₁."""
    same = ((fast != 0) == (ref != 0)).all(1)
    diff = (fast - ref).abs().amax(1)
    l1 = (fast - ref).abs().sum(1) / ref.abs().sum(1).clamp_min(1e-30)
    ds = diff[same]
    return {"same_support": float(same.float().mean()), "l1_within_1pct": float((l1 <= 1e-2).float().mean()),
            "max_dalpha_same_over_lam": float(ds.max() / lam) if ds.numel() else float("nan")}


def objective(x, phi, alpha, lam):
    return ((x - alpha @ phi) ** 2).sum(1) + lam * alpha.sum(1)


def train_dictionary(d, a, dev, args):
    src = SparseLinear(d, a, sigma=args.sigma, seed=0)
    tdev = torch.device(args.train_device) if args.train_device else dev
    coder = OnlineSparseCoder(d_in=d, expansion=8, seed=0, batch_size=args.n, device=tdev,
                              warmup_tokens=args.train_tokens // 2, reservoir_size=1024)
    if tdev != dev:  # train on the GPU, benchmark on the CPU: same learned state, moved
        t = time.perf_counter()
        sample = DeviceSampler(src, tdev, seed=1)
        for _ in range(max(1, args.train_tokens // args.n)):
            coder.partial_fit(sample(args.n))
        moved = OnlineSparseCoder(**coder.get_params())
        moved.load_state_dict(coder.state_dict(), device=dev)
        return src, moved, moved.normalize(src.sample(args.n).to(dev)), time.perf_counter() - t
    if dev.type == "cuda":
        sample = DeviceSampler(src, dev, seed=1)
        batches = (sample(args.n) for _ in range(max(1, args.train_tokens // args.n)))
    else:
        batches = (b.to(dev) for b in src.batches(max(args.n, args.train_tokens), args.n))
    t = time.perf_counter()
    for b in batches:
        coder.partial_fit(b)
    sync(dev)
    train_s = time.perf_counter() - t
    fresh = DeviceSampler(src, dev, seed=2)(args.n) if dev.type == "cuda" else src.sample(args.n).to(dev)
    return src, coder, coder.normalize(fresh), train_s


def bench_config(d, a, dev, args, bw, rows):
    if dev.type == "cuda":  # each configuration starts from an empty allocator cache (the previous ones' blocks
        torch.cuda.empty_cache()  # are of other sizes, and a timed step must not wait for cudaMalloc)
    src, coder, x, train_s = train_dictionary(d, a, dev, args)
    phi, lam, n, m = coder.dictionary_, coder.lam_, args.n, coder.dictionary_.shape[0]
    base = {"d": d, "m": m, "a": a, "n": n, "lam": lam, "train_tokens": args.train_tokens, "train_s": round(train_s, 2)}
    res = {}

    def add(name, seconds, nrows, **extra):
        rows.append(dict(base, path=name, s=seconds, mtok_s=nrows / seconds / 1e6, **extra))
        res[name] = rows[-1]

    xr = x[: args.ref_rows]
    t = time.perf_counter()
    greedy_pursuit_reference(xr, phi, lam)
    sync(dev)
    add("reference", time.perf_counter() - t, xr.shape[0])
    ref64, info64 = greedy_pursuit_reference(xr.double(), phi.double(), lam)

    if not args.skip_torch:
        t_torch = timeit(lambda: greedy_pursuit(x, phi, lam, backend="torch"), dev, reps=1)
        a_torch = greedy_pursuit(x, phi, lam, backend="torch")
        add("torch", t_torch, n, **agreement(a_torch[: xr.shape[0]].double(), ref64, lam))
    alpha, info = greedy_pursuit(x, phi, lam, return_info=True)
    steps = info.steps.double()
    stat = {"steps_mean": float(steps.mean()), "steps_p99": float(torch.quantile(steps, 0.99)),
            "steps_max": int(steps.max()), "capped": info.capped, "ref_steps_mean": float(info64.steps.double().mean())}
    t_fast = timeit(lambda: greedy_pursuit(x, phi, lam), dev, reps=args.reps)
    obj_f, obj_r = objective(xr.double(), phi.double(), alpha[: xr.shape[0]].double(), lam), objective(
        xr.double(), phi.double(), ref64, lam)
    add("fast", t_fast, n, **stat, **agreement(alpha[: xr.shape[0]].double(), ref64, lam),
        max_rel_dobj=float(((obj_f - obj_r).abs() / obj_r).max()), mean_rel_dobj=float(((obj_f - obj_r) / obj_r).mean()))

    if dev.type == "cuda":
        from tl_sparsity.coding import kernels as K


        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        W0 = K.kernel_shape(m)["num_warps"]
        variants = [("fp16", "fp16", W0, True, False), ("fp32", "fp16", W0, True, False),
                    ("fp32", "fp32", W0, True, False), ("fp16", "fp16", W0, True, True)]
        if args.variants == "all":
            variants += [("fp16", "fp32", W0, True, False), ("bf16", "bf16", W0, True, False),
                         ("fp16", "fp16", W0, False, False)]
            for g in ("fp16", "fp32"):
                for nw in (2, 4, 8, 16):
                    if nw != W0:
                        variants.append((g, "fp16", nw, True, False))
        variants += [("fp16", "fp16", W0, True, False, r) for r in args.maxnreg]
        c0s = {cd: K.correlations(x, phi, dt[cd]) for cd in {v[1] for v in variants}}
        order = torch.argsort(x.norm(dim=1), descending=True)
        for gd, cd, nw, srt, exact, *maxnreg in variants:
            G, gdiag, gscale = K.gram_matrix(phi, dt[gd])
            c0 = c0s[cd]
            cbuf = torch.empty_like(c0)
            o = order if srt else None
            kw = {"order": o, "num_warps": nw, "exact_diag": exact, "maxnreg": (maxnreg or [None])[0]}
            launch = functools.partial(K.launch, cbuf, G, gdiag, gscale, lam, coder._cap, **kw)
            copy_in = functools.partial(cbuf.copy_, c0)  # the kernel consumes its input; the copy time is subtracted
            t_all = timeit(lambda launch=launch, copy_in=copy_in: (copy_in(), launch()), dev, reps=args.reps)
            t_copy = timeit(copy_in, dev, reps=args.reps)
            copy_in()
            st, _, compiled = launch()
            t_k = max(t_all - t_copy, 1e-9)
            gb = {"fp16": 2, "bf16": 2, "fp32": 4}[gd]
            nbytes = n * m * 8 + float(st.double().sum()) * (m * gb + 12)
            name = f"kernel:G{gd}/c{cd}/w{nw}" + ("" if srt else "/unsorted") + ("/exactdiag" if exact else "") + (
                f"/maxnreg{maxnreg[0]}" if maxnreg else "")
            add(name, t_k, n, steps_mean=float(st.double().mean()), GB=nbytes / 1e9, hbm_frac=nbytes / t_k / bw,
                regs=getattr(compiled, "n_regs", -1), spills=getattr(compiled, "n_spills", -1),
                **agreement(cbuf[: xr.shape[0]].double(), ref64, lam))
        for name, dtype in [("gram:fp16", torch.float16), ("gram:fp32", torch.float32)]:
            add(name, timeit(functools.partial(K.gram_matrix, phi, dtype), dev, reps=args.reps), n)
        xh, ph = x.half(), phi.half()
        add("gram:fp16 GEMM alone", timeit(lambda: ph @ ph.T, dev, reps=args.reps), n)
        add("xPhiT:fp16 unscaled-out (kernel input)",
            timeit(lambda: K.correlations(x, phi, torch.float16, scaled=False), dev, reps=args.reps), n)
        xb, pb = x.bfloat16(), phi.bfloat16()
        corr = [("xPhiT:fp16(out fp32, scaled)", lambda: K.correlations(x, phi, torch.float16)),
                ("xPhiT:fp16 mm out_dtype only", lambda: torch.mm(xh, ph.T, out_dtype=torch.float32)),
                ("xPhiT:fp16 mm fp16 out", lambda: torch.mm(xh, ph.T)),
                ("xPhiT:bf16 mm bf16 out", lambda: torch.mm(xb, pb.T)),
                ("xPhiT:fp32", lambda: K.correlations(x, phi, torch.float32))]
        for name, fn in corr:
            add(name, timeit(fn, dev, reps=args.reps), n)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        add("xPhiT:tf32", timeit(lambda: x @ phi.T, dev, reps=args.reps), n)
        torch.backends.cuda.matmul.allow_tf32 = prev

    # Φ-step and pursuit + Φ-step, on copies of the learner (they move the dictionary)
    c1 = copy.deepcopy(coder)
    add("phi-step", timeit(lambda: c1._phi_step(x, alpha, n), dev, reps=args.reps), n)
    add("train", timeit(lambda: c1._phi_step(x, c1._code(x), n), dev, reps=args.reps), n)

    def stream():  # batches queued back to back, one synchronisation at the end: how a collector runs them
        for _ in range(args.stream):
            c1._phi_step(x, c1._code(x), n)

    add("train (stream)", timeit(stream, dev, reps=max(1, args.reps // 2)), n * args.stream)
    # the learner end to end (partial_fit: held-out split, reservoir, syncs included), per row fed
    sampler = DeviceSampler(src, dev, seed=3)
    feed = [sampler(n) for _ in range(args.learner_batches + 1)]
    lc = copy.deepcopy(coder)
    lc.partial_fit(feed[0])
    sync(dev)
    t = time.perf_counter()
    for b in feed[1:]:
        lc.partial_fit(b, check_finite=False)  # as SparsityCollector.fit calls it (no host sync)
    sync(dev)
    add("learner", (time.perf_counter() - t), n * args.learner_batches)
    if args.sklearn:
        add_sklearn(coder, src, d, m, lam, args, add)


def add_sklearn(coder, src, d, m, lam, args, add):
    try:
        from sklearn.decomposition import MiniBatchDictionaryLearning
    except ImportError:
        print("scikit-learn not installed: skipping its row")
        return
    import numpy as np

    # sklearn's objective is ½‖X − UV‖² + α‖U‖₁, ours ‖x − αΦ‖² + λ‖α‖₁: α_sklearn = λ/2.
    mb = MiniBatchDictionaryLearning(n_components=m, alpha=lam / 2, batch_size=args.sk_batch, positive_code=True,
                                     fit_algorithm="cd", transform_algorithm="lasso_cd", random_state=0,
                                     dict_init=coder.dictionary_.cpu().numpy().astype(np.float64))
    xs = coder.normalize(src.sample(args.sk_batch * (args.sk_batches + 1)).to(coder.dictionary_.device)).cpu()
    xs = xs.numpy().astype(np.float64)
    mb.partial_fit(xs[: args.sk_batch])  # first call allocates the state
    t = time.perf_counter()
    for i in range(1, args.sk_batches + 1):
        mb.partial_fit(xs[i * args.sk_batch : (i + 1) * args.sk_batch])
    add("sklearn:partial_fit", time.perf_counter() - t, args.sk_batch * args.sk_batches)
    # our learner on this device: partial_fit of full batches (median over 3 batches after one warm-up batch)
    c3 = copy.deepcopy(coder)
    xb = src.sample(args.n * 4).to(coder.dictionary_.device)
    times = []
    for i in range(4):
        t = time.perf_counter()
        c3.partial_fit(xb[i * args.n : (i + 1) * args.n])
        times.append(time.perf_counter() - t)
    add("ours:partial_fit", statistics.median(times[1:]), args.n)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d", default="576,768")
    p.add_argument("--a", default="8,16,32")
    p.add_argument("--n", type=int, default=4096, help="rows per batch (the learner's batch_size)")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--train-tokens", type=int, default=None, help="default 2^20 on CUDA, 0 (one batch) on CPU")
    p.add_argument("--ref-rows", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", choices=["default", "all"], default="default")
    p.add_argument("--skip-torch", action="store_true", help="skip the slow batched torch path")
    p.add_argument("--sklearn", action="store_true", help="also time scikit-learn's MiniBatchDictionaryLearning")
    p.add_argument("--sk-batch", type=int, default=256)
    p.add_argument("--sk-batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-device", default=None, help="train the dictionary there (e.g. cuda for a CPU run)")
    p.add_argument("--learner-batches", type=int, default=8, help="batches fed to each learner (CUDA)")
    p.add_argument("--stream", type=int, default=8, help="batches per timing of 'train (stream)'")
    p.add_argument("--maxnreg", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                   help="also time the default kernel with these register caps per thread, e.g. 96,80")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.train_tokens is None:
        args.train_tokens = 1 << 20 if dev.type == "cuda" else 0
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    bw = hbm_bandwidth(dev)
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for d in [int(v) for v in args.d.split(",")]:
        for a in [float(v) for v in args.a.split(",")]:
            bench_config(d, a, dev, args, bw, rows)
            print_table([r for r in rows if r["d"] == d and r["a"] == a])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "bandwidth": bw, "args": vars(args), "rows": rows}, f, indent=1)
    print("\nSUMMARY (M tokens/s per hook)")
    print_summary(rows)


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}")
    return str(v)


def print_table(rows):
    r0 = rows[0]
    print(f"\n## d={r0['d']} m={r0['m']} a={r0['a']:g} n={r0['n']} λ={r0['lam']:.4f} (dictionary trained on "
          f"{r0['train_tokens']} rows in {r0['train_s']} s)")
    cols = ["path", "mtok_s", "s", "regs", "spills", "steps_mean", "steps_p99", "steps_max", "capped", "ref_steps_mean", "GB",
            "hbm_frac", "same_support", "l1_within_1pct", "max_dalpha_same_over_lam", "max_rel_dobj", "mean_rel_dobj"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")


def print_summary(rows):
    paths = ["reference", "torch", "fast", "train", "train (stream)", "learner", "sklearn:partial_fit",
             "ours:partial_fit"]
    keys = sorted({(r["d"], r["a"]) for r in rows})
    present = [p for p in paths if any(r["path"] == p for r in rows)]
    print("| d | a | steps | " + " | ".join(present) + " |")
    print("|" + "---|" * (3 + len(present)))
    for d, a in keys:
        sel = {r["path"]: r for r in rows if r["d"] == d and r["a"] == a}
        cells = [_fmt(sel[p]["mtok_s"]) if p in sel else "" for p in present]
        print(f"| {d} | {a:g} | {_fmt(sel['fast'].get('steps_mean', float('nan')))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
