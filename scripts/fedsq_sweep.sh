#!/usr/bin/env bash
# FedSQ vs FedAvg vs FedProx fine-tuning the SAME warm start (the FedAvg CNN pretrained centrally on
# sklearn digits upsampled to 28x28), federated on mnist5k with 20 clients: iid and Dirichlet
# alpha in {0.1, 0.5}, seeds 0,1,2. Then one table (mean +- std over seeds) via fedbench-report.
#   bash scripts/fedsq_sweep.sh [OUT_DIR]          (about 15-20 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-benchmarks/fedsq/sweep}
FEDBENCH=${FEDBENCH:-fedbench}
COMMON=(method=fedsq,fedavg,fedprox warm_start.source=digits seed=0,1,2 rounds=20 clients=20 participation=0.3
        logger=local progress=false hardware=cpu hardware.threads=1
        hydra/launcher=local_parallel hydra.launcher.n_jobs=2)
$FEDBENCH --multirun "${COMMON[@]}" partition=iid hydra.sweep.dir="$OUT/iid"
$FEDBENCH --multirun "${COMMON[@]}" partition=dirichlet partition.alpha=0.1,0.5 partition.balance=true \
  hydra.sweep.dir="$OUT/dirichlet"
python -m fedbench.report "$OUT" --out "$(dirname "$OUT")" --by method partition partition.alpha
