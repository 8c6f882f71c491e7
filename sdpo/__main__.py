"""`python -m sdpo demo` / `python -m sdpo train --config cfg.yaml`."""

from .cli import main

main()
