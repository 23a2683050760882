"""hydra/sweeper=masquant. Hydra accepts plugin classes defined under ``hydra_plugins`` only; the logic
is in :mod:`masquant.sweep.sweeper`."""

from masquant.sweep.sweeper import SweeperLogic


class MasquantSweeper(SweeperLogic):
    pass
