"""Ray job entrypoint: a Ray Tune sweep of masking and predictor settings (--resume continues one).

jepa-ray submit --wait -- tune --config jepa_ray/configs/tune-demo.yaml --name sweep1
"""

from _entry import run

run("tune")
