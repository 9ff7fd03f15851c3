"""Ray job entrypoint: pretrain the JEPA (resumes a run of the same name).

jepa-ray submit --wait -- pretrain --config jobs/configs/demo-cpu.yaml train.shards=s3://b/shards
ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/demo-cpu.yaml
"""

from _entry import run

run("pretrain")
