#!/usr/bin/env bash
# QLoRA role-play fine-tuning under DeepSpeed ZeRO-2.
#
#   bash train.sh                                   # the recipe below (Baichuan2-7B-Chat, or the tiny default)
#   MODEL=/models/Baichuan2-7B-Chat NUM_GPUS=8 bash train.sh
#   MODEL=... OUTPUT_DIR=output/run2 EPOCHS=2 HOSTFILE=hostfile bash train.sh   # several machines
#
# Every variable below can be overridden from the environment. When $MODEL is absent, the run
# says so and trains the embedded tiny default instead, with settings sized for 2 CPU cores
# (any variable you set yourself still wins). Extra train.py flags: EXTRA_ARGS="--resume".
set -euo pipefail
cd "$(dirname "$0")"
ENV_SET=" $(env | cut -d= -f1 | tr '\n' ' ') "   # variables the caller set (they beat any default)

# --- the recipe --------------------------------------------------------------------------------
: "${MODEL:=Baichuan2-7B-Chat}"
: "${TRAIN_PATH:=data/train.json}"
: "${TEST_PATH:=data/test.json}"
: "${OUTPUT_DIR:=output/qlora}"
: "${TRAIN_MODE:=qlora}"
: "${BATCH_SIZE:=2}"
: "${GRAD_ACCUM:=4}"
: "${MAX_LEN:=512}"
: "${MAX_SRC_LEN:=256}"
: "${LR:=1e-4}"
: "${WEIGHT_DECAY:=0.1}"
: "${EPOCHS:=1}"
: "${WARMUP_RATIO:=0.03}"
: "${LORA_R:=16}"
: "${LORA_ALPHA:=64}"
: "${LORA_DROPOUT:=0.1}"
: "${DS_FILE:=ds_zero2_no_offload.json}"
: "${SEED:=1234}"
: "${SAVE_MODEL_STEP:=0}"
: "${NUM_GPUS:=1}"
: "${HOSTFILE:=}"
: "${MASTER_PORT:=29500}"
: "${EXTRA_ARGS:=}"

# --- the embedded tiny default, when no real weights are here -------------------------------------
TINY_MODEL=output/tiny-baichuan2-chat
TINY_SETTINGS="BATCH_SIZE=16 GRAD_ACCUM=1 LR=2e-3 EPOCHS=12 WARMUP_RATIO=0.06 WEIGHT_DECAY=0.0 LORA_DROPOUT=0.05"
if [ ! -f "$MODEL/config.json" ]; then
  echo "train.sh: $MODEL not found (no config.json); training the embedded tiny default $TINY_MODEL with CPU-sized settings"
  MODEL=$TINY_MODEL
  [ -f "$MODEL/config.json" ] || python -m baichuan.build_default --out "$MODEL"
  for kv in $TINY_SETTINGS; do
    case "$ENV_SET" in *" ${kv%%=*} "*) ;; *) eval "$kv" ;; esac
  done
fi
[ -f "$TRAIN_PATH" ] || python data_helper.py

deepspeed --num_gpus "$NUM_GPUS" ${HOSTFILE:+--hostfile "$HOSTFILE"} --master_port "$MASTER_PORT" train.py \
  --model_name_or_path "$MODEL" \
  --train_path "$TRAIN_PATH" \
  --test_path "$TEST_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --train_mode "$TRAIN_MODE" \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" \
  --max_len "$MAX_LEN" \
  --max_src_len "$MAX_SRC_LEN" \
  --learning_rate "$LR" \
  --weight_decay "$WEIGHT_DECAY" \
  --num_train_epochs "$EPOCHS" \
  --warmup_ratio "$WARMUP_RATIO" \
  --lora_dim "$LORA_R" \
  --lora_alpha "$LORA_ALPHA" \
  --lora_dropout "$LORA_DROPOUT" \
  --ds_file "$DS_FILE" \
  --seed "$SEED" \
  --save_model_step "$SAVE_MODEL_STEP" \
  --gradient_checkpointing \
  --is_skip \
  --plot_to_images \
  $EXTRA_ARGS
