from aedist.errors import run_cli
from aedist.models import main

run_cli(main)
