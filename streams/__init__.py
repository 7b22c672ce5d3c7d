"""Stream processing: event records, topics, the Faust app and its agents."""
