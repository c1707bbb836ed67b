"""Examples that run from the project's root (``examples.flower_clients.client:client_fn``).

A regular package, so that a top-level ``examples`` package installed by a dependency (Opacus
ships one) does not hide these."""
