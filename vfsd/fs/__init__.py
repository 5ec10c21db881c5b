"""File-system state shared by every process (the inode table)."""
