"""Built-in observers of task lifecycle events: one concern per module."""
