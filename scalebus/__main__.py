"""``python -m scalebus`` — the same CLI as the ``scalebus`` script (the local pool starts workers this way)."""

from scalebus.cli.app import main

main()
