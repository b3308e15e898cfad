#!/bin/bash
# The GPU measurements (README, Performance and GPUs) in one run (about 8 minutes before the tests), written without a GPU: not yet run.
#   bash results/gpu/check.sh /data/cifar10      # a CIFAR-10 image folder (<root>/{train,test}/<class>/*)
# With no argument it unpacks .gpu_data/cifar10-jpg.tar.gz (ignored by git), as a device-tool run does:
#   mkdir -p .gpu_data && cp ../shared/data/cifar10-jpg.tar.gz .gpu_data/
#   run(command='bash results/gpu/check.sh', carry=['.gpu_data'], timeout_s=600)
# Every log lands in $OUT (at most 8 files: tests, benchmark, timings, SM utilisation, the cells' table).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; T=$(mktemp -d); D=${1:-$T/data/cifar10}; mkdir -p "$OUT" "$T/data"
[ -n "$1" ] || tar -xzf .gpu_data/cifar10-jpg.tar.gz -C "$T/data" || { echo "no .gpu_data/cifar10-jpg.tar.gz"; exit 2; }
{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1
t() {  # t NAME CMD...: wall seconds and the summary line of one command
    local s=$(date +%s%N); timeout 150 "${@:2}" > "$T/$1.log" 2>&1; local rc=$? ms=$(( ($(date +%s%N) - s) / 1000000 ))
    printf '%-24s rc %3d  %6d ms  %s\n' "$1" $rc $ms "$(tail -1 "$T/$1.log")" | tee -a "$OUT/timings.txt"
}
# 1. the GPU targets (README), graphs off and on (the first run decodes the data set into its cache)
t decode python evaluate.py --data_root "$D" --model weight/s_net/WRN-16-1.tar
for g in off on; do
    t "argd-graphs-$g" python main-ARGD.py --data_root "$D" --output "$T/argd-$g.tar" --log_root "$T" --cuda_graphs $g
    t "mcl-graphs-$g" python main_mcl.py --data_root "$D" --mcl_target 0 --output "$T/mcl-$g.tar" --log_root "$T" --cuda_graphs $g
    t "badnet-2ep-graphs-$g" python train_badnet.py --data_root "$D" --epochs 2 --output "$T/bn-$g.tar" --log_root "$T" --cuda_graphs $g
    grep -h "epoch" "$T/badnet-2ep-graphs-$g.log" >> "$OUT/timings.txt"
done
# 2. images/s and SM: eager fp32, bf16, fp32 through CUDA graphs (pip install nvidia-ml-py for SM, where absent)
timeout 100 python benchmark.py > "$OUT/benchmark.log" 2>&1
# 3. eight table cells on one GPU at once, SM sampled each second
mkdir -p "$T/w/zoo" && cp weight/zoo/badnet.tar "$T/w/zoo/"
nvidia-smi dmon -s u -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!
t workers8 python run_table.py --data_root "$D" --attacks badnet --defenses ft,nad,argd,ft-at,fst,i-bau,pam,mcl-tk \
    --seeds 0 --workers 8 --skip_retune --checkpoint_root "$T/w" --table_dir "$T/tab" --cuda_graphs on
kill $DMON
cp "$T/tab/table.md" "$OUT/" 2>/dev/null
# 4. the tests that need a GPU in the time left (a 600 s run cuts them short); the defenses' routing runs on the CPU
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_graphs.py -k 'not each_defense' \
    > "$OUT/tests.log" 2>&1
