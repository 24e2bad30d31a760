"""The controller: observe the queue and the fleet, decide (pure policy), apply, one round at a time."""
