"""cluster-backup: agent-based backups of a few large sources onto many small hosts."""

#: The version when the package runs without being installed (from a
#: checkout); C{cbackup --version} prefers the installed distribution's.
__version__ = "0.1.0"
