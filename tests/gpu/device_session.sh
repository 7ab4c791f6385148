#!/usr/bin/env bash
# Runs on the lent GPU machine, from the checkout root: unpacks the GPU kit if needed, then runs what is asked.
#   bash tests/gpu/device_session.sh unpack            join /tmp/trtkit/p.* (kit + builder, see below), unpack
#   bash tests/gpu/device_session.sh tests [PYTEST_ARGS]  python3.9 -m pytest tests/gpu (log: $OUT/gpu-tests.log)
#   bash tests/gpu/device_session.sh bench [ARGS]       python3.9 -m bench.gpu_backend (log: $OUT/bench.log)
#   bash tests/gpu/device_session.sh gpu [ARGS]         python3.9 -m bench.gpu, the GPU suite (log: $OUT/bench-gpu.log)
#   bash tests/gpu/device_session.sh python ARGS        python3.9 with the kit and the checkout on the path
# The parts p.NN are one byte stream: the kit tarball (zstd -19 --long=31; KIT_BYTES long) followed by TensorRT's
# builder resource (zstd --long=31); made from make-kit.sh's output by recompressing (58 MiB parts, see make_parts.sh).
set -euo pipefail
# Our own folder, not make-kit's /tmp/gpukit: another session may hold the same machine with its own kit there.
K=/tmp/trtkit
kit_env() {  # what the kit's env.sh exports, for this folder
  export PATH="$K/pa:$K/py39/usr/bin:$PATH" PYTHONHOME="$K/py39/usr" PYTHONUNBUFFERED=1
  export PYTHONPATH="$PWD:$K/site"
  export LD_LIBRARY_PATH="$K/py39/usr/lib/x86_64-linux-gnu:$K/site/nvidia/cuda_runtime/lib:$K/site/nvidia/cuda_nvrtc/lib:$K/site/tensorrt${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "${1:-}" in
  unpack)
    here=$PWD
    cd "$K"
    chmod +x zstd
    if [ ! -x "$K/py39/usr/bin/python3.9" ]; then
      KIT_BYTES=$(cat kit_bytes.txt)
      cat p.* > all.bin && rm -f p.*
      head -c "$KIT_BYTES" all.bin | ./zstd -q -d --long=31 | tar -x -C "$K"
      tail -c +$((KIT_BYTES + 1)) all.bin | ./zstd -q -d --long=31 -o "$K/site/tensorrt/libnvinfer_builder_resource.so.8.6.0"
      rm -f all.bin
    fi
    cd "$here"
    kit_env
    python3.9 -c 'import tensorrt, cupy; print("tensorrt", tensorrt.__version__, "cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    ;;
  tests)
    shift
    kit_env
    python3.9 -m pytest -p no:cacheprovider -v -s -rs "$@" 2>&1 | tee "$OUT/gpu-tests.log"
    ;;
  bench)
    shift
    kit_env
    python3.9 -m bench.gpu_backend "$@" 2>&1 | tee "$OUT/bench.log"
    ;;
  gpu)
    shift
    kit_env
    python3.9 -m bench.gpu "$@" 2>&1 | tee -a "$OUT/bench-gpu.log"
    ;;
  python)
    shift
    kit_env
    python3.9 "$@"
    ;;
  *)
    echo "usage: $0 unpack|tests|bench [args]" >&2
    exit 2
    ;;
esac
