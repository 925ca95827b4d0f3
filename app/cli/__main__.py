"""`python -m app.cli`: the `prefloop` command without its installed script."""

from app.cli import main

main()
