#!/usr/bin/env bash
# Install torchaudio as a *test-only* reference for tests/parity/test_chroma_parity.py.
#
# transformers' MusicgenMelodyFeatureExtractor (the chroma reference) needs torchaudio, and no torchaudio build
# matches our torch (2.13). torchaudio 2.11 installed without its dependencies (so pip does not replace torch)
# imports fine once its compiled libraries (torchaudio/lib/*.so) are removed: it then runs in pure-Python mode,
# and the resampler and spectrogram the feature extractor uses are plain torch code (specs/NOTES.md).
# The package itself never imports torchaudio. Never run this in a user's environment.
#
# Idempotent: does nothing when torchaudio already imports. Run it after `pip install -e .[test]`:
#     bash tests/install_torchaudio_reference.sh
# PYTHON selects the interpreter (default: python).
set -euo pipefail

PYTHON="${PYTHON:-python}"
CHECK='import torchaudio, torchaudio.functional, torchaudio.transforms'

if "$PYTHON" -c "$CHECK" 2>/dev/null; then
    echo "torchaudio already importable: $("$PYTHON" -c 'import torchaudio; print(torchaudio.__version__)')"
    exit 0
fi

"$PYTHON" -m pip install --no-deps "torchaudio==2.11.0"

# find_spec locates the package without importing it (importing is what fails while the .so files are there).
TA_DIR="$("$PYTHON" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')"
rm -f "$TA_DIR"/lib/*.so
echo "removed compiled libraries from $TA_DIR/lib (pure-Python mode)"

"$PYTHON" -c "$CHECK"
echo "torchaudio reference ready: $("$PYTHON" -c 'import torchaudio; print(torchaudio.__version__)')"
