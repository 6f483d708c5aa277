"""Firmware updates, on top of RAUC (the engine: it verifies a bundle's
signature against the device keyring, writes the other root slot and switches
the boot order).

``rauc``: slot status, bundle info, install with progress, rollback;
``fetch``: resumable bundle downloads into ``$THOX_HOME/updates/``;
``device``: the system side (the API unit, reboot requests, the factory
reset flag).
"""
