"""Ray job entrypoint: pretrain the JEPA (resumes a run of the same name).

jepa-ray submit --wait -- pretrain --config jepa_ray/configs/demo-cpu.yaml \
    train.shards=s3://b/shards train.storage_path=s3://b/runs

Submit it with `jepa-ray submit -- pretrain --config ...`, not `ray job submit --working-dir .`:
that would upload the whole checkout (secrets, data, runs and all), bypassing jepa-ray's upload
allowlist (jepa_ray/upload.py).
"""

from _entry import run

run("pretrain")
