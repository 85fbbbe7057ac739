#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels imagen-pytorch 2.1.0 needs beyond
# what the lent H200/H100 machines' python3 already has (see the device tool's KINDS.md),
# for Python 3.12 on x86-64 Linux, into .whl/ for the GPU session to carry:
#   bash benchmarks/fetch_gpu_wheels.sh
#   run(command="IMAGEN_FAST_WHEELS=.whl bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# gpu_session.sh installs them with --no-deps into /tmp/ipsite; bench_model then compares
# against imagen-pytorch on the GPU too. Versions are the ones the CPU comparison used.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in imagen-pytorch==2.1.0 beartype==0.23.1 ema-pytorch==0.8.3 kornia==0.9.0 kornia_rs==0.2.0 \
           pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
           pytorch-warmup==0.2.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
du -sh .whl
