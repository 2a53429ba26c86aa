"""The server side of a round: client selection, configuration and aggregation."""
