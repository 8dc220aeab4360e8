#!/usr/bin/env bash
# Personalized FL comparison (issue: FedeCouple): Local, FedAvg, FedPer, LG-FedAvg, FedRep, FedBABU,
# Ditto, FedProto, FedeCouple and FedRoD with the FedAvg CNN, 20 clients, full participation, the noniid_s split
# with s = 20%, seeds 0,1,2, on mnist5k and on sklearn digits. Then one table (mean +- std over seeds) of
# personal test accuracy (each client's model on its own test split) and bytes per round.
# digits leaves ~50 training samples per client (3 minibatches), so it runs 5 local epochs per round;
# mnist5k runs 1.
#   bash scripts/personal_sweep.sh [OUT_DIR] [DATASETS]      (about 50 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-benchmarks/personal/sweep}
DATASETS=${2:-mnist5k digits}
FEDBENCH=${FEDBENCH:-fedbench}
ROUNDS=${ROUNDS:-20}
COMMON=(method=local,fedavg,fedper,lgfedavg,fedrep,fedbabu,ditto,fedproto,fedecouple,fedrod seed=0,1,2
        partition=noniid_s partition.s=0.2 clients=20 participation=1.0 rounds="$ROUNDS" batch_size=20
        logger=local progress=false hardware=cpu hardware.threads=1
        hydra/launcher=local_parallel hydra.launcher.n_jobs=2)
for ds in $DATASETS; do
  case $ds in digits) EPOCHS=5 ;; *) EPOCHS=1 ;; esac
  $FEDBENCH --multirun "${COMMON[@]}" dataset="$ds" local_epochs="$EPOCHS" hydra.sweep.dir="$OUT/$ds"
done
python -m fedbench.report "$OUT" --out "$(dirname "$OUT")" --by dataset method
