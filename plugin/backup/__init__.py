"""Backups: a deduplicated, compressed, optionally encrypted repository of volume snapshots.

targets (S3, directory) → repo (keys, chunks, manifests) with blobs (zstd, AES-GCM, names) and
leases (repository locks); block (the backup and restore engines); service (what the daemon
offers, wired to the manager). The format is docs/backup-repository.md.
"""
