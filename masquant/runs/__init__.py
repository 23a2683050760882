"""Results on disk: run folders named by the config hash (``hashing``), written atomically under a lock
(``store``), with the provenance of the code and environment that made them (``provenance``, ``environment``)."""
