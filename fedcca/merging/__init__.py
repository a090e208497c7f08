"""Merging models: the merge configuration and search, the :class:`~fedcca.merging.merger.Merger`
pipeline, BatchNorm folding and re-estimation, REPAIR, the choice among candidates on held-out
data, and distillation into the merged model. Builds on :mod:`fedcca.spec`,
:mod:`fedcca.statistics` and :mod:`fedcca.methods`; never imports Flower."""
