#!/usr/bin/env bash
# Personalized FL comparison in the protocol of FedPAC's official code (FedeCouple's lineage), scaled to
# the embedded mnist5k: Local, FedAvg, FedPer, LG-FedAvg, FedRep, FedBABU, Ditto, FedProto, FedRoD,
# FedeCouple and FedPAC with FedPAC's CNN (pac_cnn), 20 clients, full participation, the noniid_s split
# with FedPAC's rule (s = 20% spread evenly over the classes, the rest over an overlapping 3-class group;
# the largest per-client size mnist5k allows, 1/3 of it each client's test split, 10% its validation),
# 5 local epochs (FedRep: 10 head + 1 body, FedPAC: 1 classifier + 5 extractor; FedeCouple: FedPAC's
# budget, 3 + 1 + 2 whole epochs, with its ema anchors and with the global extractor's centroids),
# batch 50, lr 0.01, momentum 0.5, weight decay 5e-4, seeds 0,1,2, ROUNDS rounds (papers: 200).
# Every method with a personal head on a shared extractor is scored both ways (metrics.extractors=both:
# the global extractor, each client's own). Then one table.
#   bash scripts/personal_sweep.sh [OUT_DIR]      (about 40 minutes on 2 CPU cores with ROUNDS=20)
set -euo pipefail
OUT=${1:-benchmarks/personal/sweep}
FEDBENCH=${FEDBENCH:-fedbench}
ROUNDS=${ROUNDS:-20}
JOBS=${JOBS:-2}
COMMON=(seed=0,1,2 dataset=mnist5k backbone=pac_cnn partition=noniid_s partition.s=0.2 clients=20
  participation=1.0 rounds="$ROUNDS" local_epochs=5 batch_size=50 lr=0.01 method.momentum=0.5
  method.weight_decay=0.0005 metrics.extractors=both logger=local progress=false hardware=cpu
  hardware.threads=1 hydra/launcher=local_parallel hydra.launcher.n_jobs="$JOBS")
$FEDBENCH --multirun method=local,fedavg,fedper,lgfedavg,fedrep,fedbabu,ditto,fedproto,fedrod,fedpac \
  "${COMMON[@]}" hydra.sweep.dir="$OUT/mnist5k"
# FedeCouple on FedPAC's local budget: 1 classifier-only epoch (gpc) and 5 extractor epochs
$FEDBENCH --multirun method=fedecouple 'method.phase_epochs=[3,1,2]' method.anchors=ema,global \
  "${COMMON[@]}" hydra.sweep.dir="$OUT/mnist5k_fedecouple"
python -m fedbench.report "$OUT" --out "$(dirname "$OUT")" --by method
# the README table: one row per method, mean ± std over seeds (per-run values in report.csv)
python - "$(dirname "$OUT")/report.csv" <<'PY'
import sys
import pandas as pd
runs = pd.read_csv(sys.argv[1])
runs = runs[runs["status"] == "completed"].copy()
anchors = runs.get("override:method.anchors")
runs["label"] = runs["method.name"] + (" (anchors: " + anchors + ")").where(anchors.notna(), "") \
    if anchors is not None else runs["method.name"]
by = runs.groupby("label")
def ms(col, fmt="{:.3f}"):
    if col not in runs or runs[col].isna().all():
        return by.size().map(lambda _: "-")
    g = by[col]
    return (g.mean().map(fmt.format) + " ± " + g.std().fillna(0).map(fmt.format)).where(g.count() > 0, "-")
table = pd.DataFrame({
    "personal (its convention)": ms("personal/test_acc"),
    "global extractor": ms("personal_global/test_acc"), "own extractor": ms("personal_own/test_acc"),
    "at best val": ms("best/personal_test_acc"),
    "client spread": by["personal/test_acc_std"].mean().map("{:.3f}".format),
    "worst client": by["personal/test_acc_min"].mean().map("{:.3f}".format),
    "local steps / client / round": (by["train/client_steps_total"].mean()
                                     / (by["rounds"].mean() * by["clients"].mean())).map("{:.0f}".format),
    "bytes / round": by["comm/bytes_per_round"].mean().map(lambda b: f"{b / 1e6:.2f} MB"),
    "wall time": by["time/total_s"].mean().map("{:.0f} s".format),
    "seeds": by.size()})
table = table.loc[by["personal/test_acc"].mean().sort_values(ascending=False).index]
print("| method | " + " | ".join(table.columns) + " |")
print("|---|" + "---:|" * len(table.columns))
for name, row in table.iterrows():
    print(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
PY
