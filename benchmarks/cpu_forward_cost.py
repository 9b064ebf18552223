"""What one forward's learning costs a CPU: CPU seconds (one thread, process time, so other jobs on the machine do not
count) for ``OnlineSparseCoder`` to take 1 024 rows — one forward of 8 windows of 128 tokens gives each hook about
that many — on synthetic rows (``SparseLinear``, no model), during λ's warm-up (the first 100 dictionary steps: all a
notebook's first forwards see), for the default learner options and the CPU rule of ``tl_sparsity.coding.cpu``.

    PYTHONPATH=$PWD nice python benchmarks/cpu_forward_cost.py --d 64 576
    PYTHONPATH=$PWD nice python benchmarks/cpu_forward_cost.py --d 576 --settings 256:1 --after 30   # past warm-up
    PYTHONPATH=$PWD nice python benchmarks/cpu_forward_cost.py --converge --d 64 --a 4   # the same number?

``--model smollm2-135m`` measures the real thing instead: a collector on ``resid_post`` of ``--layers`` with the CPU
rule, one forward of 8 × 128 tokens of the standard library's documentation at a time, the CPU seconds of each forward
with the collector attached minus those of the same forward without it (printed every ``--every`` forwards):

    PYTHONPATH=$PWD nice python benchmarks/cpu_forward_cost.py --model smollm2-135m --layers 0,15,29 --forwards 60

``--cells`` (with ``--model``) plays a notebook instead: ``start()``, one cell per forward, then ``report()``, with
the per-forward learning budget (``tl_sparsity.tl.budget``) and without it, each cell's wall seconds side by side:

    PYTHONPATH=$PWD python benchmarks/cpu_forward_cost.py --model smollm2-135m --layers 0,15,29 --forwards 12 --cells

``--converge`` instead trains each setting on 4 096-row chunks until its learner has converged (at most 120 k rows)
and prints where, and the held-out normalized loss and FVU there. Results and the rule: ``docs/cpu.md``.
"""

from __future__ import annotations

import argparse
import time

import torch

from tl_sparsity import OnlineSparseCoder
from tl_sparsity.coding.synthetic import SparseLinear


def cost(d: int, batch: int, replay: int, a: float, rows: int = 1024, after: int = 0) -> tuple[float, int]:
    """(CPU seconds, dictionary steps) for ``rows`` rows after a first learner batch (normaliser, dictionary seed)
    and ``after`` more forwards' worth of ``rows`` rows (``after`` ≥ 13 with 8 steps per 1 024 rows: past λ's
    warm-up)."""
    src = SparseLinear(d, a, sigma=0.1, seed=0)
    coder = OnlineSparseCoder(batch_size=batch, replay=replay, seed=0)
    coder.partial_fit(src.sample(batch))
    for _ in range(after):
        coder.partial_fit(src.sample(rows))
    x, steps = src.sample(rows), coder.n_steps_
    t = time.process_time()
    coder.partial_fit(x)
    return time.process_time() - t, coder.n_steps_ - steps


def converge(d: int, batch: int, replay: int, a: float, cap: int = 120_000) -> str:
    """Train until converged (or ``cap`` rows) on centred synthetic rows; the verdict and the held-out metrics."""
    src = SparseLinear(d, a, sigma=0.1, seed=0)
    coder, n, t = OnlineSparseCoder(batch_size=batch, replay=replay, seed=0, center=False), 0, time.process_time()
    while not coder.converged_ and n < cap:
        coder.partial_fit(src.sample(4096))
        n += 4096
    e = coder.evaluate()
    return (f"| {d} | {a:g} | {batch} | {replay} | {coder.converged_} | {n} | {coder.n_steps_} | "
            f"{e['normalized_loss']:.3f} | {e['fvu']:.3f} | {time.process_time() - t:.0f} |")


def model_cost(name: str, layers: list[int], forwards: int, every: int) -> None:
    """Per forward: CPU seconds of learning (with the collector minus without it), dictionary steps, λ frozen?"""
    from tl_sparsity import SparsityCollector
    from tl_sparsity.coding.cpu import cpu_options
    from tl_sparsity.text import load_texts, token_windows
    from tl_sparsity.tl.models import load_model

    model, tok = load_model(name, device="cpu")
    batches = list(token_windows(tok, load_texts("pydoc"), ctx_len=128, batch_size=8, seed=0,
                                 max_tokens=forwards * 8 * 127))[:forwards]
    col = SparsityCollector(model, hooks="resid_post", layers=layers, **cpu_options("cpu"))
    col.progress = False
    print(f"{name}, resid_post of layers {layers}, CPU rule {cpu_options('cpu')}, torch {torch.__version__}, "
          "1 thread; CPU s per forward of 8 × 128 tokens")
    print("| forward | learning CPU s (all hooks) | per hook | dictionary steps | λ adapting |")
    print("|---|---|---|---|---|")
    total = 0.0
    for i, tokens in enumerate(batches, 1):
        with torch.no_grad():
            t = time.process_time()
            model(tokens)
            plain = time.process_time() - t
            t = time.process_time()
            model.run_with_hooks(tokens, fwd_hooks=col.fwd_hooks())
            learn = time.process_time() - t - plain
        total += learn
        if i % every == 0 or i == len(batches):
            lr = next(iter(col.learners.values()))
            print(f"| {i} | {learn:.2f} | {learn / len(layers):.2f} | {lr.n_steps_} | {lr.lam_adapting} |", flush=True)
    print(f"mean over {len(batches)} forwards: {total / len(batches):.2f} CPU s ({total / len(batches) / len(layers):.2f} "
          "per hook)")
    print("\nOne dictionary step's parts, each hook's learner as it is now, on one learner batch of its replay buffer "
          "(its most recent training rows; second of two timings):")
    print("| hook | Gram ΦΦᵀ CPU s | pursuit CPU s | mean / max pursuit steps per row | atoms used by the batch |")
    print("|---|---|---|---|---|")
    for hook, lr in col.learners.items():
        print(step_parts(hook, lr), flush=True)


def cells(name: str, layers: list[int], forwards: int) -> None:
    """A notebook's cells: ``start()``, then one forward of 8 × 128 tokens per cell, then ``report()``; each cell's
    wall seconds with the learning budget (``learn_seconds="auto"``: ``tl_sparsity.tl.budget.CPU_LEARN_SECONDS`` on
    a CPU) and without it (None: every learner batch inside its forward), and whether the two reports agree."""
    from tl_sparsity import SparsityCollector
    from tl_sparsity.text import load_texts, token_windows
    from tl_sparsity.tl.models import load_model

    model, tok = load_model(name, device="cpu")
    batches = list(token_windows(tok, load_texts("pydoc"), ctx_len=128, batch_size=8, seed=0,
                                 max_tokens=forwards * 8 * 127))[:forwards]
    runs = {}
    for setting in ("auto", None):
        col = SparsityCollector(model, hooks="resid_post", layers=layers)
        col.progress, col.learn_seconds = False, setting
        col.start()
        walls, backlog = [], []
        for tokens in batches:
            t = time.perf_counter()
            with torch.no_grad():
                model(tokens)
            walls.append(time.perf_counter() - t)
            backlog.append(max(lr.n_pending_ // lr.batch_size for lr in col.learners.values()))
        col.stop()
        t = time.perf_counter()
        report = col.report()
        runs[setting] = (walls, backlog, time.perf_counter() - t, report.df)
    t = time.perf_counter()
    with torch.no_grad():
        model(batches[0])
    plain = time.perf_counter() - t
    print(f"{name}, resid_post of layers {layers}, the CPU's learner options, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); wall seconds per cell (one forward of 8 × 128 tokens: {plain:.2f})")
    print('| cell | learn_seconds="auto" | backlog after it (batches per hook) | learn_seconds=None |')
    print("|---|---|---|---|")
    (wa, ba, ra, da), (wn, _, rn, dn) = runs["auto"], runs[None]
    for i in range(len(batches)):
        print(f"| forward {i + 1} | {wa[i]:.2f} | {ba[i]} | {wn[i]:.2f} |")
    print(f"| report() | {ra:.2f} | 0 | {rn:.2f} |")
    print(f"| all cells | {sum(wa) + ra:.2f} | | {sum(wn) + rn:.2f} |")
    cols = ["n_tokens", "n_heldout", "normalized_loss", "n_active", "fvu", "n_steps"]
    print(f"the two reports' {', '.join(cols)}: {'identical' if da[cols].equals(dn[cols]) else 'DIFFERENT'}")


def step_parts(hook: str, lr: OnlineSparseCoder) -> str:
    """The two parts of one dictionary step that grow with the dictionary: its Gram matrix (m² d) and the greedy
    pursuit of a learner batch in correlation space; and how many distinct atoms the batch's codes use (a Gram
    computed only for those rows would save the rest)."""
    from tl_sparsity.coding.pursuit import greedy_pursuit_torch

    x, dic = lr._replay_buf[: min(lr.batch_size, lr._replay_fill)], lr.dictionary_
    for _ in range(2):
        t = time.process_time()
        gram = dic @ dic.T
        t_gram, t = time.process_time() - t, time.process_time()
        alpha, info = greedy_pursuit_torch(x, dic, lr.lam_, max_steps=lr._cap, gram=gram, return_info=True)
        t_pursuit = time.process_time() - t
    steps = info.steps.float()
    return (f"| {hook} | {t_gram:.3f} | {t_pursuit:.3f} | {steps.mean():.0f} / {steps.max():.0f} | "
            f"{int((alpha > 0).any(0).sum())} of {dic.shape[0]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, nargs="+", default=[64, 576])
    p.add_argument("--a", type=float, default=16, help="active features per synthetic row")
    p.add_argument("--settings", default="1024:15,1024:7,256:1,1024:1", help="learner_batch:replay pairs")
    p.add_argument("--converge", action="store_true", help="train each setting until converged instead")
    p.add_argument("--model", default=None, help="measure a real model's resid_post instead (smollm2-135m, minilm)")
    p.add_argument("--layers", default="0,15,29", help="with --model: comma-separated layers")
    p.add_argument("--forwards", type=int, default=60, help="with --model: forwards of 8 × 128 tokens")
    p.add_argument("--every", type=int, default=5, help="with --model: print every N forwards")
    p.add_argument("--cells", action="store_true",
                   help="with --model: a notebook's cells (start(), forwards, report()) with and without the budget")
    p.add_argument("--after", type=int, default=0,
                   help="forwards of 1 024 rows fed before the measured one (30: well past λ's warm-up)")
    args = p.parse_args()
    if args.model and args.cells:  # as a notebook runs: torch's default threads
        cells(args.model, [int(v) for v in args.layers.split(",")], args.forwards)
        return
    torch.set_num_threads(1)
    if args.model:
        model_cost(args.model, [int(v) for v in args.layers.split(",")], args.forwards, args.every)
        return
    if args.converge:
        print("| d | a | learner batch | replay | converged | rows | steps | normalized loss | fvu | CPU s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for d in args.d:
            for s in args.settings.split(",")[:2]:
                batch, replay = (int(v) for v in s.split(":"))
                print(converge(d, batch, replay, args.a), flush=True)
        return
    when = "during warm-up" if args.after == 0 else f"after {args.after} forwards of 1 024 rows"
    print(f"torch {torch.__version__}, 1 thread; CPU seconds to learn from 1 024 rows {when}")
    print("| d | learner batch | replay | dictionary steps | CPU s |")
    print("|---|---|---|---|---|")
    for d in args.d:
        for s in args.settings.split(","):
            batch, replay = (int(v) for v in s.split(":"))
            secs, steps = cost(d, batch, replay, args.a, after=args.after)
            print(f"| {d} | {batch} | {replay} | {steps} | {secs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
