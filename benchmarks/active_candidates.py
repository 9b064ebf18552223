"""Scratch comparison of n_active candidates (docs/active.md, "Choosing the estimator"): true dictionary, d from
argv[1], σ from argv[2], k ∈ {2, 8, 32}, five coefficient laws, 2048 rows; prints relative errors (%) against k.

    python benchmarks/active_candidates.py 64 0      # and: 64 0.1

Columns: NL normalized loss, S1, N0; raw1 = α thresholded at λ/2 (no refit, no merge); refXm = support refit, merge
at cos 0.7, threshold X·λ/2; nzK = refit, merge, threshold K·‖r‖·√(2 ln m/d) only; nzKL = the larger of λ/2 and it.
The chosen default is nz1.5L (threshold 1, noise_k 1.5), measured in full by benchmarks/active_count.py.
"""
import sys, time, torch
from tl_sparsity.coding.synthetic import SparseLinear
from tl_sparsity.coding.pursuit import greedy_pursuit_torch
from tl_sparsity.coding.metrics import sparsity_metrics
from tl_sparsity.coding.active import active_counts
torch.manual_seed(0)
d=int(sys.argv[1]); sig=float(sys.argv[2]); n=2048
cands={"N0":None,"raw1":dict(sweeps=0,merge_cos=1.0,threshold=1.0,noise_k=0.0),"ref1m":dict(threshold=1.0,noise_k=0.0),"ref2m":dict(threshold=2.0,noise_k=0.0),"ref0.5m":dict(threshold=0.5,noise_k=0.0),"nz1":dict(threshold=0.0,noise_k=1.0),"nz1.5":dict(threshold=0.0,noise_k=1.5),"nz1L":dict(threshold=1.0,noise_k=1.0),"nz.7L":dict(threshold=1.0,noise_k=0.7),"nz1.5L":dict(threshold=1.0,noise_k=1.5)}
print("law k NL S1 " + " ".join(cands))
for law in ["uniform","exponential","half-normal","log-normal","constant"]:
  for k in [2,8,32]:
    src=SparseLinear(d,k,sigma=sig,law=law,seed=1,calibration=4096)
    x=src.sample(n)+src.shift/src.scale
    F=src.features
    lam=0.1
    for _ in range(3):
        a=greedy_pursuit_torch(x,F,lam); lam=0.1*float(a.max(1).values.mean())
    a=greedy_pursuit_torch(x,F,lam)
    m=sparsity_metrics(x,F,a,lam)
    out=[]
    for name,c in cands.items():
        v=m["nnz"] if c is None else float(active_counts(x,F,a,lam,**c).mean())
        out.append(f"{100*(v/k-1):+.0f}")
    print(law,k,f"{100*(m['normalized_loss']/k-1):+.0f} {100*(m['coef_norm']/k-1):+.0f}"," ".join(out),flush=True)
