"""The settings layers: defaults → config file → env → flags, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.errors import ConfigError
from edgelm.settings import get_value, iter_keys, load_settings, set_in_file, unset_in_file


def test_defaults(isolated_home: Path) -> None:
    s = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    assert s.home == isolated_home
    assert (s.service.host, s.service.port) == ("127.0.0.1", 5273)
    assert s.models_dir == isolated_home / "models"
    assert s.endpoint == "http://127.0.0.1:5273"
    assert s.compute.engine == "llamacpp"


def test_precedence_file_env_flags(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text(
        "[service]\nport = 6000\nhost = '0.0.0.0'\n[compute]\nthreads = 3\n"
    )
    env = {"EDGELM_HOME": str(isolated_home), "EDGELM_SERVICE__PORT": "7000"}
    s = load_settings(env=env)
    assert s.service.port == 7000  # env beats file
    assert s.service.host == "0.0.0.0"  # file beats default
    assert s.compute.threads == 3
    assert s.endpoint == "http://127.0.0.1:7000"  # a wildcard bind is reached on loopback
    s = load_settings({"service.port": 8000}, env=env)
    assert s.service.port == 8000  # flags beat env


def test_env_aliases(isolated_home: Path) -> None:
    env = {
        "EDGELM_HOME": str(isolated_home),
        "EDGELM_ENDPOINT": "http://10.0.0.5:5273/",
        "EDGELM_API_KEY": "k",
        "EDGELM_MODELS__SOURCES": '["hub"]',
    }
    s = load_settings(env=env)
    assert s.endpoint == "http://10.0.0.5:5273"
    assert s.service.api_key == "k"
    assert s.models.sources == ["hub"]


def test_bad_values_are_clear(isolated_home: Path) -> None:
    with pytest.raises(ConfigError, match=r"service\.port"):
        load_settings(env={"EDGELM_HOME": str(isolated_home), "EDGELM_SERVICE__PORT": "x"})
    with pytest.raises(ConfigError, match="nope"):
        load_settings(env={"EDGELM_HOME": str(isolated_home), "EDGELM_SERVICE__NOPE": "1"})
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text("[service\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(env={"EDGELM_HOME": str(isolated_home)})


def test_set_get_unset(isolated_home: Path) -> None:
    assert set_in_file(isolated_home, "service.port", "8080") == 8080
    assert "port = 8080" in (isolated_home / "config.toml").read_text()
    assert set_in_file(isolated_home, "compute.onnx.enable_gpu", "true") is True
    assert set_in_file(isolated_home, "models.sources", '["hub", "pypi"]') == ["hub", "pypi"]
    s = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    assert get_value(s, "service.port") == 8080 and s.compute.onnx.enable_gpu
    with pytest.raises(ConfigError, match="unknown settings key"):
        set_in_file(isolated_home, "service.prot", "1")
    with pytest.raises(ConfigError, match=r"service\.port"):
        set_in_file(isolated_home, "service.port", "99999")
    # a rejected value leaves the file as it was
    assert load_settings(env={"EDGELM_HOME": str(isolated_home)}).service.port == 8080
    unset_in_file(isolated_home, "service.port")
    assert load_settings(env={"EDGELM_HOME": str(isolated_home)}).service.port == 5273
    with pytest.raises(ConfigError):
        get_value(s, "service.nothing")


def test_every_key_is_described() -> None:
    keys = dict(iter_keys())
    assert "compute.onnx.enable_gpu" in keys and "service.port" in keys
    assert all(field.description for field in keys.values())
