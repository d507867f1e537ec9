#!/usr/bin/env bash
# QLoRA role-play fine-tuning under DeepSpeed ZeRO-2.
#
#   bash train.sh                                   # the recipe below (Baichuan2-7B-Chat, or the tiny default)
#   MODEL=/models/Baichuan2-7B-Chat NUM_GPUS=8 bash train.sh
#   MODEL=... OUTPUT_DIR=output/run2 EPOCHS=2 HOSTFILE=hostfile bash train.sh   # several machines
#   STAGES=train bash train.sh                       # only train (default: train,merge,eval)
#   ROLES=孙悟空,赵子龙 bash train.sh                 # one adapter per role, each on its own records only
#   bash train.sh --print                            # print the resolved train.py command line; run nothing
#
# Stages: train (train.py under the deepspeed launcher) -> merge (merge_params.py on the newest
# checkpoint) -> eval (predict.py scores the untuned base and the merged model on $TEST_PATH and
# prints them side by side, then the command that opens the web demo).
# With ROLES set, each role's adapter trains on that role's records alone into $ROLE_OUTPUT_ROOT/ROLE
# (default $OUTPUT_DIR-roles), nothing is merged (the adapters are served on one base, `--adapter
# ROLE=PATH`), and eval scores the base against base + the role adapters on the roles' test records.
# Every variable below can be overridden from the environment. When $MODEL is absent, the run
# says so and trains the embedded tiny default instead, with settings sized for 2 CPU cores
# (any variable you set yourself still wins). Extra train.py flags: EXTRA_ARGS="--resume".
set -euo pipefail
cd "$(dirname "$0")"
PRINT=0
case "${1:-}" in
  --print) PRINT=1 ;;
  "") ;;
  *) echo "error: train.sh takes no arguments but --print (set the recipe through variables, e.g. EPOCHS=2 bash train.sh)" >&2; exit 2 ;;
esac
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
: "${MODULES_TO_SAVE:=}"          # modules trained in full next to LoRA, e.g. lm_head
: "${MODULES_TO_SAVE_LR:=}"       # their peak learning rate (empty: LR)
: "${PLOT_TO_IMAGES:=1}"          # also write the loss plot to images/loss.png
: "${GRADIENT_CHECKPOINTING:=1}"  # recompute activations: less memory, ~35% slower steps
: "${PACKING:=1}"                 # each micro-batch's samples in one row: no padding, same training (0: padded)
: "${DS_FILE:=ds_zero2_no_offload.json}"
: "${SEED:=1234}"
: "${SAVE_MODEL_STEP:=0}"
: "${NUM_GPUS:=1}"
: "${HOSTFILE:=}"
: "${MASTER_PORT:=29500}"
: "${EXTRA_ARGS:=}"
: "${STAGES:=train,merge,eval}"
: "${ROLES:=}"                    # comma-separated roles: one adapter each (empty: one shared adapter, the default)
: "${ROLE_OUTPUT_ROOT:=}"         # where the role adapters go, one folder per role (empty: $OUTPUT_DIR-roles)
: "${EVAL_LIMIT:=0}"              # score only the first N test records (0: all)
: "${EVAL_BATCH_SIZE:=8}"         # prompts predict.py generates together when scoring (same replies at any size)
: "${OVERWRITE_OUTPUT_DIR:=0}"    # 1: replace checkpoints of an earlier run in $OUTPUT_DIR

# --- the embedded tiny default, when no real weights are here -------------------------------------
: "${TINY_MODEL:=output/tiny-baichuan2-chat}"  # where the embedded default is (built if absent or stale)
: "${BUILD_ARGS:=}"                             # extra flags for its build, e.g. "--epochs 3"
# Why these: the tiny base needs ~550 optimizer steps at a high lr to learn 16 new characters; its
# frozen head cannot produce the new names and facts, so the head (and embeddings) train in full, at a
# quarter of the LoRA lr (at the full lr they forget more of the base's general words: role replies leaked
# fact answers twice as often, 17% against 9%; at 2e-4, on 300 dev questions and two seeds, 8-11% against
# 5.3-5.7% at 5e-4, with facts 96% against 97%; at 5e-5 the facts fell to 39%); activations are small, so
# recomputing them would only cost time;
# scoring in batches of 32 takes 33 s a model against 49 s at 8, with byte-identical replies (greedy decoding).
TINY_SETTINGS="OUTPUT_DIR=output/tiny-qlora OVERWRITE_OUTPUT_DIR=1 BATCH_SIZE=16 GRAD_ACCUM=1 LR=2e-3 EPOCHS=3
  WARMUP_RATIO=0.06 WEIGHT_DECAY=0.0 LORA_DROPOUT=0.05 MODULES_TO_SAVE=embed_tokens,lm_head MODULES_TO_SAVE_LR=5e-4
  GRADIENT_CHECKPOINTING=0 EVAL_BATCH_SIZE=32"
if [ ! -f "$MODEL/config.json" ]; then
  [ "$PRINT" = 1 ] || echo "train.sh: $MODEL not found (no config.json); training the embedded tiny default $TINY_MODEL with CPU-sized settings"
  MODEL=$TINY_MODEL
  [ "$PRINT" = 1 ] || python tools/build_default.py --out "$MODEL" $BUILD_ARGS  # returns at once when up to date
  for kv in $TINY_SETTINGS; do
    case "$ENV_SET" in *" ${kv%%=*} "*) ;; *) eval "$kv" ;; esac
  done
fi

train_cmd() {  # $1: output folder, $2: one role ('' = all records: the shared adapter) -> TRAIN_CMD
  TRAIN_CMD=(deepspeed --num_gpus "$NUM_GPUS" ${HOSTFILE:+--hostfile "$HOSTFILE"} --master_port "$MASTER_PORT" train.py
    --model_name_or_path "$MODEL"
    --train_path "$TRAIN_PATH"
    --test_path "$TEST_PATH"
    --output_dir "$1"
    --train_mode "$TRAIN_MODE"
    --per_device_train_batch_size "$BATCH_SIZE"
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --max_len "$MAX_LEN"
    --max_src_len "$MAX_SRC_LEN"
    --learning_rate "$LR"
    --weight_decay "$WEIGHT_DECAY"
    --num_train_epochs "$EPOCHS"
    --warmup_ratio "$WARMUP_RATIO"
    --lora_dim "$LORA_R"
    --lora_alpha "$LORA_ALPHA"
    --lora_dropout "$LORA_DROPOUT"
    --modules_to_save "$MODULES_TO_SAVE"
    ${MODULES_TO_SAVE_LR:+--modules_to_save_lr "$MODULES_TO_SAVE_LR"}
    --ds_file "$DS_FILE"
    --seed "$SEED"
    --save_model_step "$SAVE_MODEL_STEP"
    --is_skip)
  [ -n "$2" ] && TRAIN_CMD+=(--roles "$2")
  [ "$GRADIENT_CHECKPOINTING" = 1 ] && TRAIN_CMD+=(--gradient_checkpointing)
if [ "$PACKING" = 1 ]; then TRAIN_CMD+=(--packing); else TRAIN_CMD+=(--no-packing); fi
  # the README's loss plot is the shared adapter's; a role's plot stays in its own folder
  [ "$PLOT_TO_IMAGES" = 1 ] && [ -z "$2" ] && TRAIN_CMD+=(--plot_to_images)
  [ "$OVERWRITE_OUTPUT_DIR" = 1 ] && TRAIN_CMD+=(--overwrite_output_dir)
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags, split on spaces on purpose
  TRAIN_CMD+=($EXTRA_ARGS)
}
IFS=, read -r -a ROLE_LIST <<< "$ROLES"
ROLE_OUTPUT_ROOT=${ROLE_OUTPUT_ROOT:-$OUTPUT_DIR-roles}
if [ "$PRINT" = 1 ]; then  # one line per train.py run, shell-quoted: what the train stage would run here
  if [ -z "$ROLES" ]; then train_cmd "$OUTPUT_DIR" ""; printf '%q ' "${TRAIN_CMD[@]}" | sed 's/ $//'; echo; fi
  for role in "${ROLE_LIST[@]}"; do
    train_cmd "$ROLE_OUTPUT_ROOT/$role" "$role"; printf '%q ' "${TRAIN_CMD[@]}" | sed 's/ $//'; echo
  done
  exit 0
fi

# The default data files are rebuilt every run (0.3 s, deterministic): they follow the shipped data, unless
# you built them yourself with other inputs or flags (`python data_helper.py --data_dir ...`): those are kept.
if [ "$TRAIN_PATH" = data/train.json ] && [ "$TEST_PATH" = data/test.json ]; then python data_helper.py --keep_custom; fi

has_stage() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
newest_checkpoint() {  # highest step among complete checkpoints of folder $1 (they appear only when complete)
  ls -d "$1"/epoch-*-step-* 2>/dev/null | awk -F'-step-' '{print $NF" "$0}' | sort -n | tail -1 | cut -d' ' -f2-
}
T0=$SECONDS

if [ -n "$ROLES" ]; then  # one adapter per role, each trained on that role's records only, served on one base
  ADAPTER_ARGS=(); ROLE_TEST="$ROLE_OUTPUT_ROOT/test.json"
  for role in "${ROLE_LIST[@]}"; do
    if has_stage train; then
      train_cmd "$ROLE_OUTPUT_ROOT/$role" "$role"; "${TRAIN_CMD[@]}"
      echo "train.sh: $role's adapter trained ($((SECONDS - T0))s so far)"
    fi
    CKPT=$(newest_checkpoint "$ROLE_OUTPUT_ROOT/$role")
    [ -n "$CKPT" ] || { echo "train.sh: no checkpoint of $role in $ROLE_OUTPUT_ROOT/$role; run the train stage first" >&2; exit 2; }
    ADAPTER_ARGS+=(--adapter "$role=$CKPT")
  done
  has_stage merge && echo "train.sh: ROLES: no merge (the role adapters are served on one base: --adapter ROLE=PATH)"
  if has_stage eval; then
    # the roles' own test records (train.py saved each role's share next to its checkpoints)
    for role in "${ROLE_LIST[@]}"; do cat "$ROLE_OUTPUT_ROOT/$role/role_data/test.json"; done > "$ROLE_TEST.tmp" && mv "$ROLE_TEST.tmp" "$ROLE_TEST"
    SCORE_ARGS="--batch_size $EVAL_BATCH_SIZE"; [ "$EVAL_LIMIT" != 0 ] && SCORE_ARGS+=" --limit $EVAL_LIMIT"
    echo "train.sh: scoring the untuned base $MODEL on the roles' test records ($ROLE_TEST)"
    python predict.py --model_path "$MODEL" --test_path "$ROLE_TEST" --output_path "$ROLE_OUTPUT_ROOT/preds_base.jsonl" $SCORE_ARGS
    echo "train.sh: scoring the base with one adapter per role on $ROLE_TEST"
    python predict.py --model_path "$MODEL" "${ADAPTER_ARGS[@]}" --test_path "$ROLE_TEST" \
      --output_path "$ROLE_OUTPUT_ROOT/preds_roles.jsonl" --baseline_metrics "$ROLE_OUTPUT_ROOT/preds_base.metrics.json" $SCORE_ARGS
    echo "train.sh: done in $((SECONDS - T0))s. Chat with your characters, one adapter each:"
    printf '  python predict.py --model_path %q' "$MODEL"; printf ' %q' "${ADAPTER_ARGS[@]}"; echo
  fi
  exit 0
fi

train_cmd "$OUTPUT_DIR" ""
if has_stage train; then
  "${TRAIN_CMD[@]}"
  echo "train.sh: training took $((SECONDS - T0))s"
fi

CKPT=$(newest_checkpoint "$OUTPUT_DIR")
MERGED_DIR=${MERGED_DIR:-$OUTPUT_DIR/merged}
if has_stage merge; then
  [ -n "$CKPT" ] || { echo "train.sh: no checkpoint in $OUTPUT_DIR to merge; run the train stage first" >&2; exit 2; }
  if [ "$TRAIN_MODE" = full ]; then MERGED_DIR=$CKPT; else
    python merge_params.py --model_dir "$CKPT" --save_model_dir "$MERGED_DIR" --overwrite
  fi
fi

if has_stage eval; then
  SCORE_ARGS="--batch_size $EVAL_BATCH_SIZE"; [ "$EVAL_LIMIT" != 0 ] && SCORE_ARGS+=" --limit $EVAL_LIMIT"
  echo "train.sh: scoring the untuned base $MODEL on $TEST_PATH"
  python predict.py --model_path "$MODEL" --test_path "$TEST_PATH" --output_path "$OUTPUT_DIR/preds_base.jsonl" $SCORE_ARGS
  echo "train.sh: scoring the fine-tuned model $MERGED_DIR on $TEST_PATH"
  python predict.py --model_path "$MERGED_DIR" --test_path "$TEST_PATH" --output_path "$OUTPUT_DIR/preds_finetuned.jsonl" \
    --baseline_metrics "$OUTPUT_DIR/preds_base.metrics.json" $SCORE_ARGS
  echo "train.sh: done in $((SECONDS - T0))s. Chat with your characters:"
  echo "  python web_demo.py --model_path $MERGED_DIR --desc_path data/profiles-zh_desc.json"
fi
