"""The embedded default: SQLite queue, a process pool as the scale set, a folder as the data lake."""
