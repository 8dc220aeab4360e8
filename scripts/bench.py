#!/usr/bin/env python
"""Benchmark every executor against a reference FL loop; see `fedbench.bench` and README "Performance"."""

from fedbench.bench import main

if __name__ == "__main__":
    main()
