"""The drivers, one per way of running: a single run (``single``), a study (``sweep``, with its
``objective``, its ``parent`` run and its ``summary``), an experiment file (``experiment``,
``experiment_kinds``). Each composes compute, search, tracking and the registry."""
