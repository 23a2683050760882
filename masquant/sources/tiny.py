"""``model.source=tiny`` and ``calib.source=tiny``: a tiny random model of a real architecture (its adapter's
``tiny``) and hand-built rows for it; tests and debugging only (its outputs mean nothing)."""

from __future__ import annotations

from masquant.adapters.registry import adapter_class_for
from masquant.errors import ConfigError
from masquant.sources.registry import CalibrationSource, ModelSource, register_calibration_source, \
    register_model_source


@register_model_source
class TinyModel(ModelSource):
    name = "tiny"

    def adapter_class(self, mcfg) -> type:
        try:
            return adapter_class_for(str(mcfg.tiny_type))
        except KeyError as err:
            raise ConfigError(f"model.tiny_type: {err.args[0]}") from None

    def modalities(self, mcfg, adapter_cls: type) -> tuple[str, ...]:
        return ("text",) + adapter_cls.tiny_modalities()

    def load(self, mcfg, cache_dir, dtype):
        model, processor = adapter_class_for(str(mcfg.tiny_type)).tiny(seed=0)
        return model.to(dtype), processor


@register_calibration_source
class TinyRows(CalibrationSource):
    name = "tiny"

    def rows(self, ccfg, adapter_cls, n: int, held_out: int):
        from masquant.adapters.tiny import tiny_rows

        rows = tiny_rows(n + held_out, int(ccfg.seed), adapter_cls.tiny_modalities())
        return rows[:n], rows[n:], {"source": "tiny", "seed": int(ccfg.seed)}
