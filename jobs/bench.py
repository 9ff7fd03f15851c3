"""Ray job entrypoint: one of the checkout's benchmarks (benchmarks/bench_<name>.py).

jepa-ray submit --wait -- bench train --out benchmarks/results/train-gpu.json
"""

from _entry import bench

bench()
