"""``torch.distributed`` modes above the collector, siblings of one shape (:mod:`tl_sparsity.scale.ranked`):
data-parallel (:mod:`~tl_sparsity.scale.data_parallel`, its shared learner in :mod:`~tl_sparsity.scale.shared_coder`)
and hook-parallel (:mod:`~tl_sparsity.scale.hook_parallel`); the package's ``SparsityCollector``, which chooses
between one process and data-parallel (:mod:`~tl_sparsity.scale.modes`); collectives (:mod:`~tl_sparsity.scale.ranks`).
"""
