"""`python -m tff_amqp` is the `tff-amqp` command."""

from tff_amqp.cli import main

raise SystemExit(main())
