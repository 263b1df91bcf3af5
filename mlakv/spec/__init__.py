"""mlakv.spec: what is valid and how bytes are laid out — the leaf every other package reads.

Nothing here imports another mlakv module or registers anything: ``rules`` (every validity check of
an argument, a slot, a page or an index), ``formats`` (one entry per cache format) and ``tuning``
(the launch tables of both kernel backends, each row naming the run that measured it).
"""
