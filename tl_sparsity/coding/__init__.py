"""Sparse coding on tensors: the greedy pursuit (torch and Triton), the online dictionary learner, its metrics,
convergence rule, state file and synthetic sources. Imports no other part of the package."""
