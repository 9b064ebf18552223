"""Per-hook statistics beside the learner: the covariance-matched Gaussian control and neuron statistics."""
