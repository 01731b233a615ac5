#!/usr/bin/env bash
# Run the lepton-edge benchmark suite and write benchmarks/RESULTS_suite.md.
#
#   benchmarks/run.sh --quick          # digits CNN only, few runs (about a minute)
#   benchmarks/run.sh [--tune N]       # full suite: digits, ResNet-18- and MobileNetV2-shaped
#                                      # CNNs at 224x224, BERT-base-shaped encoder at seq 128;
#                                      # fp32, int8 with 8-bit weights and int8 with 7-bit
#                                      # weights; batch 1 and a larger batch
#
# The full run takes about 7 minutes on a 2-core Zen 4 (12 on a Zen 3): --tune defaults to 0, so the CPU kernels are
# lepton-edge's default schedules (lowering/schedules.py, x86_int8.py); --tune N tunes each
# model with N MetaSchedule trials first (much longer, but the tuning database is reused by
# later runs). Other options: --runs R --warmup W --calib S --weight-bits 8,7 --out FILE
# (see benchmarks/models.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" benchmarks/models.py --invoked-as "benchmarks/run.sh $*" "$@"
