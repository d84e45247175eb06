#!/usr/bin/env bash
# Set up (once) and run cogtune end to end on the embedded default: a tiny CogVideoX-5b-shaped model and the
# synthetic demo dataset. Usage: ./scripts/quickstart.sh [OUT_DIR]   (default ./quickstart)
# COGTUNE_VARIANT picks the tiny model's variant (2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v). COGTUNE_QUICKSTART_STEPS
# (default 20) and COGTUNE_QUICKSTART_CLIPS (default 8) shorten it: the test suite runs every variant with 2 and 2.
source "$(dirname "$0")/_env.sh"
OUT="$(realpath -m "${1:-$ROOT/quickstart}")"
VARIANT="${COGTUNE_VARIANT:-5b}"
STEPS="${COGTUNE_QUICKSTART_STEPS:-20}"
CLIPS="${COGTUNE_QUICKSTART_CLIPS:-8}"
mkdir -p "$OUT"

[ -f "$OUT/model/model_index.json" ] || python "$ROOT/scripts/make_tiny_model.py" --variant "$VARIANT" --out "$OUT/model"
[ -f "$OUT/data/validation/images.txt" ] || python "$ROOT/scripts/make_demo_dataset.py" --out "$OUT/data" --count "$CLIPS"
# What the model takes, from its own configs: an image-to-video model validates from an image per prompt, and a
# model with learned positional embeddings (5b-I2V) trains at its native size only, cogprep's default, where the
# others take the several sizes of the demo bucket file.
read -r TASK FIXED_SIZE ABOUT < <(python -c "
from cogtune.shared.models import open_model
m = open_model('$OUT/model')
print(m.variant.task, int(m.variant.fixed_size), f'{m.path} ({m.variant.name}, native size', 'x'.join(map(str, m.native_size())) + ')')
")
echo "model: $ABOUT"
ENCODE_ARGS=(--validation-prompts "$OUT/data/validation/prompts.txt")
[ "$TASK" = i2v ] && ENCODE_ARGS+=(--validation-images "$OUT/data/validation/images.txt")
[ "$FIXED_SIZE" = 1 ] || ENCODE_ARGS+=(--buckets "$ROOT/scripts/tiny_buckets.yaml")

echo "== stage 1: cogprep encode (a re-run encodes only what changed)"
cogprep encode "$OUT/data" --model "$OUT/model" --out "$OUT/store" "${ENCODE_ARGS[@]}"
cogprep status "$OUT/data" --store "$OUT/store"

echo "== stage 2: cogtrain run (LoRA; --resume latest continues an earlier quickstart run)"
cogtrain run --store "$OUT/store" --model "$OUT/model" --out "$OUT/run" --max-steps "$STEPS" \
  --checkpoint-every $(((STEPS + 1) / 2)) --validate-every "$STEPS" --resume latest

echo
echo "outputs under $OUT:"
echo "  model/  tiny $VARIANT model (diffusers layout)"
echo "  data/   demo dataset (prompts.txt + videos.txt; validation/: prompts and their first-frame images)"
[ -d "$OUT/store" ] && echo "  store/  cached latents and embeddings (index.parquet, shards/)"
[ -d "$OUT/run" ] && echo "  run/    LoRA weights, checkpoints, validation videos, logs"
exit 0
