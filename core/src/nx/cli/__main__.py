"""``python -m nx.cli ...``: the same as the ``nx`` command."""

from nx.cli import main

main()
