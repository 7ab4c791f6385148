#!/usr/bin/env bash
# Builds the parts that tests/gpu/device_session.sh unpacks on the lent GPU machine, into .gpukit/p.NN (git ignores it):
# make-kit.sh's kit (CPython 3.9, TensorRT 8.6.0 with the builder, CuPy 13, NumPy 2.0, our cp39 dependencies) plus
# perf_analyzer's binary (../shared/perf-analyzer/setup.sh), recompressed with zstd -19 --long=31 into one byte stream
# cut in 58 MiB parts (9 uploads; kit_bytes.txt goes with the first, zstd with the last, small one). Each upload
# is one `run` call, and a part travels with the checkout, which must stay within the 64 MiB a call may carry
# (61 MiB parts stopped fitting once the checkout passed 3 MiB).
#   usage: bash tests/gpu/make_parts.sh   then upload .gpukit/p.00 (with kit_bytes.txt), p.01, ..., the last with
#   zstd, in order
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=$ROOT/../shared
W=${GPUKIT_WORK:-/tmp/trtkit-build}
rm -rf "$W/kit" "$W/tree" && mkdir -p "$W"
bash "$SHARED/gpu-kit/make-kit.sh" "$W/kit" --builder grpcio==1.80.0 'protobuf>=6.31,<7' grpcio-health-checking==1.80.0 \
  grpcio-reflection==1.80.0 prometheus-client onnx onnxruntime python-rapidjson packaging ml_dtypes \
  aiohttp multidict yarl frozenlist aiosignal attrs propcache aiohappyeyeballs async-timeout typing_extensions idna uvloop
mkdir -p "$W/tree"
cat "$W"/kit/kit.* | zstd -q -d | tar -x -C "$W/tree"
cat "$W"/kit/builder.* | zstd -q -d -f --long=27 -o "$W/builder.so"
rm -rf "$W/tree/site/onnx/backend/test"  # 62 MB of ONNX conformance data
PA=${PA_HOME:-/tmp/perf-analyzer}
[ -x "$PA/whl/perf_analyzer/bin/perf_analyzer" ] || bash "$SHARED/perf-analyzer/setup.sh" "$PA"
mkdir -p "$W/tree/pa" && cp "$PA/whl/perf_analyzer/bin/perf_analyzer" "$W/tree/pa/"
tar -C "$W/tree" -cf - . | zstd -q -19 -T0 --long=31 -o "$W/kit.tar.zst" -f
zstd -q -19 -T0 --long=31 -f "$W/builder.so" -o "$W/builder.zst"
rm -rf "$ROOT/.gpukit" && mkdir -p "$ROOT/.gpukit"
stat -c %s "$W/kit.tar.zst" > "$ROOT/.gpukit/kit_bytes.txt"
cp "$(command -v zstd)" "$ROOT/.gpukit/zstd"
cat "$W/kit.tar.zst" "$W/builder.zst" | split -b 58M -d -a 2 - "$ROOT/.gpukit/p."
ls -la "$ROOT/.gpukit"
