"""The Ray processes of raytp: one ``RankActor`` per rank."""

from actors.rank import RankActor

__all__ = ["RankActor"]
