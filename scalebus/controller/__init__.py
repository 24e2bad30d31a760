"""The controller: observe the queue and the fleet, decide (pure policy), apply; and the simulator."""
