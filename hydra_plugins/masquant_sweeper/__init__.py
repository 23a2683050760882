"""Hydra finds sweeper plugins only under the ``hydra_plugins`` namespace; the logic is in masquant.sweep.sweeper."""
