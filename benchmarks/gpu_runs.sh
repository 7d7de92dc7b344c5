#!/usr/bin/env bash
# The measurements that need a GPU, in stages:
#
#   bash benchmarks/gpu_runs.sh tests      OUTDIR   # compiled kernel suite, FLUX shapes, compile, offload (FLUX, Qwen)
#   bash benchmarks/gpu_runs.sh attention  OUTDIR   # the provider sweep at the FLUX and Qwen shapes
#   bash benchmarks/gpu_runs.sh configs    OUTDIR   # block-shape candidates against the default
#   bash benchmarks/gpu_runs.sh end-to-end OUTDIR   # DeContext PGD step (Kontext, Qwen, Step1X), generation overhead
#   bash benchmarks/gpu_runs.sh essentials OUTDIR   # what matters most, in under ten minutes
#
# Results go to OUTDIR (default benchmarks/results), named by device and date like every other
# result; render the README tables from them with benchmarks.render_table. Each script rewrites
# its file after every finished row, so a run cut short keeps what it measured.
#
# On a machine where ditflow is not installed, the script installs the checkout in place (no
# dependencies, nothing downloaded), so that `ditflow.kernels` (kernels/) imports. The
# integration tests and the end-to-end stage need diffusers importable (PYTHONPATH to a copy
# of it will do). In a copy of the checkout, set DITFLOW_COMMIT=<sha> (it wins over a stale .git) so the
# results name the commit they measured.
set -euo pipefail
stage=${1:?usage: gpu_runs.sh tests|attention|configs|end-to-end|essentials [OUTDIR]}
out=${2:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
if ! $python -c "import ditflow.kernels" 2>/dev/null; then
  $python -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "cannot install this checkout in place: import ditflow.kernels fails" >&2; exit 2; }
fi
has_diffusers=1
if ! $python -c "import diffusers" 2>/dev/null; then
  has_diffusers=0
  if [ "$stage" = end-to-end ]; then
    echo "the end-to-end stage needs diffusers (pip install diffusers, or PYTHONPATH to a copy)" >&2
    exit 2
  fi
  echo "warning: diffusers is missing: the model integration tests and PGD steps are skipped" >&2
fi
# The kernel suite compiles a few hundred kernel variants: in parallel where pytest-xdist is
# importable (it is in the test extra; carry its wheel to a bare machine). In the tests Inductor
# compiles in-process ($in_process): its worker pools kept the xdist workers from exiting past
# a stage's time limit.
parallel=$($python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
in_process="env TORCHINDUCTOR_COMPILE_THREADS=1"
export DITFLOW_COMMIT=${DITFLOW_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
device=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
today=$(date -u +%F)

case "$stage" in
  tests)
    log="$out/gpu-tests-$device-$today.txt"
    {
      echo "# GPU correctness run, commit $DITFLOW_COMMIT"
      $python -c "import torch, triton; print('#', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
      $in_process $python -m pytest tests/test_flow_attention.py tests/test_gpu_flux_shapes.py tests/test_rotary.py tests/test_wide_attention.py \
        tests/test_ops.py tests/test_deleaker.py tests/test_flux_integration.py tests/test_qwenimage_integration.py \
        tests/test_step1x_integration.py -v $parallel -p no:cacheprovider -rfEs 2>&1
    } | tee "$log"
    ;;
  attention)
    $python -m benchmarks.attention --shape kontext-512 step1x-512 flux-1024 kontext-1024 qwen-edit-1024 \
      --dtype bf16 fp16 --out "$out"
    ;;
  configs)
    # Against the Hopper defaults (NOTES v7, v10): shapes the compile report finds spill-free
    # with rules + mass (a 128 x 64 forward at 5 stages, dk/dv over 32 queries x 64 keys, dq over
    # 128 queries) and 2-stage backward tiles. Qwen's text length leaves mixed tiles.
    $python -m benchmarks.attention --shape kontext-1024 qwen-edit-1024 --dtype bf16 --out "$out" \
      --sweep default "forward=128x64:8:5:tma" "backward_dkdv=32x64:4:3:tma" \
        "backward_dq=128x64:8:3:tma" "backward_dkdv=64x64:4:2:tma,backward_dq=64x64:4:2:tma"
    ;;
  end-to-end)
    $python -m benchmarks.protect_step --profile --out "$out"
    $python -m benchmarks.protect_step --model qwen-edit --out "$out"
    $python -m benchmarks.protect_step --model step1x --out "$out"
    $python -m benchmarks.generation --profile --out "$out"
    ;;
  essentials)
    # What is measured least and matters most, in under ten minutes, each part under its own
    # time limit so that a slow one cannot starve the rest (SIGINT: pytest still prints which
    # tests failed; the benchmarks keep the rows they wrote): the DeContext PGD step on the
    # full-size Kontext architecture against the authors' recipe (512², the speed target, then
    # 1024², the memory one; each row profiled once: eager, replayed from a CUDA graph, the
    # recipe, four photos per step), the overhead of interventions on a 28-step generation
    # (each profiled once), and the kernel suite compiled (bf16 included) with the CUDA-graph
    # step's test. Exits 1 if a part failed.
    failed=0
    if [ "$has_diffusers" = 1 ]; then
      timeout -s INT -k 15 240 $python -m benchmarks.protect_step --profile \
        --rows ditflow graphed recipe batched --out "$out" || failed=1
      timeout -s INT -k 15 180 $python -m benchmarks.generation --repeats 2 --profile \
        --out "$out" || failed=1
    fi
    log="$out/gpu-essentials-$device-$today.txt"
    graphed_step_test=$([ "$has_diffusers" = 1 ] && echo \
      "tests/test_decontext.py::test_a_graphed_step_gives_the_eager_gradient_and_protection")
    {
      echo "# GPU kernel suite, commit $DITFLOW_COMMIT"
      $python -c "import torch, triton; print('#', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
      suite="$python -m pytest tests/test_flow_attention.py tests/test_gpu_flux_shapes.py tests/test_ops.py tests/test_rotary.py tests/test_wide_attention.py $graphed_step_test -q $parallel -p no:cacheprovider -rfEs"
      echo "# $suite"
      timeout -s INT -k 15 150 $in_process $suite 2>&1
    } | tee "$log" || failed=1
    exit $failed
    ;;
  *)
    echo "unknown stage $stage: tests, attention, configs, end-to-end or essentials" >&2
    exit 2
    ;;
esac
