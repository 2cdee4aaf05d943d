#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one run of about 10 minutes (the README's CUDA rows):
#     OUT=gpu-results bash benchmarks/gpu_session.sh
# The CUDA paths of every layer (and the quaternion Transformer encoder layer) against the
# float64 reference, the layer, norm and training benchmarks (Conv-6, ResNet-20, the ViT;
# eager, compiled, and compiled with CUDA graphs), a one-GPU torchrun training smoke run,
# and a training run under CUDA graphs. Each step has its own time limit and a
# failing step does not stop the others. $OUT gets session.log (every step's output, with
# its exit status) and the benchmark tables as CSV. `quatnn bench layers --linear ...
# --conv ...` maps where rank8 starts to win (quatnn.functional.RANK8_RULES has a CUDA
# linear rule from 2**34 multiply-adds a product, where it won on an H200; 2**30 lost).
# CUDA graphs (--compile-mode reduce-overhead) remove the per-kernel launch cost, which
# bounds the quaternion models on the GPU in eager mode; compiling the quaternion
# ResNet-20 took about 100 s on an H200, hence its limit. The steps run most telling first
# (the norms' Triton kernels, first compiled by Triton in cuda_check, are checked and
# timed before anything else, then what their per-call NaN read-back costs ResNet-20);
# their limits add up to 870 s, so under a 600 s limit on the whole script the last steps
# (measured before, on code they still run) are the ones cut.
# Conv-6 at batch 512 is bound by the GPU rather than the host: there rank8's halved
# multiplies (forced) can show against cuDNN.
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

step cuda_check 90 python benchmarks/cuda_check.py
step bench_norm 45 python -m quatnn bench norm --device cuda --out "$out/norm.csv"
step bench_norm_resnet20 30 python -m quatnn bench norm --device cuda --batch 128 \
    --channels 16 --size 32 --out "$out/norm_resnet20.csv"
step bench_train_resnet20 60 python -m quatnn bench train --model resnet20 \
    --batch 128 --steps 100 --device cuda --out "$out/train_resnet20.csv"
step norm_sync_cost 50 python benchmarks/norm_sync_cost.py --device cuda --steps 30
step bench_train 50 python -m quatnn bench train --model conv6 --device cuda --out "$out/train.csv"
step bench_train_vit 40 python -m quatnn bench train --model vit --steps 50 --device cuda \
    --out "$out/train_vit.csv"
step bench_train_b512 40 python -m quatnn bench train --model conv6 --batch 512 --steps 40 \
    --device cuda --out "$out/train_b512.csv"
step bench_train_b512_rank8 40 python -m quatnn bench train --model conv6 --batch 512 \
    --steps 40 --device cuda --algorithm rank8 --out "$out/train_b512_rank8.csv"
step bench_layers 40 python -m quatnn bench layers --device cuda --out "$out/layers.csv"
step torchrun 40 torchrun --nproc_per_node 1 -m quatnn train --model resnet20 \
    --dataset digits-color --epochs 1 --max-steps 30 --sync-bn --amp --channels-last \
    --device cuda --progress off --out /tmp/quatnn-gpu-run
step bench_train_compile 70 python -m quatnn bench train --model conv6 --device cuda \
    --compile --out "$out/train_compile.csv"
step bench_train_cudagraphs 60 python -m quatnn bench train --model conv6 --device cuda \
    --compile --compile-mode reduce-overhead --out "$out/train_cudagraphs.csv"
step train_cudagraphs 55 python -m quatnn train --model conv6 --dataset digits-color \
    --epochs 2 --max-steps 60 --compile --compile-mode reduce-overhead --device cuda \
    --progress off --out /tmp/quatnn-gpu-cudagraphs
step bench_train_resnet20_cudagraphs 160 python -m quatnn bench train --model resnet20 \
    --batch 128 --steps 60 --device cuda --compile --compile-mode reduce-overhead \
    --out "$out/train_resnet20_cudagraphs.csv"
