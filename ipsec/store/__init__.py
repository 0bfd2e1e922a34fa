"""Shared, persistent state of the module: SPI/port leases, contacts and their tunnels.

`Store` is the only door to it; the records are plain frozen dataclasses. See `store.py` for
why it is SQLite and how processes share it.
"""
from ipsec.sipuri import Address
from ipsec.store.records import (PENDING, REGISTERED, Binding, Contact, Lease, NotLeased,
                                 PhoneSpiInUse, SchemaMismatch, SpiExhausted, StoreError, Tunnel,
                                 UeSide, UnknownContact, keep_tunnel)
from ipsec.store.locks import UeLocks
from ipsec.store.store import Store

__all__ = [
    "PENDING", "REGISTERED", "Address", "Binding", "Contact", "Lease", "NotLeased",
    "PhoneSpiInUse", "SchemaMismatch", "SpiExhausted", "Store", "StoreError", "Tunnel", "UeSide",
    "UnknownContact", "keep_tunnel", "UeLocks",
]
