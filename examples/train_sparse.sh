#!/usr/bin/env bash
# SparseVLM distillation fine-tuning of LLaVA-1.5 through upstream's unchanged training code.
#
#   examples/train_sparse.sh [python|deepspeed] [extra flags ...]      (default: python)
#
# It is the seed's command (`llava/train/sparse_train.py ...`) adapted to the plugin: the
# entry point `sparsevlm_patch.train` imports the plugin and then runs upstream's
# `llava.train.train.train()`, so every upstream flag works as before; only the sparse and
# distillation flags (SPARSE_FLAGS below) are new. The student is pruned (visual tokens kept
# at layers 2/6/15: 66/30/17 for retain 64); a frozen, dense copy of the teacher gives the
# alignment loss (MSE of the last hidden states on the tokens the student kept), weighted
# by --align_loss_weight and added to upstream's LM loss.
#
# Settings come from the environment (defaults in brackets):
#   MODEL    student checkpoint               [liuhaotian/llava-v1.5-7b]
#   TEACHER  frozen dense teacher             [same as MODEL]
#   VISION   vision tower                     [openai/clip-vit-large-patch14-336]
#   DATA     upstream LLaVA JSON              [./data/llava_instruct_80k.json]
#   IMAGES   image folder of DATA             [./data/images]
#   OUT      output folder                    [./checkpoints/sparsevlm-7b]
#   ZERO2    DeepSpeed config (deepspeed only) [./scripts/zero2.json, from the LLaVA
#            repository; the llava-torch wheel does not ship it]
#   PYTHON   interpreter (python only)        [python]
# Extra flags after the launcher name are appended, so they override the ones below
# (e.g. `--max_steps 10 --per_device_train_batch_size 1` for a smoke run).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LAUNCHER="${1:-python}"
shift || true

MODEL="${MODEL:-liuhaotian/llava-v1.5-7b}"
TEACHER="${TEACHER:-$MODEL}"
VISION="${VISION:-openai/clip-vit-large-patch14-336}"
DATA="${DATA:-./data/llava_instruct_80k.json}"
IMAGES="${IMAGES:-./data/images}"
OUT="${OUT:-./checkpoints/sparsevlm-7b}"
ZERO2="${ZERO2:-./scripts/zero2.json}"
PYTHON="${PYTHON:-python}"

# Upstream flags, as in the seed. Changed from the seed:
#  --mm_use_im_patch_token False: LLaVA-1.5 checkpoints were trained without the patch token
#    (upstream's scripts/v1_5/finetune.sh); True would grow the vocabulary at load time.
#  --mm_projector_type mlp2x_gelu, --image_aspect_ratio pad: LLaVA-1.5's own settings;
#    without the first, upstream writes the default "linear" into the saved config of a
#    model whose projector is an MLP.
#  --lazy_preprocess True, --report_to none: as upstream's scripts, without wandb.
UPSTREAM_FLAGS=(
    --model_name_or_path "$MODEL"
    --version v1
    --data_path "$DATA"
    --image_folder "$IMAGES"
    --vision_tower "$VISION"
    --mm_projector_type mlp2x_gelu
    --freeze_backbone False
    --tune_mm_mlp_adapter False
    --mm_vision_select_layer -2
    --mm_use_im_start_end False
    --mm_use_im_patch_token False
    --image_aspect_ratio pad
    --bf16 True
    --output_dir "$OUT"
    --num_train_epochs 1
    --per_device_train_batch_size 4
    --gradient_accumulation_steps 4
    --learning_rate 2e-5
    --weight_decay 0.0
    --warmup_ratio 0.03
    --lr_scheduler_type cosine
    --gradient_checkpointing True
    --model_max_length 2048
    --lazy_preprocess True
    --report_to none
)

# The plugin's flags (environment equivalents: SPARSEVLM, SPARSEVLM_RETAIN, SPARSEVLM_LAYERS,
# SPARSEVLM_SCHEDULE, SPARSEVLM_RECYCLE). --retain_tokens takes the presets 192/128/96/64
# or any number; --keep_schedule 66,30,17 gives explicit counts instead (not both).
# --align_loss_weight 0 trains without a teacher (none is loaded).
SPARSE_FLAGS=(
    --sparse True
    --retain_tokens 64
    --pruning_layers 2,6,15
    --token_recycling True
    --teacher_model_name_or_path "$TEACHER"
    --align_loss_weight 1.0
)

case "$LAUNCHER" in
    python)
        # One process. Fine for small models, LoRA (--lora_enable True) or projector-only
        # runs; full fine-tuning of a 7B student next to its 7B teacher needs ZeRO (below).
        exec "$PYTHON" -m sparsevlm_patch.train "${UPSTREAM_FLAGS[@]}" "${SPARSE_FLAGS[@]}" "$@"
        ;;
    deepspeed)
        # All local GPUs, ZeRO-2 (add e.g. `--num_gpus 8` / `--include localhost:0,1` before
        # the script path to choose). The launcher runs a file, so train.py is given by its
        # path in this checkout.
        exec deepspeed "$ROOT/sparsevlm_patch/train.py" "${UPSTREAM_FLAGS[@]}" "${SPARSE_FLAGS[@]}" \
            --deepspeed "$ZERO2" "$@"
        ;;
    *)
        echo "usage: $0 [python|deepspeed] [extra flags ...]" >&2
        exit 2
        ;;
esac
