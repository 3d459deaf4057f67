"""CLI verbs; each module defines ``register(app: typer.Typer) -> None``."""
