"""Many runs: the Hydra sweeper of ``python -m masquant -m ...`` (``sweeper``): jobs from grids, every job validated
before the first runs, failures collected, one table per sweep."""
