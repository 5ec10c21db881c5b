"""Worker processes: each serves FUSE requests from its ring against the export."""
