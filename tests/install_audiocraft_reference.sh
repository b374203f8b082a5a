#!/usr/bin/env bash
# Install audiocraft as a *test-only* reference for tests/parity/test_musicgen_audiocraft.py.
#
# audiocraft 1.3.0 pins torch==2.1.0, xformers<0.0.23 (CUDA wheels), spacy, av, librosa, demucs, gradio, ...:
# a normal install would replace our torch. The LM's module code needs none of those to be built and run on
# the CPU, so audiocraft is installed without its dependencies, together with the few small pure-Python
# packages its LM modules import at module level (omegaconf, julius, num2words + docopt). The test stands
# in for the remaining module-level imports (xformers, spacy, av, librosa, flashy) with stub modules, each of
# which fails if anything in it is used (see the test). The package itself never imports audiocraft.
# Never run this in a user's environment.
#
# Idempotent: does nothing when the reference already imports. Run it after `pip install -e .[test]`:
#     bash tests/install_audiocraft_reference.sh
# PYTHON selects the interpreter (default: python).
set -euo pipefail

PYTHON="${PYTHON:-python}"
CHECK='import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ("audiocraft", "omegaconf", "julius", "num2words", "docopt")) else 1)'

if "$PYTHON" -c "$CHECK" 2>/dev/null; then
    echo "audiocraft reference already installed"
    exit 0
fi

"$PYTHON" -m pip install --no-deps "audiocraft==1.3.0" "omegaconf==2.4.0" "julius==0.2.8" "num2words==0.5.14" \
    "docopt==0.6.2"

"$PYTHON" -c "$CHECK"
echo "audiocraft reference ready"
