"""`python -m ipsec`: the operator's command line (ipsec/cli)."""
from ipsec.cli.main import main

raise SystemExit(main())
