"""Multi-rank pieces of the cache: decode context parallelism (:mod:`mlakv.distributed.dcp`)."""
