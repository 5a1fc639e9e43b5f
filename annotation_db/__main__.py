"""`python -m annotation_db upgrade|export|stats`: see `cli.py`."""

from .cli import main

main()
