"""Everything that touches a TransformerLens model: hook resolution, model loaders, the collector and its
checkpoints, parameter activation."""
