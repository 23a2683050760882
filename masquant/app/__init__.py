"""What runs one configuration: the Hydra entry (``main``), the typed config schemas (``config``), every check made
before a model loads (``validation``, ``pipeline.resolve``), the stages calibrate -> quantize -> evaluate -> save
(``pipeline``), the metric a run returns to a sweeper (``objective``) and the isolation of one job (``jobs``)."""
