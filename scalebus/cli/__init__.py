"""The command line: typer commands (app), their output (tables, JSON, progress), the composition root."""
