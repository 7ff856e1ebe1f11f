#!/usr/bin/env bash
# Embed a folder, then ask the two questions people ask next: what is similar to this image,
# and which files are near-duplicates. Run from a clone: bash examples/search_session.sh [MODEL]
set -euo pipefail
MODEL=${1:-small}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)

dinoreg embed "$here/images" --out "$work/feats.h5" --model "$MODEL" --tokens cls --quiet
# the five nearest rows of a query image (embedded with the file's own model and recipe)
dinoreg search "$work/feats.h5" "$here/images/chelsea.jpg" -k 5
# the same for a row already in the file, as JSON
dinoreg search "$work/feats.h5" --row 0 -k 3 --json
# near-duplicate groups: group, path, similarity to the group's first member
dinoreg dedup "$work/feats.h5" --threshold 0.95
echo "features in $work/feats.h5" >&2
