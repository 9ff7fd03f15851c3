"""`python -m jepa_ray <command>`: the CLI without its console script (what a Ray job runs when
jepa-ray is installed on the cluster rather than uploaded as a working directory)."""

from jepa_ray.cli import app

app(prog_name="jepa-ray")
