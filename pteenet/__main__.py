"""``python -m pteenet`` runs the CLI (also under ``torchrun``)."""

from pteenet_cli.app import main

main()
