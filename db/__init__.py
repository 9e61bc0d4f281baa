"""The result database: sweeps, exactly-once work units, workers and result shards.

Public API in db.store (Store, connect) and db.shards (write_shard, verify_shard).
"""
