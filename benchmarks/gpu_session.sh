#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one run of under 10 minutes (the README's CUDA rows):
#     OUT=gpu-results bash benchmarks/gpu_session.sh
# The CUDA paths of every layer against the float64 reference, the layer, norm and training
# benchmarks (eager and compiled), and a one-GPU torchrun training smoke run. Each step has
# its own time limit and a failing step does not stop the others. $OUT gets session.log
# (every step's output, with its exit status) and the benchmark tables as CSV: eight files.
# layers_large.csv maps where rank8 starts to win on the GPU once the products are large
# (quatnn.functional.RANK8_RULES has a CUDA linear rule from 2**34 multiply-adds a product,
# where it won on an H200; 2**30 lost) and (32x2048) how block's products side, taken at
# small batches, does there; so does train_lenet.csv, whose linear layers take it at batch
# 60. ResNet-20 is timed eager, compiled (the whitening batch norm fused into the graph)
# and compiled with CUDA graphs (reduce-overhead: no per-kernel launch cost, which bounds
# the quaternion models on the GPU); the eager and CUDA-graph tables are in session.log
# only (eight files come back at most).
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
log=$out/session.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$log" 2>&1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit $?" | tee -a "$log"
}

step cuda_check 40 python benchmarks/cuda_check.py
step bench_layers 40 python -m quatnn bench layers --device cuda --out "$out/layers.csv"
step bench_layers_large 40 python -m quatnn bench layers --device cuda \
    --linear 4096x4096,2048x8192,4096x8192,32x2048 --conv 256x256x32 \
    --out "$out/layers_large.csv"
step bench_norm 30 python -m quatnn bench norm --device cuda --out "$out/norm.csv"
step bench_train 50 python -m quatnn bench train --model conv6 --device cuda --out "$out/train.csv"
step bench_train_lenet 20 python -m quatnn bench train --model lenet_300_100 \
    --variants real,quaternion --steps 500 --device cuda --out "$out/train_lenet.csv"
step bench_train_compile 70 python -m quatnn bench train --model conv6 --device cuda \
    --compile --out "$out/train_compile.csv"
step bench_train_resnet20 40 python -m quatnn bench train --model resnet20 \
    --batch 128 --steps 100 --device cuda
step bench_train_resnet20_compile 110 python -m quatnn bench train --model resnet20 \
    --batch 128 --steps 60 --device cuda --compile --out "$out/train_resnet20_compile.csv"
step bench_train_resnet20_cudagraphs 110 python -m quatnn bench train --model resnet20 \
    --batch 128 --steps 60 --device cuda --compile --compile-mode reduce-overhead
step torchrun 40 torchrun --nproc_per_node 1 -m quatnn train --model resnet20 \
    --dataset digits-color --epochs 1 --max-steps 30 --sync-bn --amp --channels-last \
    --device cuda --progress off --out /tmp/quatnn-gpu-run
