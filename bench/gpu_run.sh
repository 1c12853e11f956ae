#!/usr/bin/env bash
# One call on a lent GPU machine: run the named steps, each bounded by its own time limit,
# into RESULTS (logs, JSON, md, plots), then pack RESULTS into one archive beside it.
#
#   DEQKERN_COMMIT=<sha> bash bench/gpu_run.sh RESULTS STEP[:SECONDS] [STEP[:SECONDS] ...]
#
# Steps: setup (carried wheels in .whl/, the C++ extension built with the system g++,
# environment record) - env (the environment record alone) - tests (the test files that run
# on CUDA; the CPU-only ones run in CI) - cell-tests (the one-launch solve's test files) - dist-tests (the two-GPU test) -
# probe (probe_split.py; PROBE_ARGS appended) - probe-block (probe_block.py: the block kernel's sweep at large sizes) - probe-update (probe_update.py: the update forward's tile sweep) - profile (profile_host.py: per-call wall time of each host entry point,
# attributed from one torch.profiler run, into RESULTS/profile/) - cell (bench_cell.py) - solvers (bench_solvers.py) -
# inr (deq_inr.py) - model-fp32, model-bf16 (bench_model.py: time-parallel vs token loops)
# - generate (bench_generate.py) - seq-scaling (bench_model.py --scaling) - train (bench_solve.py train phase) - host,
# update, iteration, solve, dropin, spectral (python -m bench suites, one budget each) -
# dist (bench_distributed.py). A failing step is reported and the next one runs; the
# tail of each step's log is printed.
# The test steps run with OMP_NUM_THREADS=1: many pytest workers on the CPU tests otherwise
# oversubscribe the cores (2026-11-30: CPU-only float64 solver tests timed out at 150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
RES=$(realpath -m "$1"); shift
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DEQKERN_COMMIT="${DEQKERN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

run_step() {  # name seconds command...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "===== $name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$RES/$name.log" 2>&1
    rc=$?
    echo "----- $name: rc=$rc, $((SECONDS - t0)) s"
    grep -v "^DEBUG" "$RES/$name.log" | tail -n "${TAIL:-30}"
}

suite() {  # name seconds: one python -m bench suite
    run_step "$1" "$2" python -m bench --suite "$1" --budget-s "$(($2 - 40))" --out "$RES/suites"
}

for spec in "$@"; do
    name=${spec%%:*}
    limit=${spec#*:}
    [ "$limit" = "$spec" ] && limit=300
    case $name in
        setup)
            if ls .whl/*.whl >/dev/null 2>&1; then
                python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
                    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
            fi
            # The image's CXX wrapper built an extension that crashed on any throw (2026-11-26).
            [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
            run_step build "$limit" python setup.py build_ext --inplace
            { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
              python -c "import torch, triton, platform; print('torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda, '| python', platform.python_version(), '| GPUs', torch.cuda.device_count())"
              echo "commit $DEQKERN_COMMIT"; date -u +%FT%TZ; } >"$RES/env.txt" 2>&1
            cat "$RES/env.txt" ;;
        tests)
            OMP_NUM_THREADS=1 DEQKERN_FAILURE_LOG="$RES/tests-failures.log" TAIL=8 run_step tests "$limit" python -m pytest -v -p no:cacheprovider -n 24 --timeout 150 -rf tests \
                --ignore=tests/test_distributed.py --ignore=tests/test_checkpoint.py \
                --ignore=tests/test_bench_cli.py --ignore=tests/test_package.py
            echo "--- failed:"; grep -aoE "(FAILED|ERROR) tests/[^ ]+" "$RES/tests.log" | sort -u | head -60
            [ -f "$RES/tests-failures.log" ] && grep -aE "^(=====|E )" "$RES/tests-failures.log" | head -80 ;;
        cell-tests)  # the one-launch solves and what calls them
            OMP_NUM_THREADS=1 DEQKERN_FAILURE_LOG="$RES/cell-tests-failures.log" TAIL=8 run_step cell-tests "$limit" python -m pytest -v -p no:cacheprovider -n 16 --timeout 300 -rf \
                ${CELL_TESTS:-tests/test_ops_persistent.py tests/test_solve_cell.py tests/test_deq.py tests/test_generate.py} \
                ${CELL_K:+-k "$CELL_K"}
            echo "--- failed:"; grep -aoE "(FAILED|ERROR) tests/[^ ]+" "$RES/cell-tests.log" | sort -u | head -60
            [ -f "$RES/cell-tests-failures.log" ] && grep -aE "^(=====|E )" "$RES/cell-tests-failures.log" | head -80 ;;
        probe) run_step probe "$limit" python bench/probe_split.py --out "$RES/probe_split.json" ${PROBE_ARGS:-} ;;
        probe-block) run_step probe-block "$limit" python bench/probe_block.py --out "$RES/probe_block.json" ;;
        probe-update) run_step probe-update "$limit" python bench/probe_update.py --out "$RES/probe_update.json" ;;
        profile) run_step profile "$limit" python bench/profile_host.py --out "$RES/profile" ;;
        env)
            { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
              python -c "import torch, triton, platform; print('torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda, '| python', platform.python_version(), '| GPUs', torch.cuda.device_count())"
              echo "commit $DEQKERN_COMMIT"; date -u +%FT%TZ; } >"$RES/env.txt" 2>&1
            cat "$RES/env.txt" ;;
        dist-tests)
            run_step dist-tests "$limit" python -m pytest -q -p no:cacheprovider tests/test_distributed.py -k "gpu or cuda" ;;
        cell) run_step cell "$limit" python bench/bench_cell.py --rounds 5 --calls 30 --out "$RES/cell" ${CELL_SIZES:+--sizes $CELL_SIZES} ;;
        solvers) run_step solvers "$limit" python bench/bench_solvers.py --out "$RES/solvers.json" ;;
        inr) run_step inr "$limit" python bench/deq_inr.py --out "$RES/deq_inr.json" ;;
        model-fp32|model-bf16)  # the reference model: time-parallel vs the token loops, 20 steps each
            run_step "$name" "$limit" python bench/bench_model.py --dtype "${name#model-}" --steps 20 \
                --budget-s "$(( (limit - 60) / 5 ))" --out "$RES/model" ;;
        generate) run_step generate "$limit" python bench/bench_generate.py --out "$RES/generate" ;;
        seq-scaling) run_step seq-scaling "$limit" python bench/bench_model.py --scaling --steps 3 --out "$RES/scaling" ;;
        train) run_step train "$limit" python bench/bench_solve.py --phase train --dtype bf16 fp32 \
                --sizes 256x512 8192x1024 --out "$RES/solve_train.json" ;;
        dist) run_step dist "$limit" python bench/bench_distributed.py --budget-s "$((limit - 20))" --sweep --out "$RES/dist" ;;
        host|update|iteration|solve|dropin|spectral) suite "$name" "$limit" ;;
        *) echo "unknown step $name" ;;
    esac
done
tar czf "$RES.tgz" -C "$(dirname "$RES")" "$(basename "$RES")" && rm -rf "$RES"
echo "packed $RES.tgz"
