"""The one loop every method runs in: the walker over a stack of blocks (``walker``), what a method sees
(``context``), the loop with its timing, progress and report (``engine``), the one deploy path (``deploy``), weight
rounding by RTN, MSE clip or GPTQ (``weights``), where weights live (``placement``) and memory figures (``memory``)."""
