#!/usr/bin/env bash
# Runs on the lent GPU machine, from the checkout root: unpacks the GPU kit if needed, then runs what is asked.
#   bash tests/gpu/device_session.sh unpack            join /tmp/gpukit/p.* (kit + builder, see below), unpack
#   bash tests/gpu/device_session.sh tests [PYTEST_ARGS]  python3.9 -m pytest tests/gpu (log: $OUT/gpu-tests.log)
#   bash tests/gpu/device_session.sh bench [ARGS]       python3.9 -m bench.gpu_backend (log: $OUT/bench.log)
# The parts p.NN are one byte stream: the kit tarball (zstd -19 --long=31; KIT_BYTES long) followed by TensorRT's
# builder resource (zstd --long=31); made from make-kit.sh's output by recompressing (fewer, 60 MiB parts).
set -euo pipefail
K=/tmp/gpukit
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "${1:-}" in
  unpack)
    cd "$K"
    chmod +x zstd
    if [ ! -x "$K/py39/usr/bin/python3.9" ]; then
      KIT_BYTES=$(cat kit_bytes.txt)
      cat p.* > all.bin && rm -f p.*
      head -c "$KIT_BYTES" all.bin | ./zstd -q -d --long=31 | tar -x -C "$K"
      tail -c +$((KIT_BYTES + 1)) all.bin | ./zstd -q -d --long=31 -o "$K/site/tensorrt/libnvinfer_builder_resource.so.8.6.0"
      rm -f all.bin
    fi
    . "$K/env.sh"
    python3.9 -c 'import tensorrt, cupy; print("tensorrt", tensorrt.__version__, "cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    ;;
  tests)
    shift
    . "$K/env.sh"
    export PYTHONPATH="$PWD:$PYTHONPATH"
    set -o pipefail
    python3.9 -m pytest -p no:cacheprovider -v -s -rs "$@" 2>&1 | tee "$OUT/gpu-tests.log"
    ;;
  bench)
    shift
    . "$K/env.sh"
    export PYTHONPATH="$PWD:$PYTHONPATH"
    set -o pipefail
    python3.9 -m bench.gpu_backend "$@" 2>&1 | tee "$OUT/bench.log"
    ;;
  *)
    echo "usage: $0 unpack|tests|bench [args]" >&2
    exit 2
    ;;
esac
