"""torch.distributed support below the collector: collectives over ranks and the data-parallel learner."""
