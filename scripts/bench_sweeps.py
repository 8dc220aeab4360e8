#!/usr/bin/env python
"""Whole sweeps with hydra/launcher=fused vs the basic launcher; see `fedbench.bench_sweep` and README
"Performance", "Fused sweeps"."""

from fedbench.bench_sweep import main

if __name__ == "__main__":
    main()
