"""Recipes: named presets of a method's settings, kept as data in ``conf/recipes/<method>-<recipe>.yaml``.

``recipe=ours`` (the default) is every method at its config's defaults; ``recipe=official`` composes the method's
official preset over the scheme and the method (``quant.*`` and ``method.*`` keys, each beside the official flag it
mirrors); a command-line override still wins over the preset. Hydra selects the file (``conf/config.yaml``:
``recipes@_global_: ${method}-${recipe}``, optional); this module checks that the file exists for a recipe other
than ``ours`` (else a method would silently run at its defaults) and gives the preset's values to the run label.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from masquant.errors import ConfigError

OURS = "ours"
RECIPES_DIR = Path(__file__).resolve().parents[2] / "conf" / "recipes"


def recipe_file(method_id: str, recipe: str) -> Path:
    return RECIPES_DIR / f"{method_id}-{recipe}.yaml"


def methods_with_recipe(recipe: str) -> list[str]:
    """The method ids that have a preset for ``recipe``."""
    return sorted(p.stem[: -len(recipe) - 1] for p in RECIPES_DIR.glob(f"*-{recipe}.yaml"))


def check_recipe(method_id: str, recipe: str) -> None:
    """A ConfigError when ``recipe`` is not ``ours`` and the method has no preset for it."""
    if recipe != OURS and not recipe_file(method_id, recipe).is_file():
        raise ConfigError(f"recipe={recipe}: method={method_id} has no {recipe} preset "
                          f"(conf/recipes/{method_id}-{recipe}.yaml); methods with one: {methods_with_recipe(recipe)}; "
                          f"or recipe={OURS}")


def recipe_values(cfg, method_id: str, recipe: str) -> dict:
    """{"quant": {key: value}, "method": {key: value}} the preset sets, its interpolations resolved against ``cfg``
    (e.g. MQuant's ``vision_rms: ${method.quantize_vision}``); {} for ``ours`` or a missing preset."""
    path = recipe_file(method_id, recipe)
    if recipe == OURS or not path.is_file():
        return {}
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    context = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, dict] = {}
    for group, values in data.items():
        out[group] = {}
        for key, raw in (values or {}).items():
            if isinstance(raw, str) and "${" in raw:  # evaluated where the run evaluated it: in the run's config
                raw = OmegaConf.merge(context, {group: {key: raw}})[group][key]
            out[group][key] = getattr(raw, "value", raw)
    return out
