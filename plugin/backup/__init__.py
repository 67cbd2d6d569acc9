"""Backups: a deduplicated, compressed, optionally encrypted repository of volume snapshots.

targets (S3, directory) → repo (keys, chunks, manifests) with blobs (zstd, AES-GCM, names) and
leases (repository locks); block and tree (the backup and restore engines); service (what
the daemon offers, reaching volumes only through its VolumeAccess). The format is
docs/backup-repository.md.
"""
