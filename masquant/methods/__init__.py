"""The method plugin interface (``base``: the hooks and capability flags every method has), the registry that finds
methods by id (``registry``), and MASQuant (``masquant/``). The baselines are plugins of the same shape in the
top-level ``baselines`` package."""
