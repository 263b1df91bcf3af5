"""The demo: a small DeepSeek-style MLA model (``model``), its engine (``engine``), the serving demo
(``serve``: ``mlakv demo``), the HiCache L3 demo (``l3``) and its DCP cache adapter (``dcp``)."""
