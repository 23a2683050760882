"""Every config option composes; bad names and values fail at compose time naming the choices."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError, ConfigKeyError

from masquant.pipeline import resolve
from masquant.run import CONF_DIR

GROUPS = ["model", "modality", "quant", "method", "calib", "eval", "logger", "paths"]


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(compose_cfg, group):
    for option in _options(group):
        cfg = compose_cfg(f"{group}={option}")
        assert cfg[group] is not None


@pytest.mark.parametrize("overlay", ["debug=default", "sweep=main_table"] + [f"experiment={e}" for e in _options("experiment")])
def test_overlays_compose(compose_cfg, overlay):
    compose_cfg(overlay)


def test_every_quant_scheme_resolves(compose_cfg, tiny_overrides):
    for q in _options("quant"):
        method = "dense" if q == "fp16" else "rtn"
        spec = resolve(compose_cfg(*tiny_overrides, f"quant={q}", f"method={method}"))
        assert spec.scheme.name == q
    spec = resolve(compose_cfg(*tiny_overrides, "quant=w4a16_g128"))
    assert spec.scheme.weight_only and spec.scheme.w_group_size == 128 and not spec.scheme.w_symmetric
    spec = resolve(compose_cfg(*tiny_overrides, "quant=w4a8"))
    assert spec.scheme.w_symmetric and spec.scheme.a_granularity == "token" and spec.scheme.a_dynamic


@pytest.mark.parametrize("override,valid", [("method=gptq_magic", "rtn"), ("quant=w5a5", "w4a8"), ("model=llama9", "testbed_vl")])
def test_unknown_names_list_valid_choices(compose_cfg, override, valid):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(override)
    assert valid in str(err.value) or valid in str(err.value.__cause__)


def test_misspelt_key_and_bad_value_fail_at_compose(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("quant.w_bitz=4")
    assert "w_bitz" in str(err.value) + str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("quant.w_granularity=rows")
    assert "channel" in str(err.value) + str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("modality.modalities=[text,smell]")
    assert "audio" in str(err.value) + str(err.value.__cause__)


def test_missing_espeak_fails_before_the_model_loads(compose_cfg, tmp_path, monkeypatch):
    """testbed-omni speaks its calibration clips and audio tasks with espeak-ng, a system program: without it
    resolve() names the program, the keys that need it and the install command, and testbed-vl is unaffected."""
    from masquant.testbed import speech
    from masquant.validation import ConfigError

    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    root = f"paths.output_root={tmp_path}"
    with pytest.raises(ConfigError, match=r"espeak-ng is not installed.*model=testbed-omni.*apt-get install espeak-ng"):
        resolve(compose_cfg("model=testbed_omni", "modality=text_vision_audio", root))
    with pytest.raises(ConfigError, match=r"espeak-ng is not installed.*eval.tasks.*librispeech_test_other"):
        resolve(compose_cfg("model=tiny_qwen25omni", "modality=text_vision_audio", "eval=testbed",
                            "eval.tasks=[librispeech_test_other]", root))
    resolve(compose_cfg("model=tiny_qwen25omni", "modality=text_vision_audio", "eval=testbed",
                        "eval.tasks=[librispeech_test_other]", f"eval.data_root={tmp_path}", root))
    resolve(compose_cfg(root))  # the default (testbed-vl) needs no speech


def test_speech_version_is_recorded_only_where_speech_is_used(compose_cfg, tmp_path):
    from masquant.provenance import speech_provenance
    from masquant.testbed.speech import espeak_available
    from masquant.validation import speech_users

    root = f"paths.output_root={tmp_path}"
    assert speech_users(compose_cfg(root)) == []
    assert speech_users(compose_cfg("model=testbed_omni", "modality=text_vision_audio", root))[0].startswith("model=")
    version = speech_provenance()["provenance/version/espeak-ng"]
    assert (version[0].isdigit() and "." in version) if espeak_available() else version == "unknown"
