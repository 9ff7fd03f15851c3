"""Ray job entrypoint: evaluate an exported encoder or a run's checkpoint on prepared shards.

jepa-ray submit --wait -- evaluate --encoder s3://b/runs/r1 --data s3://b/shards --out eval/r1
"""

from _entry import run

run("evaluate")
