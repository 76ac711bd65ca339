"""Config layering (defaults < file < env < flags), conversion, and errors that name their source."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bridge.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    add_config_flags,
    config_from_args,
    env_name,
    load_config,
)


@pytest.fixture
def toml(tmp_path):
    def write(text: str):
        p = tmp_path / "cb.toml"
        p.write_text(text)
        return p
    return write


def test_defaults_complete_in_code_without_any_file(tmp_path, monkeypatch):
    import bridge.config as cfg

    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", tmp_path / "missing.toml")
    c = load_config(env={})
    assert c.server.host == "127.0.0.1" and c.server.http_port == 8080 and c.server.sip_port == 5060
    assert c.server.data_dir == "./data" and c.server.api_keys == ()
    assert (c.model.name, c.model.pool_size, c.model.threads_per_context) == ("tiny.en", 0, 1)
    assert c.recognizer.endpointing_ms == 700 and c.recognizer.vad == "silero"
    assert c.limits.max_frame_bytes == 1048576 and c.limits.max_duration_s == 10800
    assert c.credits.per_minute == 220 and c.credits.usage_interval_s == 5
    assert c.logging.level == "info" and c.logging.format in ("console", "json")
    assert c == Config()


def test_shipped_toml_loads_and_equals_defaults():
    assert DEFAULT_CONFIG_PATH.is_file()
    assert load_config(env={}, config_file=str(DEFAULT_CONFIG_PATH)) == Config()


def test_shipped_toml_documents_every_setting():
    text = DEFAULT_CONFIG_PATH.read_text()
    for sec in dataclasses.fields(Config):
        assert f"[{sec.name}]" in text
        for f in dataclasses.fields(getattr(Config(), sec.name)):
            assert f"\n{f.name} = " in text, f"{sec.name}.{f.name} missing from callbridge.toml"


def test_recognizer_defaults_match_streamer():
    from bridge.recognizer.streamer import StreamerConfig
    from bridge.recognizer.vad import DEFAULT_VAD

    s, r = StreamerConfig(), Config().recognizer
    assert (r.endpointing_ms, r.partial_interval_s, r.max_utterance_s) == (
        s.endpointing_ms, s.partial_interval_s, s.max_utterance_s)
    assert r.vad == DEFAULT_VAD
    StreamerConfig(**r.streamer_kwargs()).validate()


def test_precedence_default_file_env_flag(toml):
    path = toml('[server]\nhttp_port = 9000\nsip_port = 5070\nhost = "0.0.0.0"\n'
                '[limits]\nidle_timeout_s = 30\n')
    # file only
    c = load_config(env={}, config_file=str(path))
    assert (c.server.http_port, c.server.sip_port, c.server.host) == (9000, 5070, "0.0.0.0")
    assert c.limits.idle_timeout_s == 30.0 and c.server.data_dir == "./data"  # untouched default
    # env beats file
    env = {"CALLBRIDGE_HTTP_PORT": "9100", "CALLBRIDGE_SIP_PORT": "5080",
           "CALLBRIDGE_LIMITS_IDLE_TIMEOUT_S": "45", "CALLBRIDGE_DATA_DIR": "/var/cb"}
    c = load_config(env=env, config_file=str(path))
    assert (c.server.http_port, c.server.sip_port, c.server.host) == (9100, 5080, "0.0.0.0")
    assert c.limits.idle_timeout_s == 45.0 and c.server.data_dir == "/var/cb"
    # flag beats env
    c = load_config({"http_port": "9200", "data_dir": "/srv/cb", "model": "base.en"},
                    env=env, config_file=str(path))
    assert (c.server.http_port, c.server.sip_port) == (9200, 5080)
    assert c.server.data_dir == "/srv/cb" and c.model.name == "base.en"


def test_config_file_chosen_by_flag_or_env(toml):
    path = toml("[model]\npool_size = 3\n")
    assert load_config({"config": str(path)}, env={}).model.pool_size == 3
    assert load_config(env={"CALLBRIDGE_CONFIG": str(path)}).model.pool_size == 3


def test_nested_env_names_and_conversion():
    env = {
        "CALLBRIDGE_LIMITS_IDLE_TIMEOUT_S": "12.5",
        "CALLBRIDGE_LIMITS_MAX_SESSIONS_PER_KEY": "3",
        "CALLBRIDGE_RECOGNIZER_ENDPOINTING_MS": "0",
        "CALLBRIDGE_RECOGNIZER_VAD": "WebRTC",
        "CALLBRIDGE_CREDITS_PER_MINUTE": "100",
        "CALLBRIDGE_LOGGING_FORMAT": "json",
        "CALLBRIDGE_LOGGING_LEVEL": "DEBUG",
        "CALLBRIDGE_API_KEYS": " key1-0123456789ab, key2-0123456789ab ,,key3-0123456789ab ",
        "CALLBRIDGE_MODEL": "small.en",
        "CALLBRIDGE_UNRELATED": "ignored",
    }
    c = load_config(env=env, config_file=str(DEFAULT_CONFIG_PATH))
    assert c.limits.idle_timeout_s == 12.5 and isinstance(c.limits.idle_timeout_s, float)
    assert c.limits.max_sessions_per_key == 3 and isinstance(c.limits.max_sessions_per_key, int)
    assert c.recognizer.endpointing_ms == 0 and c.recognizer.vad == "webrtc"
    assert c.credits.per_minute == 100
    assert (c.logging.format, c.logging.level) == ("json", "debug")
    assert c.server.api_keys == ("key1-0123456789ab", "key2-0123456789ab", "key3-0123456789ab")
    assert c.model.name == "small.en"
    assert env_name("limits", "idle_timeout_s") == "CALLBRIDGE_LIMITS_IDLE_TIMEOUT_S"
    assert env_name("server", "http_port") == "CALLBRIDGE_HTTP_PORT"


def test_toml_int_accepted_for_float_and_config_frozen(toml):
    c = load_config(env={}, config_file=str(toml("[recognizer]\npartial_interval_s = 1\n")))
    assert c.recognizer.partial_interval_s == 1.0 and isinstance(c.recognizer.partial_interval_s, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.server.http_port = 1  # type: ignore[misc]


def test_argparse_flags():
    p = argparse.ArgumentParser()
    add_config_flags(p)
    ns = p.parse_args(["--http-port", "8181", "--sip-port", "5099", "--host", "0.0.0.0",
                       "--data-dir", "/d", "--model", "base.en"])
    c = config_from_args(ns, env={"CALLBRIDGE_HTTP_PORT": "9999"})
    assert (c.server.http_port, c.server.sip_port, c.server.host) == (8181, 5099, "0.0.0.0")
    assert (c.server.data_dir, c.model.name) == ("/d", "base.en")
    assert config_from_args(p.parse_args([]), env={}) == load_config(env={})


def test_to_dict_masks_api_keys():
    c = load_config(env={"CALLBRIDGE_API_KEYS": "secretsecret1234,othersecret56789"})
    d = c.to_dict()
    assert d["server"]["api_keys"] == ["secr…", "othe…"]
    assert "secretsecret1234" not in repr(d) and "othersecret56789" not in repr(d)
    assert d["limits"]["idle_timeout_s"] == 60
    assert c.to_dict(mask_keys=False)["server"]["api_keys"] == ["secretsecret1234", "othersecret56789"]


# ---------------------------------------------------------------- errors name key and source

def test_unknown_key_in_file(toml):
    path = toml("[server]\nhttp_prot = 80\n")
    with pytest.raises(ConfigError, match=r"server\.http_prot") as e:
        load_config(env={}, config_file=str(path))
    assert str(path) in str(e.value)


def test_unknown_section_in_file(toml):
    path = toml("[sever]\nhost = 'x'\n")
    with pytest.raises(ConfigError, match="sever") as e:
        load_config(env={}, config_file=str(path))
    assert str(path) in str(e.value)


def test_wrong_type_in_file(toml):
    path = toml('[server]\nhttp_port = "8080"\n')
    with pytest.raises(ConfigError, match=r"server\.http_port must be an integer") as e:
        load_config(env={}, config_file=str(path))
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match=r"limits\.idle_timeout_s must be a number"):
        load_config(env={}, config_file=str(toml("[limits]\nidle_timeout_s = true\n")))
    with pytest.raises(ConfigError, match=r"server\.api_keys must be a list"):
        load_config(env={}, config_file=str(toml('[server]\napi_keys = "k"\n')))


def test_out_of_range_in_file(toml):
    with pytest.raises(ConfigError, match=r"recognizer\.endpointing_ms must be in 0\.\.20000.*cb\.toml"):
        load_config(env={}, config_file=str(toml("[recognizer]\nendpointing_ms = 20001\n")))
    with pytest.raises(ConfigError, match=r"limits\.first_audio_timeout_s must be > 0.*cb\.toml"):
        load_config(env={}, config_file=str(toml("[limits]\nfirst_audio_timeout_s = 0\n")))
    with pytest.raises(ConfigError, match=r"recognizer\.vad must be one of"):
        load_config(env={}, config_file=str(toml('[recognizer]\nvad = "magic"\n')))


def test_invalid_and_missing_file(toml, tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(env={}, config_file=str(toml("[server\n")))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={}, config_file=str(tmp_path / "nope.toml"))


def test_env_errors_name_variable():
    with pytest.raises(ConfigError, match=r"server\.http_port must be an integer.*environment variable CALLBRIDGE_HTTP_PORT"):
        load_config(env={"CALLBRIDGE_HTTP_PORT": "eighty"})
    with pytest.raises(ConfigError, match=r"server\.http_port must be in 1\.\.65535.*CALLBRIDGE_HTTP_PORT"):
        load_config(env={"CALLBRIDGE_HTTP_PORT": "0"})
    with pytest.raises(ConfigError, match=r"limits\.idle_timeout_s must be > 0.*CALLBRIDGE_LIMITS_IDLE_TIMEOUT_S"):
        load_config(env={"CALLBRIDGE_LIMITS_IDLE_TIMEOUT_S": "-1"})
    with pytest.raises(ConfigError, match=r"logging\.format must be one of.*CALLBRIDGE_LOGGING_FORMAT"):
        load_config(env={"CALLBRIDGE_LOGGING_FORMAT": "xml"})


def test_flag_errors_name_flag():
    with pytest.raises(ConfigError, match=r"server\.sip_port must be in 0\.\.65535.*flag --sip-port"):
        load_config({"sip_port": "70000"}, env={})
    with pytest.raises(ConfigError, match=r"server\.http_port must be an integer.*flag --http-port"):
        load_config({"http_port": "x"}, env={})
    with pytest.raises(ConfigError, match=r"model\.name must not be empty.*flag --model"):
        load_config({"model": ""}, env={})


def test_short_or_token_shaped_api_keys_are_a_config_error_naming_the_source_not_the_key(toml):
    with pytest.raises(ConfigError, match=r"server\.api_keys key 1 of 2: every key must be at least 16 characters "
                                          r"\(one has 2\).*environment variable CALLBRIDGE_API_KEYS") as e:
        load_config(env={"CALLBRIDGE_API_KEYS": "k1,k2"})
    assert "k1" not in str(e.value)
    with pytest.raises(ConfigError, match=r"key 2 of 2: .*at least 16.*config file"):
        load_config(env={}, config_file=str(toml('[server]\napi_keys = ["0123456789abcdef", "short-key"]\n')))
    with pytest.raises(ConfigError, match=r"must not start with 'cbt_'.*override server\.api_keys"):
        load_config({"server.api_keys": "cbt_0123456789abcdef"}, env={})
    keys = load_config(env={"CALLBRIDGE_API_KEYS": "0123456789abcdef, fedcba9876543210"}).server.api_keys
    assert keys == ("0123456789abcdef", "fedcba9876543210")


def test_serve_with_short_api_keys_prints_one_line_and_exits_2(tmp_path):
    """`CALLBRIDGE_API_KEYS=k1,k2 callbridge serve` once ended in a ValueError traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CALLBRIDGE_API_KEYS": "k1,k2", "CALLBRIDGE_SIP_ENABLED": "false"}
    r = subprocess.run([sys.executable, "-m", "bridge", "serve", "--data-dir", str(tmp_path / "data"),
                        "--http-port", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("callbridge: error: server.api_keys key 1 of 2: every key must be at least 16")
    assert "CALLBRIDGE_API_KEYS" in r.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_config_is_the_base_layer_and_does_not_import_auth():
    """bridge.config checks API keys with bridge.keyformat's rules; it must not pull in bridge.auth
    (jwt, cryptography, the database), which imports config itself (an import cycle)."""
    import subprocess
    import sys

    code = ("import sys, bridge.config\n"
            "print(sorted(m for m in ('bridge.auth', 'bridge.backoff', 'bridge.stores', 'jwt', 'cryptography')"
            " if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
