#!/usr/bin/env bash
# Every GPU check and benchmark in ONE call on a lent GPU machine (bench/README.md, "On a GPU machine").
# Each step has its own time limit and writes its log and JSON under $OUT (default bench/gpu/results),
# so a step that fails or runs out of time costs only itself. Without our virtualenv (a bare machine
# with CUDA torch): wheels in .whl/ are installed to /tmp/site and the repo's sources go on PYTHONPATH.
#   bash bench/gpu/gpu_session.sh                 # on the GPU machine, from the repo root
#   DEVICE=cpu QUICK=1 bash bench/gpu/gpu_session.sh   # the same plumbing on CPU, small (a dry run)
#   DRY=1 bash bench/gpu/gpu_session.sh           # print each step's command and limit, run nothing
set -u
OUTDIR=${OUT:-bench/gpu/results}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
if [ "${PLAN:-all}" = frontends-probe ] && [ "${DEVICE#cuda}" = "$DEVICE" ]; then
  echo "PLAN=frontends-probe measures a GPU host (DEVICE=cuda); on CPU use python -m bench.frontends"; exit 2
fi
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WHEELS=${WHEELS:-.whl}  # WHEELS=none: use the Python environment as it is
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
src="libs/serving/src:libs/protos/src:libs/client/src:services/classification/src:services/segmentation/src:gateway/src"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$src
[ -d .gpudata ] && export CXR_SHARED_DIR=$PWD/.gpudata

LOG=$OUTDIR/session.log  # every step's whole output, one file (the device tool brings back 8 files at most)
: > "$LOG"
DEADLINE=$(( $(date +%s) + ${SESSION_S:-3600} ))  # SESSION_S: the whole call's budget; steps stop 10 s short
# a bare machine's Python has no build of the C preprocessing (cxr_serving._pixels): build it in place (within
# SESSION_S), or say that the pure-Python fallback serves, since the serving path's CPU depends on it
if [ -z "${DRY:-}" ] && ! $PY -c 'import cxr_serving._pixels' 2>/dev/null; then
  PYABS=$($PY -c 'import sys; print(sys.executable)')  # the build runs in libs/serving: PY may be relative
  (cd libs/serving && timeout 120 "$PYABS" setup.py -q build_ext --inplace) >> "$LOG" 2>&1
  if $PY -c 'import cxr_serving._pixels' 2>/dev/null; then echo "built cxr_serving._pixels for $($PY -V)"
  else echo "cxr_serving._pixels could not be built (session.log): the fallback decode and preprocessing serve"; fi
fi
step() {  # step NAME LIMIT_S CMD...: runs CMD with a time limit; prints the end of its output
  local name=$1 limit=$2 start rc part left
  shift 2
  left=$(( DEADLINE - $(date +%s) - 10 ))
  if [ "$left" -lt 15 ]; then echo "== $name skipped: the session's time is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ -n "${DRY:-}" ]; then printf 'DRY %s %s:' "$name" "$limit"; printf ' %q' "$@"; echo; return; fi
  part=$(mktemp)
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$part" 2>&1
  rc=$?
  echo "   rc=$rc after $(( $(date +%s) - start ))s"
  grep -v -e '^{"' -e '^ratios: ' "$part" | tail -n "${TAIL:-14}"
  { echo "== $name rc=$rc"; cat "$part"; } >> "$LOG"
  rm -f "$part"
}

if [ "$DEVICE" = cuda ] && [ -z "${DRY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  $PY -c 'import torch, timm, grpc, google.protobuf as pb; print("torch", torch.__version__, "timm", timm.__version__, "grpc", grpc.__version__, "protobuf", pb.__version__)'
  # the stack runs the platform's default, cuDNN's heuristics: autotuning every batch size the GPU
  # warm-up runs took 30-90 s per peer (densenet121, batch 32); gpu_paths measures both
  # c=8 and 32 only, cells up to 2 000 requests or 5 s: the c=1 numbers come from the paired
  # interleaved calls the stack always makes; short cells (session 17: 192 requests) could not show
  # the ceiling
  STACK=(--device cuda --max-batch-size 32 --num-workers 8 --torch-threads 4 --seg-input-size 512
         --concurrency 8,32 --requests 2000 --seconds 5 --rounds 2 --cudnn-benchmark off)
  # service_eager: our service without CUDA graphs, side by side
  CLS_PEERS=(--peers service,service_eager,litserve)
  SEG_PEERS=(--peers service,service_eager,litserve)
  PATHS=(--device cuda --seconds 1.0 --variants amp_cl,amp_cl_graphs)
  TESTS=(tests/gpu)
else
  STACK=(--quick --requests 24 --seconds 2 --rounds 1 --concurrency 1,4)
  CLS_PEERS=() SEG_PEERS=()
  PATHS=(--device cpu --quick --seconds 1.5 --variants eager,default)
  TESTS=()
fi
# what one core of this host does per image (decode, resize, memory, the interpreter) and whether the C kernels
# serve: the serving path's CPU per image differed 2-3x between this host and the CI host (bench/host_fingerprint.py)
step host_fingerprint 15 $PY -m bench.host_fingerprint --turns 20 --out "$OUTDIR/host_fingerprint.json"
if [ "${PLAN:-all}" = frontends-probe ]; then
  # issue 23's bound on a GPU host: which thread of the model executor runs out first. The cheap model's scale-out
  # at N = 1 and 8 with each cell's busiest executor threads; then DenseNet-121 at c=64 (default frontends, cores/2)
  # in cells long enough for py-spy to sample the executor's threads (bench/gpu/pyspy_executor.py, in the
  # background: it starts once the executor is loaded)
  step probe_scaling 70 $PY -m bench.frontends --device cuda --frontend-counts 1,8 --frontend-concurrency 128 \
    --frontend-requests 20000 --rounds 2 --seconds 5 --out "$OUTDIR/frontends-probe.json"
  DENSENET=(--device cuda --max-batch-size 64 --num-workers 4 --torch-threads 4 --concurrency 64 --channels 32
       --requests 60000 --seconds 20 --rounds 1 --cudnn-benchmark off --serving-path-requests 0 --frontend-requests 0
       --tasks classification --peers service)
  # py-spy within the DenseNet step's limit; it starts once the executor's loop thread uses a fifth of a core, and
  # its native record pauses the executor at each sample (the cell's rate is then not the service's)
  if [ -z "${DRY:-}" ]; then
    PYSPY=${PYSPY:-$(ls /tmp/site/bin/py-spy 2>/dev/null)} timeout 160 $PY -m bench.gpu.pyspy_executor \
      --out "$OUTDIR" --seconds 10 --native-seconds 4 --rate 100 --busy 0.2 --wait 100 > "$OUTDIR/pyspy.log" 2>&1 &
  fi
  # ~30 s start-up, ~30 s in-process ceiling, one 20 s cell each for the service and the ceiling (one cell holds
  # py-spy's two records), then the c=1 interleaved calls (up to 2 x --seconds): 170 s
  step probe_densenet 170 $PY -m bench.stack "${DENSENET[@]}" --out "$OUTDIR/stack-probe-densenet.json"
  wait
  [ -f "$OUTDIR/pyspy.log" ] && tail -n 30 "$OUTDIR/pyspy.log"
  ls -la "$OUTDIR"
  exit 0
fi
if [ "${PLAN:-all}" = issue23 ]; then
  # bench/gpu/run.sh: issue 23's GPU targets (and issue 24's TensorRT row) in one call of at most 8 minutes:
  # the service (frontend_processes: the platform's default, cores/2 on a GPU) beside the same service with
  # one frontend and with torch's OpenMP workers spinning 10k turns when idle instead of 300k (service_short_spin:
  # session 35 saw three such workers of the model thread at ~1 core each), DenseNet-121 @224 at c=1/64 spread over 32
  # connections; U-Net @512; the frontend scale-out of a cheap model at N = 1, 2, 4, 8
  if [ "$DEVICE" = cuda ]; then
    I23=(--device cuda --max-batch-size 64 --num-workers 4 --torch-threads 4 --seg-input-size 512
         --concurrency 1,64 --channels 32 --requests 6000 --seconds 6 --rounds 2 --cudnn-benchmark off
         --serving-path-requests 0)
    # one load-generator process (session 34 tried four: no sign that one was the bound, across two calls that
    # differed in more than that; `--frontend-client-processes K` splits the load)
    SCALE=(--frontend-counts 1,2,4,8 --frontend-concurrency 128 --frontend-requests 6000)
  else
    I23=(--quick --requests 24 --seconds 2 --rounds 1 --concurrency 1,4 --channels 4 --serving-path-requests 0)
    SCALE=(--frontend-counts 1,2 --frontend-requests 48)
  fi
  step i23_classification 200 $PY -m bench.stack "${I23[@]}" "${SCALE[@]}" --tasks classification \
    --peers service,service_short_spin,service_one_frontend --out "$OUTDIR/stack-classification-frontends.json"
  step i23_segmentation 135 $PY -m bench.stack "${I23[@]}" --frontend-requests 0 --tasks segmentation \
    --peers service,service_one_frontend --out "$OUTDIR/stack-segmentation-frontends.json"
  if [ "$DEVICE" = cuda ] && [ "${GPU_TESTS:-0}" = 1 ]; then
    # GPU_TESTS=1 (with a SESSION_S that leaves the time): the CUDA tests too (tests/gpu, two frontends on CUDA
    # bit-equal to one process among them), before the TensorRT rows, which get what is left
    step gpu_tests 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu
  fi
  if [ "$DEVICE" = cuda ]; then
    # TensorRT float16 and int8 beside the CUDA-graphs float path; 110 s keeps the steps within 460 s (GPU_TESTS=1
    # adds 90). Measured
    # only where requirements/gpu.txt is installed (the lent machine cannot: no network, 64 MiB per call, torch
    # 2.11): otherwise each trt row says which torch served and why
    step gpu_tensorrt 110 $PY -m bench.gpu.gpu_paths --device cuda --seconds 1.0 --models densenet121 \
      --variants amp_cl_graphs,trt_fp16,trt_int8 --out "$OUTDIR/gpu_paths-tensorrt.json"
  fi
  ls -la "$OUTDIR"
  exit 0
fi
if [ "$DEVICE" = cuda ]; then
  step gpu_tests 75 $PY -m pytest -q -p no:cacheprovider -m gpu "${TESTS[@]}"
fi
step stack_classification 170 $PY -m bench.stack "${STACK[@]}" "${CLS_PEERS[@]}" --tasks classification \
  --out "$OUTDIR/stack-classification.json"
step gpu_paths 60 $PY -m bench.gpu.gpu_paths "${PATHS[@]}" --out "$OUTDIR/gpu_paths.json"
step stack_segmentation 130 $PY -m bench.stack "${STACK[@]}" "${SEG_PEERS[@]}" --tasks segmentation \
  --out "$OUTDIR/stack-segmentation.json"
if [ "$DEVICE" = cuda ]; then
  # models.<name>.runtime tensorrt (issue 24) beside the CUDA-graphs float paths, densenet121 only (engine builds
  # take minutes); measured only where requirements/gpu.txt is installed (not the lent machine: no network,
  # 64 MiB per call, torch 2.11), else each trt row says which torch served and why
  step gpu_tensorrt 240 $PY -m bench.gpu.gpu_paths --device cuda --seconds 1.0 --models densenet121 \
    --variants tf32_graphs,amp_cl_graphs,trt_fp32,trt_fp16,trt_int8 --out "$OUTDIR/gpu_paths-tensorrt.json"
  # last: how long compilation takes is the unknown; each variant's row is written when it finishes
  # session 18: mode default took 123 s to compile densenet121 (then 2 580 img/s at batch 32)
  step gpu_compile 240 $PY -m bench.gpu.gpu_paths --device cuda --seconds 1.0 --models densenet121 \
    --variants amp_cl,amp_cl_compile_ro,tf32_compile --out "$OUTDIR/gpu_paths-compile.json"
fi
ls -la "$OUTDIR"
