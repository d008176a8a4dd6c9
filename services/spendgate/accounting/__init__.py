"""Pure accounting, shared by the live worker and replay so they can never count differently.

- ``ingest``: validate a batch of ``spend.usage`` records, dedupe, attribute, plan deltas;
- ``seen``: the event ids already counted (dedupe horizon) around ``ingest``;
- ``deltas``: what stage A hands stage B, and its wire format;
- ``ledgers``: stage B's apply (``apply_deltas``), ledger table keys, ``partition_of``;
- ``publish``: decisions, alerts and ``spend.state`` records from a scope's ledger.

No I/O here: ``worker/`` wires these into Faust, ``analysis``/``replay`` feed them from a log.
"""
