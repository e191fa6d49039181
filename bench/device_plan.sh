#!/usr/bin/env bash
# The pending GPU measurements (bench/PERF_NOTES.md, "What to try next"; issues #6 and #8), in
# parts that each fit one 10-minute device call. Run from the repo root on the lent machine:
#
#   bash bench/device_plan.sh kernels    # GPU tests of the scan / conv / prenorm kernels,
#                                        # stem and state-pass sweeps, ncu of the Vim scan
#                                        # and the fused MLP
#   bash bench/device_plan.sh backbone   # prenorm / stem GPU tests; VMamba-T (and a baseline
#                                        # copy in .whl/base) and ViT-S, 1280x720 and 2048^2,
#                                        # compiled, fp16
#   bash bench/device_plan.sh curve      # VMamba-T vs ViT-S at the five sizes from 720p to
#                                        # 2048^2, compiled, fp16 (issue #8's curve)
#   bash bench/device_plan.sh final      # curve + batch 4 (fp16, bf16) + bf16 batch 1 at
#                                        # 720p and 1024^2, three processes, one call
#   bash bench/device_plan.sh profiles   # kernel time by kind, compiled, 1280x720: fp16 and
#                                        # bf16 at batch 1, fp16 at batch 4
#   bash bench/device_plan.sh scannorm   # seq-walk GPU tests; VMamba-T with out_norm inside
#                                        # the scan's last walk (stage 1) off / on
#   bash bench/device_plan.sh inline     # VMamba-T with Δ projected in the walk above a
#                                        # 64 MiB Δ map vs the GEMM map, 2048^2, 1920x1088;
#                                        # the 2048^2 peak replayed with the limit
#   bash bench/device_plan.sh memsets    # which kernels the Memsets run beside (compiled
#                                        # profile, 1280x720, batch 1, bf16 and fp16)
#   bash bench/device_plan.sh family     # VMamba-S/B and Vim-T/S at the five sizes (the
#                                        # 2048^2 rows do not fit: family2048)
#   bash bench/device_plan.sh family2048 # VMamba-S/B and Vim-T/S at 2048^2, one process
#   bash bench/device_plan.sh multikernel # inductor's multi_kernel off / on: VMamba-T and
#                                        # ViT-S at batch 4, 1280x720, fp16 / bf16; VMamba-T
#                                        # at batch 1, 1280x720 and 2048^2
#   bash bench/device_plan.sh persistent  # stage 3's LayerNorms persistent on torch < 2.14
#                                        # (inductor_choices) on / off: batches 4 and 1,
#                                        # 1280x720, fp16 / bf16; 2048^2 and 1024^2 with ViT-S
#   bash bench/device_plan.sh curve30     # with the persistent LayerNorms: batch 4 at 1024^2
#                                        # (fp16 / bf16), batch 1 at 1248^2 and 1920x1088
#   bash bench/device_plan.sh tune31     # the stem's and the dwconv's launch configurations
#                                        # at batch 4 (1280x720), then at batch 1: sweeps
#   bash bench/device_plan.sh wide       # the dwconv's WIDE_TUNING tile (>= 384 channels)
#                                        # on / off: VMamba-T at batches 4 and 1, 1280x720,
#                                        # fp16 / bf16, ViT-S beside "on"
#   bash bench/device_plan.sh wide2048   # the same at 2048^2 (batch 1; the op also at 4)
#   bash bench/device_plan.sh gemms      # which cuBLAS kernels (and Memsets) the SS2D
#                                        # block's GEMMs get in fp16 / bf16, per call form
#                                        # (bench/gemm_choices.py), 1280x720, batches 1 / 4
#   bash bench/device_plan.sh padk       # the op projecting x_proj itself, its Δ GEMM's K
#                                        # padded to 64: GPU tests, then VMamba-T and ViT-S
#                                        # at 1280x720 (fp16 / bf16, batches 1 / 4), 2048^2
#   bash bench/device_plan.sh steps      # VMamba-T with the seq walks' segments 16 steps
#                                        # long: 1280x720 and 2048^2, batches 4 and 1
#   bash bench/device_plan.sh inplace    # pipeline / layers GPU tests; VMamba-T with
#                                        # inductor's inplace_buffers on / off (fresh
#                                        # caches, autotune picks logged), 720p / 2048^2,
#                                        # fp16 / bf16, batches 1 / 4
#   bash bench/device_plan.sh gaps       # stop 27's open gaps: the bf16 LayerNorm kernel's
#                                        # source in both dtypes, stage 1's MLP fused / via
#                                        # cuBLASLt at batches 1 and 4, the 2048^2 peak replayed
#   bash bench/device_plan.sh matrix     # the same two at 720p and 1024^2, fp16 and bf16,
#                                        # batches 4 and 1, compiled, one process
#   bash bench/device_plan.sh batch4     # where batch 4 at 720p goes (profile, compiled)
#   bash bench/device_plan.sh scan16     # the SS2D scan's output in 16 bits (SCAN_OUT_16BIT)
#                                        # off / on / on with two parts at every size,
#                                        # batches 1 and 4
#   bash bench/device_plan.sh parts      # low-rank scan GPU tests; VMamba-T compiled with
#                                        # the SS2D scan in two parts (one output launch)
#                                        # vs one, 720p / 1024^2 / 2048^2, two processes
#                                        # (off vs the default, SS2D_PARTS_MAX_STEPS 4096)
#   bash bench/device_plan.sh vectors    # stage 1's x_proj values in one load
#                                        # (seq_xproj_vector) off / on: the op per stage,
#                                        # then VMamba-T compiled, one process per setting
#   bash bench/device_plan.sh residual   # VMamba-T's residual stream fp32 (with ViT-S) vs
#                                        # 16-bit (RESIDUAL_16BIT, with the fp32 check),
#                                        # after the stem / fused MLP kernels' GPU tests
#   bash bench/device_plan.sh residual_vits  # the default and ViT-S in one process, 1280x720
#                                        # to 1248^2
#   bash bench/device_plan.sh vim        # Vim-T/S, the same, with and without freezing
#   bash bench/device_plan.sh dense      # det+seg dense part at 720p (768x1344), batches 1
#                                        # and 4: kernel time by module (eager) and by
#                                        # kind (compiled); batch 4 without the coarse
#                                        # UperNet fusion; the resize kernel's sweep
#   bash bench/device_plan.sh coarse     # det+seg pipeline with / without the coarse UperNet
#                                        # fusion, CUDA graphs and compiled, batches 1 and 4
#   bash bench/device_plan.sh pipeline   # det+seg Pipeline at 720p: what each sparse-part /
#                                        # head-layout change is worth (one process), the
#                                        # sparse part's profile, compiled batch 1 and 4
#   bash bench/device_plan.sh batches    # compiled det+seg at batches 1-4, static vs one
#                                        # graph for every batch above 1 (compile time, p50)
#   bash bench/device_plan.sh node       # the worker path without DDS, 4 cameras, batch
#                                        # windows 0 / 15 ms; the real node over real
#                                        # DDS, raw 720p, 4, 1 and 2 cameras, compiled
#                                        # (carry .whl: bench/device_ros_env.sh)
#
# Every step has its own time limit and a failed step does not stop the next; results and a log
# go to $OUT (default /tmp/out). JSON files name the device and command; commit the ones worth
# keeping under bench/results/.
set -uo pipefail
PART=${1:?usage: bench/device_plan.sh kernels|backbone|curve|final|profiles|scannorm|inline|memsets|family|family2048|multikernel|persistent|curve30|tune31|wide|wide2048|gemms|padk|steps|inplace|gaps|matrix|batch4|scan16|parts|vectors|residual|residual_vits|vim|dense|coarse|pipeline|batches|node}
OUT=${OUT:-/tmp/out}
TAG=${TAG:-h100}  # the card, in result file names (h100, h200)
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/mamba_perception_kernels
export PYTHONPATH=$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/plan_$PART.log
# The lent machine has no pytest: carry its wheels in .whl (pip download pytest pluggy iniconfig).
if ! python -c 'import pytest' 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --target /tmp/site .whl/pytest-*.whl \
        .whl/pluggy-*.whl .whl/iniconfig-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    local started=$SECONDS
    echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tail -n 60 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - started))s" | tee -a "$LOG"
}

backbone() {  # backbone NAME EXTRA_ARGS...: VMamba-T, 720p + 2048^2, compiled, fp16, batch 1
    local name=$1
    shift
    step 170 "backbone $name" python bench/backbone_speed.py --models vmamba_tiny \
        --sizes 720x1280 2048x2048 --modes compile --dtypes fp16 --batches 1 --budget-s 160 \
        --out "$OUT/backbone_speed_${name}_${TAG}.json" "$@"
}

case $PART in
kernels)
    step 200 "GPU tests: scan, conv and prenorm kernels" python -m pytest -q -x \
        test/kernels/test_prenorm.py test/kernels/test_scan_triton.py test/kernels/test_dwconv.py \
        test/kernels/test_stem.py
    # Is the Vim scan bound by MUFU (16 ex2 per channel-step in each pass), issue or latency?
    # (the reports' text lands in $OUT/ncu_*.txt)
    step 200 "ncu: Vim-S scan at 1280x720" bash -c "ncu --set full -k regex:_bidir_seq_kernel \
        --launch-skip 2 --launch-count 2 python bench/scan.py --profile-one bidir 1 768 45 80 \
        fp16 > $OUT/ncu_bidir_seq_${TAG}.txt 2>&1"
    # The stem op's launch configurations and the state pass's (chunked vs serial) alone.
    step 120 "stem sweep" python bench/stem.py --tune --out "$OUT/stem_${TAG}.json"
    step 200 "state pass sweep" python bench/scan.py --tune-state --out "$OUT/scan_state_tune_${TAG}.json"
    step 150 "ncu: fused MLP at stage 1" bash -c "ncu --set full -k regex:_norm_mlp_kernel \
        --launch-skip 1 --launch-count 1 python bench/prenorm.py --ops mlp --iters 2 \
        --out $OUT/prenorm_ncu_run.json > $OUT/ncu_norm_mlp_${TAG}.txt 2>&1"
    ;;
backbone)
    # The prenorm / stem kernels' GPU tests first, then the backbone against a baseline copy
    # of the code (.whl/base: git archive <commit> bench kernels mamba_perception | tar -x -C
    # .whl/base) in its own process, when present.
    step 120 "GPU tests: prenorm and stem kernels" python -m pytest -q \
        test/kernels/test_prenorm.py test/kernels/test_stem.py
    if [ -d .whl/base/kernels ]; then
        mkdir -p /tmp/ppbase && ln -sfn "$PWD/.whl/base/kernels" /tmp/ppbase/mamba_perception_kernels
        step 170 "backbone base" env PYTHONPATH="$PWD/.whl/base:/tmp/ppbase" bash -c "cd .whl/base \
            && python bench/backbone_speed.py --models vmamba_tiny --sizes 720x1280 2048x2048 \
            --modes compile --dtypes fp16 --batches 1 --budget-s 160 \
            --out $OUT/backbone_speed_base_${TAG}.json"
    fi
    backbone default
    # stage 2 (C = 192) through the fused MLP too: slower than cuBLAS + its GELU epilogue
    # before the cheaper GELU (stop 19); worth one row now
    backbone fused256 --fused-mlp-max-channels 256
    step 100 "ViT-S anchor" python bench/backbone_speed.py --models vit_small_patch16_224 \
        --sizes 720x1280 2048x2048 --modes compile --dtypes fp16 --batches 1 --budget-s 90 \
        --out "$OUT/backbone_speed_anchor_${TAG}.json"
    ;;
curve)
    # Issue #8's "faster than ViT-S at every size from 1280x720 up", on the card lent now:
    # VMamba-T and ViT-S, compiled, fp16, batch 1, at the five sizes (sizes ascending, both
    # models per size, so a cut run still compares like with like)
    step 560 "VMamba-T vs ViT-S, 1280x720 ... 2048^2, compiled" python bench/backbone_speed.py \
        --models vmamba_tiny vit_small_patch16_224 \
        --sizes 720x1280 1024x1024 1248x1248 1088x1920 2048x2048 --modes compile \
        --dtypes fp16 --batches 1 --budget-s 540 --no-check \
        --out "$OUT/backbone_speed_curve_${TAG}.json"
    ;;
final)
    # One call for the whole comparison: the fp16 curve (five sizes, batch 1), then batch 4
    # (fp16 and bf16) and bf16 batch 1 at 1280x720 and 1024^2; both models per process
    # (the curve's process also checks fp16 / bf16 against fp32 on the same weights)
    vits="vmamba_tiny vit_small_patch16_224"
    step 265 "curve, fp16, batch 1" python bench/backbone_speed.py --models $vits \
        --sizes 720x1280 1024x1024 1248x1248 1088x1920 2048x2048 --modes compile \
        --dtypes fp16 --batches 1 --budget-s 255 \
        --out "$OUT/backbone_speed_curve_${TAG}.json"
    step 175 "fp16 and bf16, batch 4" python bench/backbone_speed.py --models $vits \
        --sizes 720x1280 1024x1024 --modes compile --dtypes fp16 bf16 --batches 4 \
        --budget-s 165 --no-check --out "$OUT/backbone_speed_b4_${TAG}.json"
    step 100 "bf16, batch 1" python bench/backbone_speed.py --models $vits \
        --sizes 720x1280 1024x1024 --modes compile --dtypes bf16 --batches 1 \
        --budget-s 90 --no-check --out "$OUT/backbone_speed_bf16_${TAG}.json"
    ;;
profiles)
    # Where bf16 loses ~50 us to fp16 at batch 1 and where batch 4 goes (stop 27 default)
    for run in "fp16 1" "bf16 1" "fp16 4"; do
        set -- $run
        step 90 "profile VMamba-T $1 batch $2, 1280x720, compiled" python \
            bench/profile_backbone.py --model vmamba_tiny --size 720x1280 --dtype "$1" \
            --batch "$2" --compile --no-eager \
            --out "$OUT/profile_vmamba_tiny_720p_${1}_b${2}_${TAG}.json"
    done
    ;;
scannorm)
    # out_norm inside the last output walk (vmamba.SCAN_NORM_MAX_CHANNELS, written at stop 28,
    # off; PERF_NOTES "What to try next (as of stop 28)" a): the seq-walk GPU tests, then
    # VMamba-T off / on up to 128 channels (stage 1), one process each, batch 4 before 1
    step 90 "GPU tests: seq walks with out_norm" python -m pytest -q \
        test/kernels/test_scan_triton.py -k "lowrank_fwd_seq"
    for max_channels in 0 128; do
        step 150 "VMamba-T, out_norm in the scan up to $max_channels channels" python \
            bench/backbone_speed.py --models vmamba_tiny --sizes 720x1280 2048x2048 \
            --modes compile --dtypes fp16 --batches 4 1 --budget-s 140 --no-check \
            --scan-norm-max-channels $max_channels \
            --out "$OUT/backbone_speed_scannorm${max_channels}_${TAG}.json"
    done
    ;;
inline)
    # Memory at 2048^2 (PERF_NOTES "What to try next (as of stop 28)" c): Δ projected in the
    # walk where one image's Δ map would exceed 64 MiB (only stage 2 at 2048^2 among the five
    # sizes) vs the GEMM-built map, one process each, then the peak replayed with the limit
    for limit in 0 67108864; do
        step 110 "VMamba-T, Δ map limit $limit bytes" python bench/backbone_speed.py \
            --models vmamba_tiny --sizes 2048x2048 1088x1920 --modes compile --dtypes fp16 \
            --batches 1 --budget-s 100 --no-check \
            --lowrank-tuning "{\"seq_delta_map_max_bytes\": $limit}" \
            --out "$OUT/backbone_speed_deltamap${limit}_${TAG}.json"
    done
    step 100 "memory peak replay, 2048^2, Δ map limit 64 MiB" python bench/memory_peak.py \
        --model vmamba_tiny --size 2048x2048 --dtype fp16 \
        --lowrank-tuning '{"seq_delta_map_max_bytes": 67108864}' \
        --out "$OUT/memory_peak_vmamba_tiny_2048_deltamap64_${TAG}.json"
    ;;
memsets)
    # bf16's 12 Memsets at batch 1 (PERF_NOTES "What to try next (as of stop 28)" b): the
    # kernels launched around each one (profile_backbone's memset_neighbours), bf16 and fp16
    for dt in bf16 fp16; do
        step 100 "profile VMamba-T $dt batch 1, 1280x720, compiled" python \
            bench/profile_backbone.py --model vmamba_tiny --size 720x1280 --dtype $dt \
            --compile --no-eager --out "$OUT/profile_vmamba_tiny_720p_${dt}_b1_memsets_${TAG}.json"
    done
    ;;
family)
    # Issue #8's other models on the curve (last measured at stop 22 on an H100): VMamba-S/B
    # and Vim-T/S at the five sizes from 1280x720 up, compiled, fp16, batch 1, one process per
    # family (each ~4-5 min with a cold cache: run this part alone)
    step 290 "VMamba-S/B, five sizes" python bench/backbone_speed.py \
        --models vmamba_small vmamba_base --sizes 720x1280 1024x1024 1248x1248 1088x1920 \
        2048x2048 --modes compile --dtypes fp16 --batches 1 --budget-s 280 --no-check \
        --out "$OUT/backbone_speed_family_vmamba_${TAG}.json"
    step 290 "Vim-T/S, five sizes" python bench/backbone_speed.py \
        --models vim_tiny vim_small --sizes 720x1280 1024x1024 1248x1248 1088x1920 \
        2048x2048 --modes compile --dtypes fp16 --batches 1 --budget-s 280 --no-check \
        --out "$OUT/backbone_speed_family_vim_${TAG}.json"
    ;;
family2048)
    # The family's 2048^2 rows, which the family part's budgets left out at stop 29 (one
    # process, ~30-40 s a model with a cold cache)
    step 250 "VMamba-S/B and Vim-T/S, 2048^2" python bench/backbone_speed.py \
        --models vmamba_small vim_tiny vmamba_base vim_small --sizes 2048x2048 \
        --modes compile --dtypes fp16 --batches 1 --budget-s 240 --no-check \
        --out "$OUT/backbone_speed_family2048_${TAG}.json"
    ;;
multikernel)
    # Batch 4 at 1280x720 (PERF_NOTES "What to try next (as of stop 29)" a): stop 30's profile
    # has stage 3's LayerNorms as looped ("red") kernels at batch 4 and persistent ones at
    # batch 1 (inductor takes the inner-reduction hint from the strides only below
    # 2 * 32 * SMs rows). triton.multi_kernel=1 compiles both kinds and times them on the first
    # call: off / on, one process each, both models (ViT-S's LayerNorms have the same rows)
    for mk in 0 1; do
        step 150 "VMamba-T and ViT-S, batch 4, 1280x720, multi_kernel=$mk" python \
            bench/backbone_speed.py --models vmamba_tiny vit_small_patch16_224 \
            --sizes 720x1280 --modes compile --dtypes fp16 bf16 --batches 4 --budget-s 140 \
            --no-check --inductor-config triton.multi_kernel=$mk \
            --out "$OUT/backbone_speed_multikernel${mk}_b4_${TAG}.json"
        if [ "$mk" = 0 ]; then  # the looped LayerNorm kernels' source, for the notes
            mkdir -p "$OUT/red_kernels"
            grep -rl --include='*.py' 'def triton_red_fused.*layer_norm' \
                /tmp/torchinductor_"$(whoami)" 2>/dev/null | head -n 12 \
                | xargs -r cp -t "$OUT/red_kernels"
        fi
    done
    for mk in 0 1; do
        step 100 "VMamba-T, batch 1, 1280x720 and 2048^2, multi_kernel=$mk" python \
            bench/backbone_speed.py --models vmamba_tiny --sizes 720x1280 2048x2048 \
            --modes compile --dtypes fp16 --batches 1 --budget-s 90 --no-check \
            --inductor-config triton.multi_kernel=$mk \
            --out "$OUT/backbone_speed_multikernel${mk}_b1_${TAG}.json"
    done
    ;;
persistent)
    # Stage 3's LayerNorms kept persistent where torch 2.11 loops them (mamba_perception/
    # inductor_choices.py; the multikernel part found them): its GPU test and the pipeline's,
    # then batch 4 on / off in one process each with its own inductor cache (the choice is not
    # in the cache key), ViT-S (inductor's defaults) beside ours in the "on" processes
    step 100 "GPU tests: inductor_choices, pipeline" python -m pytest -q -m gpu \
        test/pipeline/test_inductor_choices.py test/pipeline/test_pipeline.py
    persistent_row() {  # persistent_row LIMIT SETTING NAME MODELS -- BACKBONE_SPEED_ARGS...
        local limit=$1 setting=$2 name=$3 models=$4
        shift 5
        step "$limit" "$name, persistent norms $setting" env \
            TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$setting python bench/backbone_speed.py \
            --models $models --modes compile --no-check --persistent-norms "$setting" \
            --budget-s $((limit - 10)) "$@" \
            --out "$OUT/backbone_speed_persistent_${setting}_${name}_${TAG}.json"
    }
    vits="vmamba_tiny vit_small_patch16_224"
    persistent_row 140 on b4 "$vits" -- --sizes 720x1280 --dtypes fp16 bf16 --batches 4
    persistent_row 90 off b4 vmamba_tiny -- --sizes 720x1280 --dtypes fp16 bf16 --batches 4
    persistent_row 120 on b1 "$vits" -- --sizes 720x1280 --dtypes fp16 bf16 --batches 1
    persistent_row 90 on 2048 "$vits" -- --sizes 2048x2048 --dtypes fp16 --batches 1
    ;;
curve30)
    # The rest of stop 30's comparison with the persistent LayerNorms (on by default): batch 4
    # at 1024^2 (stage 3 has 16384 rows there), fp16 / bf16; batch 1 at 1248^2 and 1920x1088
    vits="vmamba_tiny vit_small_patch16_224"
    step 120 "1024^2, batch 4, fp16 / bf16" python bench/backbone_speed.py --models $vits \
        --sizes 1024x1024 --modes compile --dtypes fp16 bf16 --batches 4 --budget-s 110 \
        --no-check --out "$OUT/backbone_speed_curve30_b4_${TAG}.json"
    step 130 "1248^2 and 1920x1088, batch 1, fp16" python bench/backbone_speed.py \
        --models $vits --sizes 1248x1248 1088x1920 --modes compile --dtypes fp16 --batches 1 \
        --budget-s 120 --no-check --out "$OUT/backbone_speed_curve30_b1_${TAG}.json"
    ;;
tune31)
    # Both were swept at batch 1 on an H100 (stem_h100.json, dwconv_h100.json); at batch 4 the
    # stem takes 92 + 89 us and the dwconv 321 us (3.5x / 2.8x batch 1, H200 profile, stop 30)
    stem_candidates='[{"block_m":128,"block_m_conv1":128,"num_warps":4,"num_stages":3},
        {"block_m":64,"num_stages":3}, {"block_m":64,"num_stages":4}, {"num_stages":4},
        {"num_stages":2}, {"block_m":128,"num_warps":8}, {"block_m":256,"num_warps":8},
        {"block_m_conv1":64}, {"block_m_conv1":256}, {"block_m_conv1":32},
        {"block_m_conv1":64,"block_m":64}]'
    for b in 4 1; do
        step 120 "stem sweep, batch $b" python bench/stem.py --tune --batch $b --sizes 720x1280 \
            --no-modules --candidates "$stem_candidates" --out "$OUT/stem_b${b}_${TAG}.json"
    done
    for b in 4 1; do
        step 150 "dwconv sweep, batch $b" python bench/dwconv.py --tune --quick --batch $b \
            --out "$OUT/dwconv_b${b}_${TAG}.json"
    done
    ;;
wide|wide2048)
    # tune31 found 2x16x128 tiles best for the 384- and 768-channel maps (-10 / -27 us a
    # forward at batch 1 / 4 by the op's sweep); the backbone with and without, one process each
    wide_row() {  # wide_row LIMIT SETTING NAME MODELS -- BACKBONE_SPEED_ARGS...
        local limit=$1 setting=$2 name=$3 models=$4
        shift 5
        local tuning='{}'
        [ "$setting" = off ] && tuning='{"wide_min_channels": 0}'
        step "$limit" "$name, dwconv wide tile $setting" python bench/backbone_speed.py \
            --models $models --modes compile --no-check --dwconv-tuning "$tuning" \
            --budget-s $((limit - 10)) "$@" \
            --out "$OUT/backbone_speed_wide_${setting}_${name}_${TAG}.json"
    }
    if [ "$PART" = wide ]; then
        vits="vmamba_tiny vit_small_patch16_224"
        wide_row 150 on b4 "$vits" -- --sizes 720x1280 --dtypes fp16 bf16 --batches 4
        wide_row 100 off b4 vmamba_tiny -- --sizes 720x1280 --dtypes fp16 bf16 --batches 4
        wide_row 130 on b1 "$vits" -- --sizes 720x1280 --dtypes fp16 bf16 --batches 1
        wide_row 80 off b1 vmamba_tiny -- --sizes 720x1280 --dtypes fp16 bf16 --batches 1
    else
        # The wide tile was chosen at 1280x720; at 2048^2 stage 3 is 128x128x384 (4.5x the
        # pixels): the op per stage with and without it, then the backbone, one process each
        for setting in on off; do
            tuning='{}'
            [ "$setting" = off ] && tuning='{"wide_min_channels": 0}'
            step 60 "dwconv ops at 2048^2, wide tile $setting" python bench/dwconv.py --quick \
                --batch 1 4 --input-hw 2048x2048 --tuning "$tuning" \
                --out "$OUT/dwconv_wide_${setting}_2048_${TAG}.json"
        done
        wide_row 110 on 2048 "vmamba_tiny vit_small_patch16_224" -- --sizes 2048x2048 \
            --dtypes fp16 --batches 1
        wide_row 70 off 2048 vmamba_tiny -- --sizes 2048x2048 --dtypes fp16 --batches 1
    fi
    ;;
gemms)
    # PERF_NOTES "Stop 30's list" a: bf16 launches a Memset before each stage-3 Δ GEMM
    step 240 "SS2D GEMMs, fp16 / bf16, call forms" python bench/gemm_choices.py \
        --size 720x1280 --batch 1 4 --out "$OUT/gemm_choices_${TAG}.json"
    ;;
padk)
    # ss2d_lowrank TUNING seq_delta_k_multiple (64; gemm_choices_h200.json: bf16's stage-3 Δ
    # GEMM loses its Memset at K = 128): GPU tests, then the backbone against this stop's
    # final part (same code without it)
    step 240 "GPU tests: low-rank scan, VMamba" python -m pytest -q \
        test/kernels/test_scan_triton.py test/models/test_vmamba.py -k "lowrank or vmamba or ss2d"
    step 200 "VMamba-T and ViT-S, 1280x720, fp16 / bf16, batches 1 / 4" python \
        bench/backbone_speed.py --models vmamba_tiny vit_small_patch16_224 --sizes 720x1280 \
        --modes compile --dtypes fp16 bf16 --batches 1 4 --budget-s 190 \
        --out "$OUT/backbone_speed_padk_720p_${TAG}.json"
    step 80 "VMamba-T, 2048^2, fp16, batch 1" python bench/backbone_speed.py \
        --models vmamba_tiny --sizes 2048x2048 --modes compile --dtypes fp16 --batches 1 \
        --budget-s 70 --no-check --out "$OUT/backbone_speed_padk_2048_${TAG}.json"
    ;;
steps)
    # Segment length of the seq walks (TUNING seq_steps, 32; shorter where there would be fewer
    # than seq_min_programs programs, so batch 1 at 1280x720 already runs 16 or fewer): 16
    # where it is 32 today (batch 4 at 1280x720, stage 1 at 2048^2; batch 1 at 1280x720 is
    # the control); today's 32 is in the final part's rows
    step 100 "VMamba-T, seq_steps 16" python bench/backbone_speed.py --models vmamba_tiny \
        --sizes 720x1280 2048x2048 --modes compile --dtypes fp16 --batches 4 1 \
        --budget-s 90 --no-check --lowrank-tuning '{"seq_steps": 16}' \
        --out "$OUT/backbone_speed_steps16_${TAG}.json"
    ;;
inplace)
    # Stop 28: the stage-1 out_norm LayerNorm, which inductor runs in place on the scan output,
    # took 8.4 us a launch in some processes and 36 in others. Inductor picks a kernel's launch
    # configuration by timing each candidate on the first call, and an in-place kernel is timed
    # with its input restored inside every timed call (~0.2 ms against 8-36 us of kernel at
    # 1280x720), so the pick is noise and the on-disk cache keeps it. With inplace_buffers off
    # (pipeline.COMPILE_OPTIONS since) such kernels write a new buffer and are timed as they
    # run. GPU tests first; then VMamba-T per setting, one process each in a fresh inductor
    # cache, inductor's picks logged. Everything is packed into one archive as well (a device
    # call returns at most a few files).
    step 120 "GPU tests: pipeline (16-bit stream and scan output), layers" python -m pytest \
        -q -m gpu test/pipeline/test_pipeline.py test/models/test_layers.py
    for inplace in true false; do
        name=inplace_$inplace
        step 230 "VMamba-T, inductor inplace_buffers=$inplace" bash -c "\
            TORCHINDUCTOR_CACHE_DIR=\$(mktemp -d) \
            TORCH_LOGS=+torch._inductor.runtime.triton_heuristics python \
            bench/backbone_speed.py --models vmamba_tiny --sizes 720x1280 2048x2048 \
            --modes compile --dtypes fp16 bf16 --batches 1 4 --budget-s 220 --no-check \
            --inductor-config inplace_buffers=$inplace \
            --out $OUT/backbone_speed_${name}_${TAG}.json 2> $OUT/inductor_${name}.log; \
            grep -A4 'Benchmark all input configs' $OUT/inductor_${name}.log \
            > $OUT/autotune_${name}.txt; rm $OUT/inductor_${name}.log"
    done
    tar czf "$OUT/inplace_${TAG}.tgz" -C "$OUT" --exclude "*.tgz" . && \
        find "$OUT" -type f ! -name "*.tgz" ! -name "plan_*.log" -delete
    ;;
gaps)
    # PERF_NOTES "What to try next (as of stop 27)" a-c. (a) the inductor LayerNorm kernel
    # that takes 36 us a launch in bf16 and 8 in fp16: its generated source in both dtypes
    for dt in fp16 bf16; do
        step 100 "inductor code, $dt" bash -c "TORCH_LOGS=output_code python \
            bench/profile_backbone.py --model vmamba_tiny --size 720x1280 --dtype $dt \
            --compile --no-eager --out $OUT/profile_gaps_$dt.json 2> $OUT/output_code_$dt.log; \
            python bench/kernel_source.py $OUT/output_code_$dt.log \
            triton_per_fused__to_copy_native_layer_norm_0 \
            triton_per_fused__to_copy_native_layer_norm_1 --out-dir $OUT/kernels_$dt; \
            gzip -f $OUT/output_code_$dt.log"
    done
    # (b) stage 1's MLP fused (default) / through cuBLASLt, batches 4 and 1, one process each
    for mlp in 128 0; do
        step 110 "VMamba-T, fused MLP up to $mlp channels" python bench/backbone_speed.py \
            --models vmamba_tiny --sizes 720x1280 --modes compile --dtypes fp16 --batches 4 1 \
            --budget-s 100 --no-check --fused-mlp-max-channels $mlp \
            --out "$OUT/backbone_speed_mlp${mlp}_${TAG}.json"
    done
    # (c) where the 2048^2 peak is now
    step 120 "memory peak replay, 2048^2" python bench/memory_peak.py --model vmamba_tiny \
        --size 2048x2048 --dtype fp16 --out "$OUT/memory_peak_vmamba_tiny_2048_${TAG}.json"
    ;;
matrix)
    # Issue #8's targets also name bf16 and batch 4 (last measured at stop 20, when VMamba-T
    # was 1.36x ViT-S at batch 4): both models, one process, batch 4 first
    step 560 "VMamba-T vs ViT-S, fp16 / bf16, batches 4 / 1, compiled" python \
        bench/backbone_speed.py --models vmamba_tiny vit_small_patch16_224 \
        --sizes 720x1280 1024x1024 --modes compile --dtypes fp16 bf16 --batches 4 1 \
        --budget-s 540 --no-check --out "$OUT/backbone_speed_matrix_${TAG}.json"
    ;;
batch4)
    # VMamba-T was 7 % behind ViT-S at batch 4, 1280x720 (stop 27, matrix): kernel time by
    # kind, compiled. (The output walks' register cap, timed here at stop 27 off / 64 and
    # removed, was this part's second half.)
    step 120 "profile vmamba_tiny, batch 4, 1280x720, compiled" python bench/profile_backbone.py \
        --model vmamba_tiny --size 720x1280 --batch 4 --compile --no-eager \
        --out "$OUT/profile_vmamba_tiny_720p_b4_${TAG}.json"
    ;;
scan16)
    # The scan's output (out_norm's input) in the weights' dtype instead of fp32: the output
    # walks' GPU tests (16-bit parts and outputs), then VMamba-T off / on (with the fp32
    # check) / on with two parts at every size, one process each, batch 1 before batch 4
    step 90 "GPU tests: low-rank seq walks" python -m pytest -q test/kernels/test_scan_triton.py \
        -k "lowrank_fwd_seq"
    step 190 "VMamba-T, fp32 scan output" python bench/backbone_speed.py --models vmamba_tiny \
        --sizes 720x1280 1024x1024 2048x2048 --modes compile --dtypes fp16 --batches 1 4 \
        --budget-s 180 --no-check --scan-out-16bit off \
        --out "$OUT/backbone_speed_scan32_${TAG}.json"
    step 200 "VMamba-T, 16-bit scan output" python bench/backbone_speed.py --models vmamba_tiny \
        --sizes 720x1280 1024x1024 2048x2048 --modes compile --dtypes fp16 --batches 1 4 \
        --budget-s 190 --check-size 720x1280 --scan-out-16bit on \
        --out "$OUT/backbone_speed_scan16_${TAG}.json"
    step 130 "VMamba-T, 16-bit scan output in two parts at every size" python \
        bench/backbone_speed.py --models vmamba_tiny --sizes 720x1280 1024x1024 --modes compile \
        --dtypes fp16 --batches 1 4 --budget-s 120 --no-check --scan-out-16bit on \
        --ss2d-parts-max-steps 1000000000 --out "$OUT/backbone_speed_scan16parts_${TAG}.json"
    ;;
parts)
    step 150 "GPU tests: low-rank scan" python -m pytest -q -x test/kernels/test_scan_triton.py \
        -k lowrank
    # 0 = off; 4096 = the default since stop 25 (16384 was slower at 2048^2)
    for steps in 0 4096; do
        step 200 "VMamba-T, SS2D parts up to $steps steps" python bench/backbone_speed.py \
            --models vmamba_tiny --sizes 720x1280 1024x1024 2048x2048 --modes compile \
            --dtypes fp16 --batches 1 --budget-s 190 --no-check --ss2d-parts-max-steps "$steps" \
            --out "$OUT/backbone_speed_parts${steps}_${TAG}.json"
    done
    ;;
vectors)
    step 150 "GPU tests: low-rank scan" python -m pytest -q -x test/kernels/test_scan_triton.py \
        -k lowrank
    step 200 "scan op: x_proj loads off / on" python bench/scan.py --tune-by-width \
        --out "$OUT/scan_vectors_${TAG}.json" --candidates '[{"seq_xproj_vector": false},
        {"seq_xproj_vector": true}]'
    for name in xprojoff default; do
        case $name in
            xprojoff) tuning='{"seq_xproj_vector": false}' ;;
            default) tuning='{}' ;;
        esac
        step 120 "VMamba-T, $name" python bench/backbone_speed.py --models vmamba_tiny \
            --sizes 720x1280 1024x1024 2048x2048 --modes compile --dtypes fp16 --batches 1 \
            --budget-s 110 --no-check --lowrank-tuning "$tuning" \
            --out "$OUT/backbone_speed_${name}_${TAG}.json"
    done
    ;;
residual)
    # the stem's and the fused MLP's out_dtype first (their GPU tests), then RESIDUAL_16BIT
    # off (with ViT-S) and on, one process each, the on row with the fp32 check at 720p
    step 150 "GPU tests: prenorm and stem kernels" python -m pytest -q \
        test/kernels/test_prenorm.py test/kernels/test_stem.py
    step 200 "VMamba-T and ViT-S, fp32 residual" python bench/backbone_speed.py \
        --models vmamba_tiny vit_small_patch16_224 --sizes 720x1280 1024x1024 2048x2048 \
        --modes compile --dtypes fp16 --batches 1 --budget-s 190 --no-check \
        --residual-16bit off --out "$OUT/backbone_speed_stream32_${TAG}.json"
    step 160 "VMamba-T, 16-bit residual stream" python bench/backbone_speed.py \
        --models vmamba_tiny --sizes 720x1280 1024x1024 2048x2048 --modes compile \
        --dtypes fp16 --batches 1 --budget-s 150 --residual-16bit on --check-size 720x1280 \
        --out "$OUT/backbone_speed_stream16_${TAG}.json"
    ;;
residual_vits)
    # the default (16-bit stream since stop 26) against ViT-S in one process, around the
    # crossover
    step 300 "VMamba-T vs ViT-S, 1280x720 ... 1248^2" python bench/backbone_speed.py \
        --models vmamba_tiny vit_small_patch16_224 --sizes 720x1280 1024x1024 1248x1248 \
        --modes compile --dtypes fp16 --batches 1 --budget-s 290 --no-check \
        --out "$OUT/backbone_speed_stream16_vits_${TAG}.json"
    ;;
vim)
    for extra in "" --inductor-freezing; do
        step 200 "Vim-T/S $extra" python bench/backbone_speed.py --models vim_tiny vim_small \
            --sizes 720x1280 2048x2048 --modes compile --dtypes fp16 --batches 1 \
            --budget-s 190 --out "$OUT/backbone_speed_vim${extra:+_freezing}_${TAG}.json" $extra
    done
    ;;
dense)
    # Where a 4-camera batch's GPU time goes (issue #6: 4 x 30 Hz needs a batch every 33 ms;
    # by FLOPs UperNet is 1.66 of the dense part's 2.06 TFLOP per frame): per module in eager
    # (hooks), per kernel kind compiled, batch 1 and 4
    for batch in 1 4; do
        step 190 "det+seg dense part, batch $batch" python bench/profile_backbone.py \
            --perception detseg --size 768x1344 --batch $batch --compile --iters 5 \
            --out "$OUT/profile_detseg_720p_b${batch}_${TAG}.json"
    done
    # UperNet's fusion conv with its coarse levels mixed at their own resolution is the
    # default since stop 23 (23.1 -> 19.0 ms per batch of four); the rows above are with it,
    # this one without, for comparison
    step 180 "det+seg dense part, batch 4, coarse UperNet fusion off" python \
        bench/profile_backbone.py --perception detseg --size 768x1344 --batch 4 --compile \
        --iters 5 --upernet-coarse-fusion off \
        --out "$OUT/profile_detseg_720p_b4_coarse_off_${TAG}.json"
    # the resize_tap_sum kernel's launch configurations on those shapes (~40 s)
    step 120 "resize_tap_sum sweep" python bench/resize.py --tune --out "$OUT/resize_tune_${TAG}.json"
    ;;
coarse)
    # The whole pipeline with and without the coarse UperNet fusion, CUDA graphs (the node's
    # default) and compiled, batches 1 and 4; one process per setting on one card
    for fusion in off on; do
        step 280 "pipeline, batches 1 and 4, coarse UperNet fusion $fusion" python \
            bench/pipeline_speed.py --tasks detseg --sizes 720p --batches 1 4 \
            --precisions fp16 --frames 100 --warmup 5 --modes cuda_graphs compile_graphs \
            --budget-s 270 --upernet-coarse-fusion $fusion \
            --out "$OUT/pipeline_coarse_${fusion}_${TAG}.json"
    done
    ;;
pipeline)
    step 150 "pipeline factors (same process)" env OUT="$OUT" python bench/pipeline_factors.py
    step 150 "pipeline, CUDA graphs, sparse-part profiles" python bench/pipeline_speed.py \
        --tasks detseg --sizes 720p --batches 1 4 --precisions fp16 --frames 200 --warmup 10 \
        --modes cuda_graphs --profile-sparse "$OUT/pipeline_profile_sparse" \
        --out "$OUT/pipeline_graphs_${TAG}.json"
    step 250 "pipeline, compiled" python bench/pipeline_speed.py --tasks detseg --sizes 720p \
        --batches 1 4 --precisions fp16 --frames 200 --warmup 10 --modes compile_graphs \
        --out "$OUT/pipeline_compile_${TAG}.json"
    ;;
batches)
    # One compiled graph for batches 2-4 (a node with 4 cameras compiles twice, not 4 times):
    # warmup_s (the compile lands in the first row of each batch size) and p50 per batch,
    # static vs dynamic batch, two processes on one card
    for dyn in "" --compile-dynamic-batch; do
        step 280 "pipeline, compiled, batches 1-4 $dyn" python bench/pipeline_speed.py \
            --tasks detseg --sizes 720p --batches 1 2 3 4 --precisions fp16 --frames 100 \
            --warmup 5 --modes compile_graphs --budget-s 270 $dyn \
            --out "$OUT/pipeline_compile_batches${dyn:+_dynamic}_${TAG}.json"
    done
    ;;
node)
    echo "=== ROS env (bench/device_ros_env.sh)" | tee -a "$LOG"
    # shellcheck disable=SC1091
    source bench/device_ros_env.sh /tmp/rosvenv >> "$LOG" 2>&1 \
        || { echo "ROS env failed: see $LOG" | tee -a "$LOG"; exit 1; }
    set +e  # the env script sets -e; a failed step must not end the part
    export MAMBA_PERCEPTION_SAMPLE_VIDEO=$PWD/.whl/vtest.avi  # no opencv-doc there
    # The worker path without DDS, 4 cameras, CUDA graphs, two stages: the batch window
    # (batch_window_ms; stop 24 on an H200: 0 / 15 ms gave 29.1 / 30.1 Hz per camera, 15 is
    # the default since; not yet timed on an H100)
    step 120 "node worker path, 4 cameras, batch window 0 / 15 ms" python \
        bench/node_latency.py --device cuda --precision fp16 --cuda-graphs --cameras 4 \
        --pipelined on --seconds 8 --skip-overhead --batch-window-ms 0 15 \
        --out "$OUT/node_latency_window_${TAG}.json"
    # 4, 1 and 2 cameras (4 first: its node compiles every batch size, the others then load
    # them from the cache), compiled, two worker stages, the default window (stop 24, H200:
    # 4 cameras 1200 of 1200 frames, 30.0 Hz, p50 / p99 58.7 / 79.9 ms; cold compile ~190 s)
    step 450 "node over DDS, raw 720p, 4 / 1 / 2 cameras, compiled" python bench/node_dds.py \
        --device cuda --precision fp16 --backbone vmamba_tiny --tasks detseg --cuda-graphs \
        --compile --cameras 4 1 2 --video "$MAMBA_PERCEPTION_SAMPLE_VIDEO" --seconds 10 \
        --pipelined on --out "$OUT/node_dds_${TAG}.json"
    ;;
*)
    echo "unknown part $PART: kernels, backbone, curve, final, profiles, scannorm, inline, family, steps, inplace, gaps, matrix, batch4," \
        "scan16, parts, vectors, residual, residual_vits, vim, dense, coarse, pipeline," \
        "batches or node" >&2
    exit 2
    ;;
esac
echo "done: $PART in ${SECONDS}s" | tee -a "$LOG"
