"""Ray job entrypoint: index a prepared archive's embeddings for similar-case search.

jepa-ray submit --wait -- index --encoder s3://b/runs/r1 --data s3://b/shards --out s3://b/index/r1
"""

from _entry import run

run("index")
