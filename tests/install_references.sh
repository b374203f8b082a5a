#!/usr/bin/env bash
# The test-only reference implementations that cannot come through the `test` extra, because their declared
# dependencies would replace our torch build. Each is installed without its dependencies; the package itself
# never imports any of them. Idempotent. Run after `pip install -e .[test]`. Never run it in a user's environment.
#   torchaudio 2.11 (pure-Python mode): transformers' MusicgenMelodyFeatureExtractor, the chroma reference
#   audiocraft 1.3.0: the MusicGen LM in audiocraft's own layout
#   encodec 0.1.1: the original SEANet + RVQ modules, the reference for the audiocraft codec layout
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
bash install_torchaudio_reference.sh
bash install_audiocraft_reference.sh
if ! "$PYTHON" -c "import encodec" 2>/dev/null; then
    "$PYTHON" -m pip install --no-deps "encodec==0.1.1"
fi
"$PYTHON" -c "import encodec; print('encodec reference ready')"
