"""Every config option composes; bad names and values fail at compose time naming the choices."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
import yaml
from omegaconf import OmegaConf

from masquant.app.pipeline import resolve
from masquant.app.main import CONF_DIR

GROUPS = ["model", "modality", "quant", "method", "calib", "eval", "logger", "paths"]


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _plain(value):
    return getattr(value, "value", value)


def _differences(node, values: dict, where: str) -> list[str]:
    """Where the composed ``node`` does not hold what ``values`` (a YAML file's mapping) sets; interpolations and
    Hydra's defaults lists are not compared."""
    out = []
    for key, value in values.items():
        if key == "defaults" or str(key).startswith("override "):
            continue
        landed = node[key] if key in node else "(missing)"
        if isinstance(value, dict):
            out += _differences(landed, value, f"{where}.{key}") if hasattr(landed, "keys") else [f"{where}.{key}"]
        elif not (isinstance(value, str) and "${" in value):
            plain = OmegaConf.to_container(landed, enum_to_str=True) if hasattr(landed, "_get_node") else \
                getattr(landed, "value", landed)
            if plain != value:
                out.append(f"{where}.{key}: {plain!r} != {value!r}")
    return out


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "method"])
def test_every_option_composes_with_the_values_its_file_sets(compose_cfg, group):
    """Each option of a group composes into the typed schema and carries exactly the values its file sets (a key
    placed under the wrong package, shadowed by a default or dropped by the schema fails here)."""
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        cfg = compose_cfg(f"{group}={path.stem}")
        assert not _differences(cfg[group], _yaml(path), f"{group}/{path.stem}")


def test_every_registered_method_is_an_option_at_its_dataclass_defaults(compose_cfg):
    """method=<id> for every registered method composes to its config dataclass at its defaults (the one place
    defaults are written)."""
    import dataclasses

    from masquant.methods.registry import get_config_class, method_ids

    for method_id in method_ids():
        composed = OmegaConf.to_object(compose_cfg(f"method={method_id}").method)
        assert composed == get_config_class(method_id)(), method_id
        assert dataclasses.is_dataclass(composed)


OVERLAYS = ["debug=default", "sweep=main_table"] + [f"experiment={e}" for e in _options("experiment")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_set_what_their_files_say(compose_cfg, overlay):
    """An overlay (# @package _global_) composes and its keys land where its file puts them: the composed
    configuration differs from the default one at each of those keys (hydra settings aside)."""
    group, name = overlay.split("=")
    data = _yaml(Path(CONF_DIR, group, f"{name}.yaml"))
    assert set(data) - {"defaults"}, overlay
    assert not _differences(compose_cfg(overlay, return_hydra_config=True), data, overlay)


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
    from masquant.errors import ConfigError

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
    from masquant.sources.testbed import speech_provenance, speech_users
    from masquant.testbed.speech import espeak_available

    root = f"paths.output_root={tmp_path}"
    assert speech_users(compose_cfg(root)) == []
    assert speech_users(compose_cfg("model=testbed_omni", "modality=text_vision_audio", root))[0].startswith("model=")
    assert speech_provenance(compose_cfg(root)) == {}
    omni = compose_cfg("model=testbed_omni", "modality=text_vision_audio", root)
    version = speech_provenance(omni)["provenance/version/espeak-ng"]
    assert (version[0].isdigit() and "." in version) if espeak_available() else version == "unknown"


def _schema_defaults_problems(schema, values: dict, where: str) -> list[str]:
    """Keys of ``values`` that ``schema`` lacks, and values equal to the schema's default (nested dataclasses too)."""
    import dataclasses

    from omegaconf import MISSING

    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = []
    for key, value in values.items():
        if key == "defaults":
            continue
        if key not in fields:
            problems.append(f"{where}.{key}: {schema.__name__} has no field {key!r}")
            continue
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            problems += _schema_defaults_problems(type(default), value, f"{where}.{key}")
        elif default is not MISSING and _plain(default if not isinstance(default, list)
                                               else [_plain(x) for x in default]) == value:
            problems.append(f"{where}.{key}: repeats the default {value!r}")
    return problems


def test_group_files_hold_only_keys_of_their_schema_that_differ_from_its_defaults():
    """Defaults live in the dataclasses; a group file (a named preset) names a schema field and changes it, or it
    does not mention it. A method preset is conf/method/<preset>.yaml over ``<id>_schema``."""
    from masquant.app import config as schemas
    from masquant.methods.registry import get_config_class

    group_schema = {"model": schemas.ModelConfig, "modality": schemas.ModalityConfig, "quant": schemas.QuantConfig,
                    "calib": schemas.CalibConfig, "eval": schemas.EvalConfig, "logger": schemas.LoggerConfig,
                    "paths": schemas.PathsConfig}
    problems = []
    for group in GROUPS:
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            data = _yaml(path)
            (schema_name,) = [d for d in data["defaults"] if isinstance(d, str) and d.endswith("_schema")]
            schema = group_schema.get(group) or get_config_class(schema_name.removesuffix("_schema"))
            problems += _schema_defaults_problems(schema, data, f"{group}/{path.name}")
    assert not problems, "\n".join(problems)
