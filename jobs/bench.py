"""Ray job entrypoint: `jepa-ray bench train|stream` on the job's cluster, or one of the checkout's
benchmarks (benchmarks/bench_<name>.py).

jepa-ray submit --wait -- bench train --workers 1,2,4,8 --out bench -c jobs/configs/cxr-vitb16-8xgpu.yaml
jepa-ray submit --wait -- bench model --out benchmarks/results/model-gpu.json
"""

from _entry import bench

bench()
