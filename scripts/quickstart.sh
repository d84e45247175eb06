#!/usr/bin/env bash
# Set up (once) and run cogtune end to end on the embedded default: a tiny CogVideoX-5b-shaped model and the
# synthetic demo dataset. Usage: ./scripts/quickstart.sh [OUT_DIR]   (default ./quickstart)
# COGTUNE_VARIANT picks the tiny model's variant (2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v).
source "$(dirname "$0")/_env.sh"
OUT="$(realpath -m "${1:-$ROOT/quickstart}")"
VARIANT="${COGTUNE_VARIANT:-5b}"
mkdir -p "$OUT"

[ -f "$OUT/model/model_index.json" ] || python "$ROOT/scripts/make_tiny_model.py" --variant "$VARIANT" --out "$OUT/model"
[ -f "$OUT/data/videos.txt" ] || python "$ROOT/scripts/make_demo_dataset.py" --out "$OUT/data"
python -c "
from cogtune.shared.models import open_model
m = open_model('$OUT/model')
print(f'model: {m.path} ({m.variant.name})')
"

echo "== stage 1: cogprep encode (a re-run encodes only what changed)"
cogprep encode "$OUT/data" --model "$OUT/model" --out "$OUT/store" --buckets "$ROOT/scripts/tiny_buckets.yaml" \
  --validation-prompts "$ROOT/scripts/tiny_validation_prompts.txt"
cogprep status "$OUT/data" --store "$OUT/store"

echo "== stage 2: cogtrain run (LoRA; --resume latest continues an earlier quickstart run)"
cogtrain run --store "$OUT/store" --model "$OUT/model" --out "$OUT/run" --max-steps 20 --checkpoint-every 10 \
  --validate-every 20 --resume latest

echo
echo "outputs under $OUT:"
echo "  model/  tiny $VARIANT model (diffusers layout)"
echo "  data/   demo dataset (prompts.txt + videos.txt)"
[ -d "$OUT/store" ] && echo "  store/  cached latents and embeddings (index.parquet, shards/)"
[ -d "$OUT/run" ] && echo "  run/    LoRA weights, checkpoints, validation videos, logs"
exit 0
