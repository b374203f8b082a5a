#!/usr/bin/env bash
# The test-only reference implementations that cannot come through the `test` extra, because their declared
# dependencies would replace our torch build. Each is installed without its dependencies; the package itself
# never imports any of them. Idempotent. Run after `pip install -e .[test]`. Never run it in a user's environment.
#   torchaudio 2.11 (pure-Python mode): transformers' MusicgenMelodyFeatureExtractor, the chroma reference
#   audiocraft 1.3.0: the MusicGen LM in audiocraft's own layout
#   encodec 0.1.1: the original SEANet + RVQ modules, the reference for the audiocraft codec layout
#   torchvggish 0.2 (+ resampy, whose numba comes with librosa): the VGGish reference
#   hear21passt 0.0.26: the PaSST reference (its timm import is stubbed by the test)
#   torchmetrics 1.9.0 (+ lightning-utilities): audiocraft's KL and chroma metrics are torchmetrics Metrics
#   fadtk 1.1.0, frechet-audio-distance 0.3.4: the FAD tools our Fréchet distance is checked against
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
bash install_torchaudio_reference.sh
bash install_audiocraft_reference.sh
if ! "$PYTHON" -c "import encodec" 2>/dev/null; then
    "$PYTHON" -m pip install --no-deps "encodec==0.1.1"
fi
"$PYTHON" -c "import encodec; print('encodec reference ready')"
REFS='import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ("torchvggish", "resampy", "hear21passt", "torchmetrics", "lightning_utilities", "fadtk", "frechet_audio_distance")) else 1)'
if ! "$PYTHON" -c "$REFS" 2>/dev/null; then
    "$PYTHON" -m pip install --no-deps "torchvggish==0.2" "resampy==0.4.3" "hear21passt==0.0.26" "torchmetrics==1.9.0" \
        "lightning-utilities==0.15.3" "fadtk==1.1.0" "frechet-audio-distance==0.3.4"
fi
"$PYTHON" -c "$REFS" && echo "metric references (torchvggish, hear21passt, torchmetrics, fadtk, frechet-audio-distance) ready"
