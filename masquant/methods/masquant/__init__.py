"""MASQuant: modality-aware smoothing (MAS) and cross-modal compensation (CMC).

``config.py`` the typed config, ``core.py`` the maths (one function per equation), ``method.py`` the
plugin, ``analysis.py`` diagnostics (SQNR per modality, channel ranges, effective rank of ΔW).
"""

from masquant.methods.masquant.config import CMCConfig, Deploy, MASQuantConfig

__all__ = ["MASQuantConfig", "CMCConfig", "Deploy", "MASQuant"]


def __getattr__(name):  # lazy: importing the config must not import the method's dependencies
    if name == "MASQuant":
        from masquant.methods.masquant.method import MASQuant

        return MASQuant
    raise AttributeError(name)
