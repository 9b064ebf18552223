"""Validation study of ``n_active`` (docs/active.md): planted sparse-linear data with a known number k of active
features per sample, coded with the true dictionary or a learned one, read by normalized loss, S₁, N₀, n_active
and the other candidate counts below.

    python benchmarks/active_count.py --quick                       # d = 64, one law, two k, a few seconds (the test)
    python benchmarks/active_count.py --dict true                   # d ∈ {64, 256}, every k, σ, law
    python benchmarks/active_count.py --dict learned --d 256 --ks 2,4,8,16 --device cuda   # the learned grid

Data: ``SparseLinear(d, a=k, sigma, law)`` (4d features uniform on the sphere, each active with probability k/4d,
coefficient law ``law``; noise at the uniform law's signal-to-noise ratio). True dictionary: the planted features
code the *uncentred* rows (centring would add a dense mean direction); λ = 0.1 · mean max α after three rounds of
the paper's adaptive rule; the greedy pursuit. Learned: ``OnlineSparseCoder(d, seed=0, device=--device)`` (m = 8d
atoms, its own centring, λ and pursuit) fed rows in chunks of ``--chunk`` until its convergence rule says
converged or ``--tokens`` rows are spent, then codes ``--n`` fresh rows; every count below reads those codes. The
learner's rows are drawn on ``--device`` by this script's own sampler (the law of ``SparseLinear``, its features,
centring and scale, a seeded generator on that device), so that a GPU run does not wait on CPU sampling. ``--uncentred``
feeds the learner the uncentred rows (``center=False``), as the true dictionary codes them: centred planted rows
carry a dense mean direction −μ that is no planted feature.

Columns (relative errors against k): L_norm, S₁, N₀ (the paper's metrics, ``sparsity_metrics``); n_active (the
default of ``coding/active.py``, on all ``--n`` rows) and the candidates

* ``iter``  n_active with the noise level re-read from a refit on the counted atoms only (``iterated_counts``);
* ``N0nf``  noise-floor-aware N₀: α itself (no refit, no merge) counted above max(λ/2, 1.5·‖r‖·√(2 ln m/(d − s)))
  with r the pursuit's residual (``active_counts(..., sweeps=0, merge_cos=1)``);
* ``mix``   mixture fit over magnitudes: refit + merge as n_active, then a two-component Gaussian mixture fitted
  (EM) to log β over all rows' β > 0; a coefficient counts when the upper component's posterior is > ½;
* ``scale`` coefficient-scale normaliser: mean ‖α‖₁ / the 0.9 quantile of the non-zero α.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tl_sparsity.coding.active import active_counts, refit_coefficients
from tl_sparsity.coding.learner import OnlineSparseCoder
from tl_sparsity.coding.metrics import sparsity_metrics
from tl_sparsity.coding.pursuit import greedy_pursuit_torch
from tl_sparsity.coding.synthetic import COEF_LAWS, SparseLinear

ESTIMATORS = ("normalized_loss", "coef_norm", "nnz", "n_active", "iter", "N0nf", "mix", "scale")
SHORT = {"normalized_loss": "L_norm", "coef_norm": "S₁", "nnz": "N₀"}


# ---------------------------------------------------------------------------------------------------- candidates
def iterated_counts(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, lam: float, rounds: int = 2,
                    noise_k: float = 1.5) -> torch.Tensor:
    """n_active with the noise level re-read from a refit on the counted atoms only: the refit on the pursuit's
    whole support also fits the noise that support was chosen for, which leaves a residual too small; ``rounds``
    times, refit on {β_ij > cut_j}, read ‖r_j‖·√(2 ln m / (d − s_j)) from that refit, and cut the first refit's β
    again."""
    beta, noise = refit_coefficients(x, phi, alpha)
    cut = (noise_k * noise).clamp_min(lam / 2)
    for _ in range(rounds):
        _, noise = refit_coefficients(x, phi, alpha * (beta > cut.unsqueeze(1)))
        cut = (noise_k * noise).clamp_min(lam / 2)
    return (beta > cut.unsqueeze(1)).sum(1).to(x.dtype)


def mixture_counts(beta: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Per-row counts of the coefficients that a two-component Gaussian mixture on log β (pooled over rows, β > 0)
    puts in its upper component (posterior > ½). ``beta`` [n, m]."""
    live = beta > 0
    v = beta[live].double().log()
    if v.numel() < 4:
        return live.sum(1).to(beta.dtype)
    med = v.median()
    lo, hi = v[v <= med], v[v > med]
    if hi.numel() == 0:
        return live.sum(1).to(beta.dtype)
    mu = torch.stack([lo.mean(), hi.mean()])
    var = torch.stack([lo.var(unbiased=False), hi.var(unbiased=False)]).clamp_min(1e-6)
    w = torch.tensor([0.5, 0.5], dtype=v.dtype, device=v.device)
    for _ in range(iters):  # EM
        logp = w.log() - 0.5 * var.log() - 0.5 * (v.unsqueeze(1) - mu) ** 2 / var
        r = (logp - logp.logsumexp(1, keepdim=True)).exp()
        nk = r.sum(0).clamp_min(1e-9)
        w, mu = nk / nk.sum(), (r * v.unsqueeze(1)).sum(0) / nk
        var = ((r * (v.unsqueeze(1) - mu) ** 2).sum(0) / nk).clamp_min(1e-6)
    top = int(mu.argmax())
    logp = w.log() - 0.5 * var.log() - 0.5 * (v.unsqueeze(1) - mu) ** 2 / var
    upper = torch.zeros_like(beta, dtype=torch.bool)
    upper[live] = logp[:, top] > logp[:, 1 - top]
    return upper.sum(1).to(beta.dtype)


def scale_count(alpha: torch.Tensor, q: float = 0.9) -> float:
    """Coefficient-scale normaliser: mean ‖α_j‖₁ / the ``q`` quantile of the non-zero α (one number per cell)."""
    nz = alpha[alpha > 0].double()
    if nz.numel() == 0:
        return 0.0
    nz = nz[torch.randperm(nz.numel(), device=nz.device)[:1 << 24]] if nz.numel() > 1 << 24 else nz
    return float(alpha.double().sum(1).mean() / nz.quantile(q))


def all_counts(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, lam: float) -> dict[str, float]:
    """The paper's metrics (``sparsity_metrics``) and every candidate count, on the same codes."""
    m = sparsity_metrics(x, phi, alpha, lam)  # its n_active reads only the first rows: recomputed on all below
    c = active_counts(x, phi, alpha, lam).double()
    m["n_active"], m["n_active_se"] = float(c.mean()), float(c.std() / len(c) ** 0.5)
    m["iter"] = float(iterated_counts(x, phi, alpha, lam).double().mean())
    m["N0nf"] = float(active_counts(x, phi, alpha, lam, sweeps=0, merge_cos=1.0).double().mean())
    beta, _ = refit_coefficients(x, phi, alpha)
    m["mix"] = float(mixture_counts(beta).double().mean())
    m["scale"] = scale_count(alpha)
    return m


# ---------------------------------------------------------------------------------------------------- the cells
def true_dictionary_metrics(src: SparseLinear, n: int) -> dict[str, float]:
    x = src.sample(n) + src.shift / src.scale  # uncentred rows: an exact non-negative combination plus noise
    phi, lam = src.features, 0.1
    for _ in range(3):
        alpha = greedy_pursuit_torch(x, phi, lam)
        lam = 0.1 * float(alpha.max(1).values.mean())
    alpha = greedy_pursuit_torch(x, phi, lam)
    return all_counts(x, phi, alpha, lam)


class DeviceStream:
    """Rows of ``src``'s law drawn on ``device`` with a seeded generator there: x = (Σ c_i f_i + noise − shift) /
    scale, the active set and coefficients as in ``SparseLinear._draw``."""

    def __init__(self, src: SparseLinear, device: str, seed: int, uncentred: bool = False) -> None:
        self.src, self.device = src, torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.features = src.features.to(self.device)
        self.shift = src.shift.to(self.device) * (not uncentred)

    def sample(self, n: int) -> torch.Tensor:
        s, g, dev = self.src, self.gen, self.device
        shape = (n, s.n_features)
        active = torch.rand(shape, generator=g, device=dev) < s.a / s.n_features
        if s.law == "uniform":
            c = torch.rand(shape, generator=g, device=dev)
        elif s.law == "exponential":
            c = -torch.log1p(-torch.rand(shape, generator=g, device=dev))
        elif s.law == "half-normal":
            c = torch.randn(shape, generator=g, device=dev).abs()
        elif s.law == "log-normal":
            c = torch.randn(shape, generator=g, device=dev).exp()
        else:
            c = torch.ones(shape, device=dev)
        noise = torch.randn(n, s.d, generator=g, device=dev) * s.noise_var ** 0.5
        return ((c * active) @ self.features + noise - self.shift) / s.scale


def learned_metrics(src: SparseLinear, n: int, tokens: int, device: str, chunk: int,
                    uncentred: bool = False) -> dict[str, float]:
    stream = DeviceStream(src, device, seed=src.seed, uncentred=uncentred)
    coder = OnlineSparseCoder(src.d, seed=0, device=device, center=not uncentred)
    fed = 0
    while fed < tokens:
        rows = min(chunk, tokens - fed)
        coder.partial_fit(stream.sample(rows), check_finite=False)
        fed += rows
        if coder.n_steps_ >= coder.min_steps and coder.converged_:
            break
    raw = stream.sample(n)
    x = coder.normalize(raw)
    alpha = torch.cat([coder.transform(raw[i:i + 1024]) for i in range(0, n, 1024)])
    m = all_counts(x, coder.dictionary_, alpha, float(coder.lam_))
    m.update(converged=float(coder.converged_), tokens=float(fed), steps=float(coder.n_steps_))
    return m


# ---------------------------------------------------------------------------------------------------- the study
def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d = 64, half-normal law, k ∈ {2, 4}, σ = 0, 256 rows, true dictionary")
    p.add_argument("--dict", choices=("true", "learned"), default="true")
    p.add_argument("--d", default="64,256")
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--sigmas", default="0,0.1")
    p.add_argument("--laws", default=",".join(COEF_LAWS))
    p.add_argument("--n", type=int, default=2048, help="rows measured per cell")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two studies share 2 cores)")
    p.add_argument("--tokens", type=int, default=200_000, help="most rows fed to each learned dictionary")
    p.add_argument("--chunk", type=int, default=16_384, help="rows per partial_fit (convergence checked after each)")
    p.add_argument("--device", default="cpu", help="where learners, codes and counts live (cpu, cuda)")
    p.add_argument("--uncentred", action="store_true",
                   help="learned: feed the uncentred rows (as the true dictionary codes them) to a learner with "
                        "center=False")
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.ks, a.sigmas, a.laws, a.n, a.dict = "64", "2,4", "0", "half-normal", 256, "true"
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    print(f"# dictionary: {a.dict}; rows per cell {a.n}" + (
        f"; at most {a.tokens} training rows; device {a.device}" + ("; uncentred rows" if a.uncentred else "")
        if a.dict == "learned" else ""))
    cols = ["L_norm", "S₁", "N₀", "n_active ± se", "iter", "N0nf", "mix", "scale"]
    print("| d | law | σ | k | " + " | ".join(cols) + " | rows (conv) | s |")
    print("|" + "---|" * (len(cols) + 6))
    out, t0 = [], time.perf_counter()
    for d in map(int, a.d.split(",")):
        for law in a.laws.split(","):
            for sigma in map(float, a.sigmas.split(",")):
                for k in map(int, a.ks.split(",")):
                    t = time.perf_counter()
                    src = SparseLinear(d, k, sigma=sigma, law=law, seed=1, calibration=4096)
                    m = (true_dictionary_metrics(src, a.n) if a.dict == "true"
                         else learned_metrics(src, a.n, a.tokens, a.device, a.chunk, a.uncentred))
                    row = {"d": d, "law": law, "sigma": sigma, "k": k, **m}
                    out.append(row)
                    print(_line(row, time.perf_counter() - t), flush=True)
    print(_summary(out) + f"; total {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _err(v: float, k: int) -> float:
    return 100 * (v / k - 1)


def _line(r: dict, secs: float) -> str:
    k = r["k"]
    cells = [f"{r[c]:.2f} ({_err(r[c], k):+.0f} %)" for c in ESTIMATORS[:3]]
    cells.append(f"{r['n_active']:.2f} ± {r['n_active_se']:.2f} ({_err(r['n_active'], k):+.0f} %)")
    cells += [f"{r[c]:.2f} ({_err(r[c], k):+.0f} %)" for c in ESTIMATORS[4:]]
    conv = (f"{r['tokens'] / 1000:.0f}k ({'yes' if r['converged'] == 1.0 else 'NO'})" if "converged" in r else "—")
    return f"| {r['d']} | {r['law']} | {r['sigma']:g} | {k} | " + " | ".join(cells) + f" | {conv} | {secs:.1f} |"


def _summary(rows: list[dict]) -> str:
    within = {c: sum(abs(_err(r[c], r["k"])) <= 15 for r in rows if math.isfinite(r[c])) for c in ESTIMATORS}
    conv = (f"; learners converged {sum(r['converged'] == 1.0 for r in rows)}" if rows and "converged" in rows[0]
            else "")
    return (f"# within ±15 % of k, of {len(rows)} cells: "
            + ", ".join(f"{SHORT.get(c, c)} {v}" for c, v in within.items()) + conv)


if __name__ == "__main__":
    main()
