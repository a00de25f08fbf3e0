#!/usr/bin/env bash
# Every device check in one call of the `device` tool (about 9 minutes on an H200 host with 16 cores).
# Here first (TVM needed, ~20 min on 2 cores):
#   .venv/bin/python benchmarks/gpu_backend.py build --arch sm_90 --kit gpu_kit
#   .venv/bin/python benchmarks/cpu_device.py build --kit cpu_kit        # then drop cpu_kit/models/*/x86-64-v3
#   mkdir -p kits && for k in gpu cpu; do tar -cf - ${k}_kit | xz -T2 -6 > kits/${k}_kit.tar.xz; done   # ~55 MB
# Then: device run, command `bash benchmarks/device_checks.sh`, carry ["kits"], timeout_s 585.
# Results land in $OUT: gpu_backend.{json,md}, cpu_device.{json,md}, logs and host.txt.
export PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 -c "import tarfile; [tarfile.open(f'kits/{k}_kit.tar.xz').extractall('.') for k in ('gpu', 'cpu')]"
(date -u; lscpu; nvidia-smi) > "$OUT/host.txt" 2>&1
timeout 400 python3 benchmarks/gpu_backend.py run --kit gpu_kit --out "$OUT" --budget 330 > "$OUT/gpu_log.txt" 2>&1
echo "gpu_backend rc $?"
timeout 150 python3 benchmarks/cpu_device.py run --kit cpu_kit --out "$OUT" > "$OUT/cpu_log.txt" 2>&1
echo "cpu_device rc $?"
cat "$OUT/gpu_backend.md" "$OUT/cpu_device.md"
