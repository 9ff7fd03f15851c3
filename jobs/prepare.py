"""Ray job entrypoint: DICOM + MEDS -> de-identified webdataset shards (resumable).

The salt stays on the cluster: a file every node can read (or JEPA_RAY_SALT in the nodes' own
environment), never in the submission, whose runtime env the dashboard shows to anyone.

    jepa-ray submit --wait -- prepare --config jepa_ray/configs/prepare-demo.yaml \
        --dicom s3://b/dicom --meds s3://b/meds --out s3://b/shards prepare.deid.salt_file=/secrets/salt
"""

from _entry import run

run("prepare")
