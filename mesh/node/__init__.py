"""The node process: wiring of servers, peers, timers and storage around the pure cores."""
