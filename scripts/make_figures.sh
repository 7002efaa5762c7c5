#!/usr/bin/env bash
# Make the figures under docs/figures/ from the trained pipelines and the sample posts.
#
#   scripts/make_figures.sh            # from the repository root, venv active
#
# Needs: the viz extra (matplotlib, scikit-learn), corpus/*.spacy (convert), a trained
# training/runs/agban-s0/model-best; uses training/runs/gban-s0 too when it exists.
# Optional: chromium, for a screenshot of the HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."

AGBAN_RUN=${AGBAN_RUN:-training/runs/agban-s0}
# the loss curves need a log with the adversarial loss column (runs from seed 1 on)
CURVES_RUN=${CURVES_RUN:-training/runs/agban-s1}
GBAN_RUN=${GBAN_RUN:-training/runs/gban-s0}
IMAGES=${IMAGES:-assets/twitter2015/images}
OUT=docs/figures
# Sample posts shown by `explain` (image ids of the shipped sample images; test split).
SAMPLE_IDS=${SAMPLE_IDS:-"149 39 102"}

agban() { python -m spacy_agban "$@"; }

mkdir -p "$OUT"

# 1. What the model looked at: one HTML report + attention heatmap per sample post.
ids=()
for id in $SAMPLE_IDS; do ids+=(--image-id "$id"); done
rm -rf "$OUT/explain"
agban explain "$AGBAN_RUN/model-best" --docs corpus/test.spacy "${ids[@]}" --limit 0 \
    --image-root "$IMAGES" --output "$OUT/explain"
if command -v chromium >/dev/null; then
    first=$(ls "$OUT"/explain/000-*.html)
    profile=$(mktemp -d)
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
        --screenshot="$OUT/explain-report.png" --window-size=1000,1300 "file://$PWD/$first" 2>/dev/null
    rm -rf "$profile"
fi

# 2. Training curves: CRF loss, adversarial loss, dev F1 (one line per run).
runs=("$CURVES_RUN")
[ -d "$GBAN_RUN" ] && runs+=("$GBAN_RUN")
agban plot-training "${runs[@]}" --output "$OUT/training.png"

# 3. The shared space: t-SNE of G_T and G_V, with and without adversarial learning.
models=("$AGBAN_RUN/model-best")
[ -d "$GBAN_RUN/model-best" ] && models+=("$GBAN_RUN/model-best")
agban plot-modalities "${models[@]}" corpus/dev.spacy --limit 500 --max-points 1000 \
    --output "$OUT/modalities.png"
