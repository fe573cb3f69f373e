#!/usr/bin/env bash
# Reproduce Table 1 and Figs. 2, 4, 5, 6 of Rozsa et al. (CVPRW 2016) on LeNet/MNIST, from raw MNIST.
#   bash scripts/reproduce_table1.sh medium     # the paper's structure, smaller sizes
#   bash scripts/reproduce_table1.sh paper-rows # the paper's sizes for 5 rows (+ an ablation), 3 nets per row
#   bash scripts/reproduce_table1.sh            # quick profile: a smoke test
#   bash scripts/reproduce_table1.sh full       # the paper's sizes, every row (many hours; add --estimate first)
# Measured wall times: README, "Reproducing Table 1".
# Stages run on a local Dask cluster, one single-threaded worker per core (`hcgen table1 --dask`): the
# same results as one stage at a time (docs/table1-quick/README.md), in about half the time on 2 cores.
# Extra arguments go to `hcgen table1` (e.g. --estimate, --workers 1, --mnist DIR).
# Sets everything up first (as the README's commands do). Rerunning resumes: finished stages are
# kept in work/table1/PROFILE, results go to results/table1-PROFILE.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
profile=${1:-quick}
bash "$root/scripts/bootstrap.sh" setup
cd "$root"
exec .venv/bin/hcgen table1 --profile "$profile" --dask "${@:2}"
