"""Report over run and sweep directories; the same as ``framp-jax report``:

    python experiments/report.py runs/cifar10_cpu results --out results

writes DIR/REPORT.md and DIR/plots/ (framp_jax.report).
"""
from framp_jax.report import main

if __name__ == "__main__":
    main()
