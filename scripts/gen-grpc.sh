#!/usr/bin/env bash
# Regenerate dtmcli/grpc/_proto/*_pb2.py and their .pyi stubs from the .proto files there.
#
# The generator versions are pinned and installed into a throwaway venv, so the output does not depend on
# the dev environment. grpcio-tools 1.71 writes protobuf 5.29 gencode: its import-time check needs a
# protobuf runtime >= 5.29, which is the lower bound of the `grpc` extra in pyproject.toml. Only the
# message modules are generated; dtmcli calls the service methods by path (no *_pb2_grpc modules, which
# would pin grpcio to the generator's version).
#
# The .proto packages are dtmcli.dtmgimp / dtmcli.workflow (private; the wire paths stay /dtmgimp.Dtm/...).
#
# Usage (from anywhere): bash scripts/gen-grpc.sh     (needs network access to the package index)
set -euo pipefail
cd "$(dirname "$0")/.."
GEN_VENV="${GEN_VENV:-${TMPDIR:-/tmp}/dtmcli-gen-grpc-venv}"
if [ ! -x "$GEN_VENV/bin/protoc-gen-mypy" ]; then
    "${PYTHON:-python3}" -m venv "$GEN_VENV"
    "$GEN_VENV/bin/pip" install -q "grpcio-tools==1.71.2" "mypy-protobuf==3.6.0"
fi
OUT=dtmcli/grpc/_proto
# -I . makes the generated imports absolute (dtmcli.grpc._proto...); protoc finds protoc-gen-mypy on PATH.
PATH="$GEN_VENV/bin:$PATH" "$GEN_VENV/bin/python" -m grpc_tools.protoc -I . \
    --python_out=. --mypy_out=. \
    "$OUT"/dtmgimp.proto "$OUT"/workflow.proto
# Drop the gencode's runtime-version check: it warns on every import under a newer protobuf major
# (6.x: "gencode ... exactly one major version older"), which breaks `python -W error` and pytest's
# filterwarnings=error; the builder calls this gencode makes exist unchanged in protobuf 5.29 to 7.x.
for f in "$OUT"/dtmgimp_pb2.py "$OUT"/workflow_pb2.py; do
    "$GEN_VENV/bin/python" - "$f" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text, n = re.subn(r"from google\.protobuf import runtime_version as _runtime_version\n", "", text)
text, m = re.subn(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text)
assert n == 1 and m == 1, f"{path}: runtime version check not found"
open(path, "w").write(text)
PY
done
echo "regenerated: $(cd "$OUT" && ls ./*_pb2.py* | tr '\n' ' ')"
