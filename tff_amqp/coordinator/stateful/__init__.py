"""The stateful regime's coordinator: an executor stack whose CLIENTS values live
at the silos as handles (see docs/architecture.md)."""
