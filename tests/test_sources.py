"""surgeon.sources: models (HF dir, GGUF, hub cache, default) and text (files, folders, JSONL, default) in.

Everything is built here: a tiny Llama with random weights, a byte-level BPE tokenizer, and a GGUF file written
with the `gguf` package the way llama.cpp's converter writes one (q/k rows permuted, F32 tensors), so the GGUF
round trip can be checked for exact logits. The real SmolLM2 test needs scripts/install_defaults.sh
(tests/real_defaults.py: a skip outside CI, a failure in it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from surgeon.io.digest import file_sha256
from surgeon import sources
from surgeon.cli import main as cli_main
from surgeon.errors import SurgeonError

BOS, EOS = 256, 257
VOCAB = 264  # 256 bytes + 2 specials + 6 merges


# ----------------------------------------------------------------------------- tiny material


def byte_level_parts():
    """(tokens, merges) of a tiny byte-level BPE: the 256 byte symbols, <s>, </s>, and six merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("n", "d"), ("Ġa", "nd")]
    tokens = symbols + ["<s>", "</s>"] + ["".join(m) for m in merges]
    assert len(tokens) == VOCAB
    return tokens, merges


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = byte_level_parts()
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def tiny_llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
                         tie_word_embeddings=tie, max_position_embeddings=2048, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a dropped or misplaced norm weight shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows for its rotary layout; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()


def write_gguf(model, path, architecture="llama", name="tiny test llama"):
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, merges = byte_level_parts()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in ("<s>", "</s>") else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied GGUF has no output.weight
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert target, key
        array = tensor.detach().float()
        if key.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        else:
            array = array.numpy()
        writer.add_tensor(target, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty surgeon cache of the test's own."""
    root = tmp_path / "surgeon-cache"
    monkeypatch.setenv("SURGEON_CACHE", str(root))
    return root


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("surgeon: error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------- models


def test_hf_directory_is_returned_as_is(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    assert sources.resolve_model(tmp_path / "m") == tmp_path / "m"
    assert sources.resolve_model(str(tmp_path / "m")) == tmp_path / "m"


def test_directory_without_weights_or_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeonError, match="no config.json"):
        sources.resolve_model(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(SurgeonError, match="no weights"):
        sources.resolve_model(tmp_path / "cfg")
    with pytest.raises(SurgeonError, match="not found"):
        sources.resolve_model(tmp_path / "missing.gguf")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_round_trip_gives_the_same_logits(tmp_path, cache, tie):
    model = tiny_llama(tie=tie)
    gguf_file = write_gguf(model, tmp_path / "tiny.gguf")

    path = sources.resolve_model(gguf_file)
    sha = file_sha256(gguf_file)
    assert path == cache / "gguf" / sha[:16]
    assert sorted(p.name for p in cache.joinpath("gguf").iterdir()) == [sha[:16]]  # no leftover temp dirs
    record = json.loads((path / "surgeon_import.json").read_text())
    assert record["sha256"] == sha and record["gguf"]["architecture"] == "llama"

    loaded, tokenizer = sources.load_model(path)
    assert loaded.config.tie_word_embeddings is tie
    assert not hasattr(loaded.config, "quantization_config")
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)

    # the tokenizer came along and reads text the way the one the GGUF was written from does
    text = "the cat and the hat\nthen"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    assert tokenizer.bos_token_id == BOS and tokenizer.eos_token_id == EOS

    # imported once: the second resolve is a cache hit, not another import
    before = (path / "config.json").stat().st_mtime_ns
    assert sources.resolve_model(gguf_file) == path
    assert (path / "config.json").stat().st_mtime_ns == before


def test_import_gguf_command(tmp_path, cache, capsys):
    model = tiny_llama()
    gguf_file = write_gguf(model, tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    assert cli_main(["import-gguf", str(gguf_file), str(out), "--dtype", "bf16"]) == 0
    loaded, _ = sources.load_model(out, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())

    err = one_line_error(capsys, ["import-gguf", str(gguf_file), str(out)])
    assert "already exists" in err and "--force" in err
    assert cli_main(["import-gguf", str(gguf_file), str(out), "--force"]) == 0
    loaded, _ = sources.load_model(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or backup dirs left


def test_convert_takes_a_gguf_file(tmp_path, cache, capsys):
    model = tiny_llama()
    gguf_file = write_gguf(model, tmp_path / "tiny.gguf")
    out = tmp_path / "gated"
    assert cli_main(["convert", str(gguf_file), str(out), "-t", "gated-norm", "--rank", "4", "--verify"]) == 0
    assert "ok" in capsys.readouterr().out
    converted, _ = sources.load_model(out)
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(logits(converted, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_inspect_reads_a_gguf_as_every_command_does(tmp_path, cache, capsys):
    gguf_file = write_gguf(tiny_llama(tie=False), tmp_path / "tiny.gguf")
    assert cli_main(["inspect", str(gguf_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llama" and info["tied_embeddings"] is False and info["layers"] == 2
    assert info["gguf"]["architecture"] == "llama" and info["gguf"]["sha256"] == file_sha256(gguf_file)
    assert info["path"] == str(sources.resolve_model(gguf_file))  # the same cached import convert reads
    assert cli_main(["inspect", str(gguf_file)]) == 0
    out = capsys.readouterr().out
    assert "tiny test llama (llama; F32" in out and "imported as" in out


def _install_parts(root, data: bytes, n: int, prefix: str) -> list[tuple[str, str]]:
    """`data` cut into n importable packages <prefix>N/data/part0N.bin under `root`, as the Qwen wheels ship."""
    cut = -(-len(data) // n)
    parts = []
    for i in range(1, n + 1):
        folder = root / f"{prefix}{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise ImportError('never imported')\n")
        (folder / f"part0{i}.bin").write_bytes(data[(i - 1) * cut:i * cut])
        parts.append((f"{prefix}{i}", f"data/part0{i}.bin"))
    return parts


def test_a_named_model_in_parts_is_joined_checked_and_imported_once(tmp_path, cache, monkeypatch):
    from surgeon import catalog

    model = tiny_llama(tie=False)
    data = write_gguf(model, tmp_path / "tiny.gguf").read_bytes()
    site = tmp_path / "site"
    parts = _install_parts(site, data, 3, "tinyparts_p")
    monkeypatch.syspath_prepend(str(site))
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    entry = catalog.NamedModel("tiny-parts", "a tiny llama in 3 parts", "tiny.gguf", tuple(parts), sha, "reinstall")
    monkeypatch.setitem(catalog.MODELS, "tiny-parts", entry)

    path = sources.resolve_model("tiny-parts")
    assert path == cache / "gguf" / sha[:16]
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [sha[:16]]  # the joined copy is gone
    assert json.loads((path / "surgeon_import.json").read_text())["source"] == "tiny.gguf"
    loaded, _ = sources.load_model(path)
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
    for package, _ in parts:  # cached by its pinned sha256: the parts are not read again
        (site / package / "data" / f"part0{package[-1]}.bin").write_bytes(b"")
    assert sources.resolve_model("tiny-parts") == path

    # a damaged part fails on the joined file's sha256, naming the fix; a missing one names the install
    fresh = tmp_path / "fresh-cache"  # where that sha256's import is not cached yet
    monkeypatch.setenv("SURGEON_CACHE", str(fresh))
    monkeypatch.setitem(catalog.MODELS, "bad-parts", catalog.NamedModel(
        "bad-parts", "damaged", "bad.gguf", tuple(_install_parts(site, data[:-1] + b"x", 2, "badparts_p")),
        sha, "reinstall them"))
    with pytest.raises(SurgeonError, match="joined have sha256 .* reinstall them"):
        sources.resolve_model("bad-parts")
    assert list((fresh / "gguf").iterdir()) == []  # nothing half-joined left
    monkeypatch.setitem(catalog.MODELS, "gone", catalog.NamedModel(
        "gone", "missing", "g.gguf", (("no_such_part_pkg", "data/part01.bin"),), sha, "install it so"))
    with pytest.raises(SurgeonError, match=r"model 'gone' .* not installed .*install it so"):
        sources.resolve_model("gone")


def test_corrupt_gguf_is_one_line_and_writes_nothing(tmp_path, cache, capsys):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SurgeonError, match="not a readable GGUF"):
        sources.resolve_model(garbage)

    truncated = tmp_path / "truncated.gguf"
    whole = write_gguf(tiny_llama(), tmp_path / "whole.gguf").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    err = one_line_error(capsys, ["import-gguf", str(truncated), str(tmp_path / "out")])
    assert "not a readable GGUF" in err
    assert not (tmp_path / "out").exists()
    assert not cache.joinpath("gguf").exists() or not any(cache.joinpath("gguf").iterdir())


def test_unsupported_gguf_architecture_is_refused(tmp_path, cache, capsys):
    model = tiny_llama()
    odd = write_gguf(model, tmp_path / "odd.gguf", architecture="nosucharch")
    err = one_line_error(capsys, ["import-gguf", str(odd), str(tmp_path / "out")])
    assert "'nosucharch'" in err and "llama" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SurgeonError, match="nosucharch"):
        sources.resolve_model(odd)
    assert not cache.joinpath("gguf").exists() or not any(cache.joinpath("gguf").iterdir())


def test_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / ("a" * 40)
    tiny_llama().save_pretrained(snapshot)
    (hub / "models--org--tiny" / "refs").mkdir(parents=True)
    (hub / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert sources.resolve_model("org/tiny").resolve() == snapshot.resolve()
    with pytest.raises(SurgeonError, match="not in the local Hugging Face cache"):
        sources.resolve_model("org/missing")


def test_hub_id_not_cached_is_one_line_from_the_cli(tmp_path):
    """In a fresh process, as a user runs it: HF_HOME an empty folder, offline."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", SURGEON_CACHE=str(tmp_path / "sc"))
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", "scan", "someorg/somemodel", "--data", str(text),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "someorg/somemodel" in lines[0] and "hf download" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources, "_package_dir", lambda name: None)
    with pytest.raises(SurgeonError, match="install_defaults.sh"):
        sources.resolve_model("default")


def test_trust_remote_code_is_never_passed_unasked(tmp_path, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def spy(real):
        def wrapper(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(real_tok))
    gguf_file = write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    sources.load_model(sources.resolve_model(gguf_file))
    assert seen and not any(seen)


# ----------------------------------------------------------------------------- text


def test_resolve_text_forms(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert sources.resolve_text(tmp_path / "a.txt") == [tmp_path / "a.txt"]
    assert sources.resolve_text(tmp_path) == [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    with pytest.raises(SurgeonError, match="not found"):
        sources.resolve_text(tmp_path / "nope.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SurgeonError, match="no .txt or .jsonl"):
        sources.resolve_text(tmp_path / "empty_dir")


@pytest.mark.parametrize("content", [b"", b"   \n\n  \t\n"], ids=["empty", "whitespace"])
def test_empty_text_is_refused(tmp_path, capsys, content):
    (tmp_path / "e.txt").write_bytes(content)
    with pytest.raises(SurgeonError, match="is empty"):
        sources.resolve_text(tmp_path / "e.txt")
    err = one_line_error(capsys, ["scan", "default", "--data", str(tmp_path / "e.txt"), "--out",
                                  str(tmp_path / "out")])
    assert "is empty" in err and not (tmp_path / "out").exists()


def test_undecodable_text_is_refused(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(SurgeonError, match="not UTF-8"):
        sources.resolve_text(tmp_path / "latin1.txt")
    err = one_line_error(capsys, ["scan", "default", "--data", str(tmp_path / "latin1.txt")])
    assert "not UTF-8" in err and "iconv" in err

    # a bad byte past the part resolve_text checks is caught while streaming, still as one line
    late = tmp_path / "late.txt"
    late.write_bytes(b"fine text here\n" * 10000 + b"\xff\xfe broken\n")
    sources.resolve_text(late)
    with pytest.raises(SurgeonError, match="not UTF-8") as info:
        list(sources.iter_token_windows([late], tiny_tokenizer(), 16))
    assert "\n" not in str(info.value)


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(SurgeonError, match=r"bad.jsonl:2 has no string `text`"):
        list(sources.iter_documents([bad]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SurgeonError, match=r"broken.jsonl:2 is not valid JSON"):
        list(sources.iter_documents([broken]))


def test_windows_are_the_whole_text_tokenized(tmp_path, monkeypatch):
    """Streaming in small pieces gives exactly the tokens of the whole text: windows are consecutive slices of
    [doc1, EOS, doc2], each with BOS in front; max_tokens and skip_tokens are honoured."""
    tokenizer = tiny_tokenizer()
    words = ["the", "and", "hat", "then", "a", "cat", "they", "band", "\n", "\n\n", "  ", "!", ", "]
    rng = np.random.default_rng(0)
    doc1 = "".join(w + ("" if w.isspace() else " ") for w in rng.choice(words, 3000))
    doc2 = "".join(w + " " for w in rng.choice(words, 500))
    (tmp_path / "1.txt").write_text(doc1)
    (tmp_path / "2.jsonl").write_text(json.dumps({"text": doc2}) + "\n")
    monkeypatch.setattr(sources, "TEXT_CHUNK_BYTES", 97)  # many pieces, cut wherever _safe_cut allows

    paths = sources.resolve_text(tmp_path)
    full = tokenizer(doc1)["input_ids"] + [EOS] + tokenizer(doc2)["input_ids"]
    seq = 50
    batches = list(sources.iter_token_windows(paths, tokenizer, seq, batch_size=3))
    windows = torch.cat(batches)
    assert all(b.shape[1] == seq + 1 for b in batches) and all(b.shape[0] <= 3 for b in batches)
    assert (windows[:, 0] == BOS).all()
    assert windows[:, 1:].reshape(-1).tolist() == full[: len(windows) * seq]
    assert len(windows) == len(full) // seq

    limited = torch.cat(list(sources.iter_token_windows(paths, tokenizer, seq, max_tokens=230, batch_size=2,
                                                        skip_tokens=7)))
    assert limited.shape == (4, seq + 1)
    assert limited[:, 1:].reshape(-1).tolist() == full[7: 7 + 4 * seq]


def test_short_text_gives_one_short_window_and_no_text_is_an_error(tmp_path):
    tokenizer = tiny_tokenizer()
    (tmp_path / "s.txt").write_text("the cat")
    (only,) = list(sources.iter_token_windows([tmp_path / "s.txt"], tokenizer, 256))
    assert only[0].tolist() == [BOS] + tokenizer("the cat")["input_ids"]
    with pytest.raises(SurgeonError, match="no text to read"):
        list(sources.iter_token_windows([tmp_path / "s.txt"], tokenizer, 256, skip_tokens=1000))
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(SurgeonError, match="no text to read"):
        list(sources.iter_token_windows([tmp_path / "e.jsonl"], tokenizer, 8))


# ------------------------------------------------------------ the real default (required in CI, else if installed)


def test_real_smollm2_perplexity_on_shakespeare():
    """docs/experiments.md: fp32 ppl 55.9 on 8 windows of 256 tokens (+BOS) from token 1000 of the first two plays."""
    from real_defaults import require_defaults

    require_defaults()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = sources.load_model(sources.resolve_model("default"))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    paths = sources.resolve_text("default")[:2]
    nll, count = 0.0, 0
    for batch in sources.iter_token_windows(paths, tokenizer, 256, max_tokens=8 * 256, batch_size=4,
                                            skip_tokens=1000):
        with torch.no_grad():
            loss = model(batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]
        nll, count = nll + float(loss) * n, count + n
    assert count == 8 * 256
    assert math.exp(nll / count) == pytest.approx(55.9, abs=0.5)


def test_a_folder_named_default_without_text_says_it_shadows_the_default(tmp_path, monkeypatch):
    """E.g. a pipeline run directory `default` in the working directory: the error says why `default` meant it."""
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "report.md").write_text("# a run\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SurgeonError, match="a folder named `default` here stands for the embedded default text"):
        sources.resolve_text("default")
